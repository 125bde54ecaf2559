"""Per-example clipping as optax transforms that return the clipped SUM.

Implements the clipping step of DP-SGD (Abadi et al. 2016, "Deep Learning with
Differential Privacy"). Every transform here takes per-example gradients (a
pytree whose leaves carry a leading batch axis), bounds each example's
contribution and returns the sum over examples. It declares the L2
sensitivity of that sum for each neighbouring relation, so the noise added
downstream can be scaled to it.

Privacy invariant owned here (DESIGN.md, invariants 1 and 6): for ANY input,
including NaN, Inf, huge values and padding rows, one example changes the
clipped sum by at most the declared sensitivity. Non-finite per-example
gradients and padding rows contribute exactly zero.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import optax

from dpjax import _validation

NeighboringRelation = dp_accounting.NeighboringRelation
PyTree = Any


class ClipOutput(NamedTuple):
  """What one clipping call returns besides its state.

  Attributes:
    grad_sum: sum over examples of the clipped gradients (params' structure).
    norms: [B] per-example global L2 norms before clipping (padding rows are 0,
      non-finite rows are reported as +inf).
    num_nonfinite: scalar count of real (unmasked) examples whose gradient was
      non-finite; they were zeroed.
    num_clipped: scalar count of real examples whose norm exceeded the bound.
  """

  grad_sum: PyTree
  norms: jax.Array
  num_nonfinite: jax.Array
  num_clipped: jax.Array


ClipFn = Callable[[PyTree, Any, jax.Array], tuple[ClipOutput, Any]]


class NormScales(NamedTuple):
  """Per-example clip factors computed from per-example norms alone.

  What a clipping returns when the gradients themselves were never
  materialized (ghost norms, :mod:`dpjax.ghost`): the caller forms
  ``sum_b where(keep_b, scales[leaf]_b * g_b[leaf], 0)`` for every leaf.

  Attributes:
    scales: a pytree with the structure of the squared norms it was given,
      each leaf a [B] factor for that part of the gradient.
    keep: [B] bool, False on padding rows and non-finite rows, which must
      contribute exactly zero.
    norms: [B] as in :class:`ClipOutput`.
    num_nonfinite: as in :class:`ClipOutput`.
    num_clipped: as in :class:`ClipOutput`.
  """

  scales: PyTree
  keep: jax.Array
  norms: jax.Array
  num_nonfinite: jax.Array
  num_clipped: jax.Array


NormScalesFn = Callable[[PyTree, Any, jax.Array], tuple[NormScales, Any]]


class PerExampleClipping(optax.GradientTransformationExtraArgs):
  """An optax transform over per-example gradients that knows its sensitivity.

  It is a plain ``GradientTransformationExtraArgs`` (so ``optax.chain`` accepts
  it) whose ``update(per_example_grads, state, params=None, mask=None)`` returns
  the clipped sum. Beyond the optax interface it carries:

  * ``clip(per_example_grads, state, mask) -> (ClipOutput, state)``, the same
    computation with per-example norms and counts, which the microbatching
    engine (:mod:`dpjax.per_example`) calls once per microbatch;
  * ``sensitivity(relation)``, the L2 sensitivity of the clipped sum;
  * ``scales_from_norms(sq_norms, state, mask) -> (NormScales, state)`` or
    None: the same clipping computed from per-example SQUARED norms of each
    part of the gradient (a pytree of [B] arrays, e.g. one per parameter),
    for routes that never build per-example gradients (:mod:`dpjax.ghost`).
    Clippings without it run on the vmap route only.
  """

  # A NamedTuple subclass without __slots__ has a __dict__, which is where the
  # extra attributes live; optax.chain only unpacks (init, update).
  clip: ClipFn
  l2_bound: float
  name: str
  scales_from_norms: NormScalesFn | None = None

  def sensitivity(
      self,
      relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
  ) -> float:
    """L2 sensitivity of the clipped sum under ``relation``.

    Adding or removing one example moves the sum by at most the per-example
    bound; replacing one example by another moves it by at most twice that
    (both vectors lie in the same ball).
    """
    relation = NeighboringRelation(relation)
    if relation in (
        NeighboringRelation.ADD_OR_REMOVE_ONE,
        NeighboringRelation.REPLACE_SPECIAL,
    ):
      return self.l2_bound
    if relation == NeighboringRelation.REPLACE_ONE:
      return 2.0 * self.l2_bound
    raise ValueError(f'Unknown neighbouring relation {relation!r}.')


def make_per_example_clipping(
    init_fn: Callable[[PyTree], Any],
    clip_fn: ClipFn,
    l2_bound: float,
    name: str,
    scales_from_norms: NormScalesFn | None = None,
) -> PerExampleClipping:
  """Wraps a clip function into a :class:`PerExampleClipping` transform.

  ``scales_from_norms``, when given, must clip exactly as ``clip_fn`` does,
  from per-example squared norms instead of gradients (see
  :class:`PerExampleClipping`).
  """

  def update_fn(updates, state, params=None, *, mask=None, **extra_args):
    del params, extra_args
    out, state = clip_fn(updates, state, mask)
    return out.grad_sum, state

  tx = PerExampleClipping.__new__(PerExampleClipping, init_fn, update_fn)
  tx.clip = clip_fn
  tx.l2_bound = float(l2_bound)
  tx.name = name
  tx.scales_from_norms = scales_from_norms
  return tx


def batch_size_of(per_example_grads: PyTree) -> int:
  """Leading-axis size shared by all leaves, with a clear error otherwise."""
  leaves = jax.tree.leaves(per_example_grads)
  if not leaves:
    raise ValueError('expects a non-empty pytree of per-example gradients.')
  sizes = {x.shape[0] if x.ndim else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        'expects per-example gradients with a common batch dimension in the 0th'
        f' axis of every leaf; got leading sizes {sorted(map(str, sizes))}.'
    )
  return sizes.pop()


def per_example_global_norms(per_example_grads: PyTree) -> jax.Array:
  """[B] global L2 norm of each example's gradient, computed in float32."""
  leaves = jax.tree.leaves(per_example_grads)
  batch = batch_size_of(per_example_grads)
  sq = sum(
      jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(batch, -1), axis=1)
      for x in leaves
  )
  return jnp.sqrt(sq)


def as_mask(mask: jax.Array | None, batch: int) -> jax.Array:
  """Boolean [B] mask (all True when ``mask`` is None)."""
  if mask is None:
    return jnp.ones((batch,), dtype=bool)
  mask = jnp.asarray(mask)
  if mask.shape != (batch,):
    raise ValueError(
        f'mask must have shape ({batch},) to match the batch; got {mask.shape}.'
    )
  return mask.astype(bool)


def scale_and_sum(
    per_example_grads: PyTree, scale: jax.Array, keep: jax.Array
) -> PyTree:
  """sum_b keep_b * scale_b * g_b, exact zeros where ``keep`` is False.

  ``where`` (not a multiplication by zero) keeps a NaN row from reaching the
  sum: NaN * 0 is NaN.
  """

  def one(x):
    shape = (-1,) + (1,) * (x.ndim - 1)
    s = scale.reshape(shape).astype(x.dtype)
    return jnp.sum(jnp.where(keep.reshape(shape), x * s, 0), axis=0)

  return jax.tree.map(one, per_example_grads)


def clip_per_example(l2_norm_clip: float) -> PerExampleClipping:
  """Clips each example's gradient to global L2 norm ``l2_norm_clip`` and sums.

  Each row g_b becomes g_b * min(1, C / ||g_b||); rows whose norm is not finite
  (NaN, Inf, or an overflow of the squared norm) and rows with ``mask=False``
  contribute exactly zero. The sum's sensitivity is C under add/remove and 2C
  under replace-one.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dpjax
    >>> clip = dpjax.clip_per_example(1.0)
    >>> grads = {'w': jnp.array([[3.0, 4.0], [0.3, 0.4], [jnp.nan, 0.0]])}
    >>> summed, _ = clip.update(grads, clip.init(None))
    >>> [round(float(v), 4) for v in summed['w']]
    [0.9, 1.2]
    >>> clip.sensitivity()
    1.0

  Args:
    l2_norm_clip: the bound C > 0 on each example's global L2 norm.

  Returns:
    A :class:`PerExampleClipping` transform; ``update`` accepts an optional
    boolean ``mask`` extra argument marking real (non-padding) rows.

  References:
    Abadi et al., 2016. Deep Learning with Differential Privacy.
    https://arxiv.org/abs/1607.00133
  """
  bound = _validation.positive('l2_norm_clip', l2_norm_clip)

  def clip_fn(per_example_grads, state, mask):
    norms = per_example_global_norms(per_example_grads)
    mask = as_mask(mask, norms.shape[0])
    finite = jnp.isfinite(norms)
    keep = mask & finite
    scale = bound / jnp.maximum(norms, bound)
    out = ClipOutput(
        grad_sum=scale_and_sum(per_example_grads, scale, keep),
        norms=jnp.where(mask, jnp.where(finite, norms, jnp.inf), 0.0),
        num_nonfinite=jnp.sum(mask & ~finite),
        num_clipped=jnp.sum(keep & (norms > bound)),
    )
    return out, state

  def scales_fn(sq_norms, state, mask):
    # The same rule as clip_fn, from squared norms of the gradient's parts.
    sq = [x.astype(jnp.float32) for x in jax.tree.leaves(sq_norms)]
    norms = jnp.sqrt(sum(sq))
    mask = as_mask(mask, norms.shape[0])
    finite = jnp.isfinite(norms)
    keep = mask & finite
    scale = bound / jnp.maximum(norms, bound)
    out = NormScales(
        scales=jax.tree.map(lambda _: scale, sq_norms),
        keep=keep,
        norms=jnp.where(mask, jnp.where(finite, norms, jnp.inf), 0.0),
        num_nonfinite=jnp.sum(mask & ~finite),
        num_clipped=jnp.sum(keep & (norms > bound)),
    )
    return out, state

  return make_per_example_clipping(
      optax.init_empty_state, clip_fn, bound, 'flat', scales_fn
  )
