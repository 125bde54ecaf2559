"""Per-example clipping as optax transforms that return the clipped SUM.

Implements the clipping step of DP-SGD (Abadi et al. 2016, "Deep Learning with
Differential Privacy") and its variants: per-layer clipping (McMahan et al.
2018), automatic clipping (Bu et al. 2023) and normalization (De et al. 2022).
Every transform here takes per-example gradients (a pytree whose leaves carry
a leading batch axis), bounds each example's contribution and returns the sum
over examples. It declares the L2 sensitivity of that sum for each
neighbouring relation, so the noise added downstream can be scaled to it.

Privacy invariant owned here (DESIGN.md, invariants 1 and 6): for ANY input,
including NaN, Inf, huge values and padding rows, one example changes the
clipped sum by at most the declared sensitivity. Non-finite per-example
gradients and padding rows contribute exactly zero.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, NamedTuple

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipSpec:
  """What a clipping is, beyond its optax ``(init, update)`` pair.

  Attributes:
    init: ``init(params) -> state``.
    clip: ``clip(per_example_grads, state, mask) -> (ClipOutput, state)``.
    l2_bound: the add/remove sensitivity of the bound it was built with.
    name: a short name for summaries and messages ('flat', 'per_layer', ...).
    bound_fn: ``bound_fn(state)``, the add/remove sensitivity of the
      thresholds in ``state`` (None: a fixed bound ``l2_bound``).
    noise_scale_fn: ``noise_scale_fn(state)``, see
      :meth:`PerExampleClipping.noise_scale` (None: isotropic).
    end_step_fn: the once-per-logical-step state update (None: identity).
    scales_from_norms: ``scales_from_norms(sq_norms, state, mask) ->
      (NormScales, state)``, the same clipping from per-example SQUARED norms
      of each parameter (a pytree of [B] arrays with the parameters'
      structure), for routes that never build per-example gradients
      (:mod:`dpjax.ghost`); None when the clipping needs the gradients
      themselves (it then runs on the vmap route only).
  """

  init: Callable[[PyTree], Any]
  clip: ClipFn
  l2_bound: float
  name: str
  bound_fn: Callable[[Any], jax.Array] | None = None
  noise_scale_fn: Callable[[Any], PyTree] | None = None
  end_step_fn: Callable[[Any], Any] | None = None
  scales_from_norms: NormScalesFn | None = None


class PerExampleClipping(optax.GradientTransformationExtraArgs):
  """An optax transform over per-example gradients that knows its sensitivity.

  It is a plain ``GradientTransformationExtraArgs`` (so ``optax.chain``
  accepts it and forwards the ``mask`` extra argument) whose
  ``update(per_example_grads, state, params=None, mask=None)`` returns the
  clipped sum. Everything else it knows is its :class:`ClipSpec`, given once
  to the constructor and read through the properties below; the object is
  immutable. Subclasses declare a :class:`ClipSpec` subclass with more fields
  (``spec_type``) and the properties that read them.

  * ``clip(per_example_grads, state, mask) -> (ClipOutput, state)``, the same
    computation with per-example norms and counts, which the microbatching
    engine (:mod:`dpjax.per_example`) calls once per microbatch;
  * ``sensitivity(relation)``, the L2 sensitivity of the clipped sum;
  * ``scales_from_norms``: see :class:`ClipSpec`.
  """

  spec_type: ClassVar[type[ClipSpec]] = ClipSpec
  spec: ClipSpec

  def __new__(cls, spec: ClipSpec):
    if not isinstance(spec, cls.spec_type):
      raise TypeError(f'{cls.__name__} is built from a {cls.spec_type.__name__}'
                      f', got {type(spec).__name__}.')
    clip_fn = spec.clip

    def update_fn(updates, state, params=None, *, mask=None, **extra_args):
      del params, extra_args
      out, state = clip_fn(updates, state, mask)
      return out.grad_sum, state

    self = super().__new__(cls, spec.init, update_fn)
    self.__dict__['spec'] = spec
    return self

  def __getnewargs__(self):
    return (self.spec,)

  def __setattr__(self, name, value):
    raise AttributeError(
        f'{type(self).__name__} is immutable: build a new one from'
        f' dataclasses.replace(clipping.spec, {name}=...).')

  __delattr__ = __setattr__

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.spec!r})'

  clip = property(lambda self: self.spec.clip)
  l2_bound = property(lambda self: self.spec.l2_bound)
  name = property(lambda self: self.spec.name)
  bound_fn = property(lambda self: self.spec.bound_fn)
  noise_scale_fn = property(lambda self: self.spec.noise_scale_fn)
  end_step_fn = property(lambda self: self.spec.end_step_fn)
  scales_from_norms = property(lambda self: self.spec.scales_from_norms)

  def relation_factor(
      self,
      relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
  ) -> float:
    """Sensitivity under ``relation`` over the per-row bound (1 or 2)."""
    relation = NeighboringRelation(relation)
    if relation in (
        NeighboringRelation.ADD_OR_REMOVE_ONE,
        NeighboringRelation.REPLACE_SPECIAL,
    ):
      return 1.0
    if relation == NeighboringRelation.REPLACE_ONE:
      return 2.0
    raise ValueError(f'Unknown neighbouring relation {relation!r}.')

  def sensitivity(
      self,
      relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
      state: Any = None,
  ):
    """L2 sensitivity of the clipped sum under ``relation``.

    Adding or removing one example moves the sum by at most the per-example
    bound; replacing one example by another moves it by at most twice that
    (both vectors lie in the same ball). With ``state``, the bound is the one
    of the thresholds in that state (a traced value for per-layer and
    adaptive clipping); without it, the bound the transform was built with.
    """
    factor = self.relation_factor(relation)
    if state is None or self.bound_fn is None:
      return factor * self.l2_bound
    return factor * self.bound_fn(state)

  def noise_scale(
      self,
      state: Any = None,
      relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
  ) -> PyTree:
    """Noise std per unit of noise multiplier, on the clipped SUM.

    A scalar (isotropic noise: the sensitivity) or a pytree prefix of the
    parameters with one scale per clip group (per-group noise). Gaussian
    noise of std ``noise_multiplier * noise_scale`` makes the release a
    Gaussian mechanism of that noise multiplier (sensitivity 1 after dividing
    each group by its scale), so the accountant's event needs nothing else.
    """
    factor = self.relation_factor(relation)
    if self.noise_scale_fn is None:
      return factor * self.sensitivity(NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       state)
    return jax.tree.map(lambda s: factor * s, self.noise_scale_fn(state))

  def end_step(self, state: Any) -> Any:
    """The once-per-logical-step update of the state (identity if stateless).

    Call it once after every logical step, after the noise: adaptive clipping
    releases its noised counts here and moves its thresholds.
    """
    return state if self.end_step_fn is None else self.end_step_fn(state)


def spec_fields(spec: ClipSpec) -> dict[str, Any]:
  """The :class:`ClipSpec` fields of ``spec`` (of any subclass), as a dict."""
  return {f.name: getattr(spec, f.name)
          for f in dataclasses.fields(ClipSpec)}


def _is_number(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.number)


def state_increment(old: Any, new: Any) -> Any:
  """What a clipping call added to the numeric leaves of its state.

  Within a logical step a clip state only accumulates statistics (adaptive
  clipping's counts); thresholds and PRNG keys change in ``end_step``. So the
  increments of the pieces of one step (physical batches, devices) add up:
  ``add_state_increment(start, sum of increments)`` is the state after the
  whole step. Non-numeric leaves (keys) get a zero placeholder.
  """
  return jax.tree.map(
      lambda o, n: n - o if _is_number(o) else jnp.zeros((), jnp.int32),
      old, new)


def add_state_increment(state: Any, increment: Any) -> Any:
  """``state`` plus an (accumulated) :func:`state_increment`."""
  return jax.tree.map(lambda s, d: s + d if _is_number(s) else s, state,
                      increment)


def make_per_example_clipping(
    init_fn: Callable[[PyTree], Any],
    clip_fn: ClipFn,
    l2_bound: float,
    name: str,
    *,
    bound_fn: Callable[[Any], jax.Array] | None = None,
    noise_scale_fn: Callable[[Any], PyTree] | None = None,
    end_step_fn: Callable[[Any], Any] | None = None,
    scales_from_norms: NormScalesFn | None = None,
) -> PerExampleClipping:
  """A :class:`PerExampleClipping` from its parts (see :class:`ClipSpec`).

  ``scales_from_norms``, when given, must clip exactly as ``clip_fn`` does.
  A clipping whose rule is a function of the per-example norms is better
  built with :func:`clip_fn_from_norms`, which derives ``clip_fn`` from it.
  """
  return PerExampleClipping(ClipSpec(
      init=init_fn, clip=clip_fn, l2_bound=float(l2_bound), name=name,
      bound_fn=bound_fn, noise_scale_fn=noise_scale_fn,
      end_step_fn=end_step_fn, scales_from_norms=scales_from_norms))


def batch_size_of(tree: PyTree, what: str = 'per-example gradients') -> int:
  """The leading size shared by every leaf of ``tree``, or a clear error."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f'{what} must be a non-empty pytree of arrays.')
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f'every leaf of the {what} must share the same leading size (a common'
        f' batch dimension in axis 0); got leading sizes'
        f' {sorted(map(str, sizes))}. Stack examples along axis 0.')
  return sizes.pop()


def row_sq_norm(x: jax.Array) -> jax.Array:
  """[B] squared L2 norm of each row of ``x`` [B, ...], in float32."""
  return jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1),
                 axis=1)


def per_leaf_sq_norms(per_example_grads: PyTree) -> PyTree:
  """[B] squared L2 norm of each example's gradient, leaf by leaf."""
  batch_size_of(per_example_grads)
  return jax.tree.map(row_sq_norm, per_example_grads)


def per_example_global_norms(per_example_grads: PyTree) -> jax.Array:
  """[B] global L2 norm of each example's gradient, computed in float32."""
  return jnp.sqrt(sum(jax.tree.leaves(per_leaf_sq_norms(per_example_grads))))


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


# The clip body: every clipping rule in dpjax gives per-example factors from
# per-example norms (NormScales); this is the one place where they are
# applied to gradient rows, and where padding and non-finite rows become
# exact zeros.


def scaled_row_sum(
    x: jax.Array, scale: jax.Array, keep: jax.Array,
    elementwise: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """sum_b where(keep_b, f(scale_b * x_b), 0) over the leading axis.

  ``f`` is ``elementwise`` (e.g. an L-inf clamp) or the identity. ``where``
  (not a multiplication by zero) keeps a NaN row from reaching the sum:
  NaN * 0 is NaN.
  """
  shape = (-1,) + (1,) * (x.ndim - 1)
  scaled = x * scale.reshape(shape).astype(x.dtype)
  if elementwise is not None:
    scaled = elementwise(scaled)
  return jnp.sum(jnp.where(keep.reshape(shape), scaled, 0), axis=0)


def scale_and_sum(
    per_example_grads: PyTree, scale: jax.Array, keep: jax.Array
) -> PyTree:
  """sum_b keep_b * scale_b * g_b, exact zeros where ``keep`` is False."""
  return jax.tree.map(lambda x: scaled_row_sum(x, scale, keep),
                      per_example_grads)


def clip_by_scales(
    per_example_grads: PyTree, scales: NormScales,
    elementwise: Callable[[jax.Array], jax.Array] | None = None,
) -> ClipOutput:
  """The clipped sum of ``per_example_grads`` by factors from their norms."""
  grad_sum = jax.tree.map(
      lambda x, s: scaled_row_sum(x, s, scales.keep, elementwise),
      per_example_grads, scales.scales)
  return ClipOutput(grad_sum, scales.norms, scales.num_nonfinite,
                    scales.num_clipped)


def clip_fn_from_norms(
    scales_fn: NormScalesFn,
    elementwise: Callable[[jax.Array], jax.Array] | None = None,
) -> ClipFn:
  """The :data:`ClipFn` of a rule on per-example norms (``scales_fn``).

  The clip function measures each leaf's per-example squared norms, asks
  ``scales_fn`` for the factors and applies them with :func:`clip_by_scales`
  (then ``elementwise`` to every scaled coordinate, if given): the same rule
  the ghost routes apply from norms they compute without the gradients.
  """

  def clip_fn(per_example_grads, state, mask):
    scales, state = scales_fn(per_leaf_sq_norms(per_example_grads), state,
                              mask)
    return clip_by_scales(per_example_grads, scales, elementwise), state

  return clip_fn


class _Rows(NamedTuple):
  """Which rows of a batch count, from their global norms."""

  keep: jax.Array           # real and finite
  norms: jax.Array          # as reported: 0 on padding, +inf if non-finite
  num_nonfinite: jax.Array


def _screen_rows(norms: jax.Array, mask: jax.Array | None) -> _Rows:
  mask = as_mask(mask, norms.shape[0])
  finite = jnp.isfinite(norms)
  return _Rows(keep=mask & finite,
               norms=jnp.where(mask, jnp.where(finite, norms, jnp.inf), 0.0),
               num_nonfinite=jnp.sum(mask & ~finite))


def _total_norms(sq_norms: PyTree) -> jax.Array:
  return jnp.sqrt(sum(x.astype(jnp.float32)
                      for x in jax.tree.leaves(sq_norms)))


def global_norm_scales(
    sq_norms: PyTree, mask: jax.Array | None,
    scale_of: Callable[[jax.Array], jax.Array],
    clipped_of: Callable[[jax.Array], jax.Array],
) -> NormScales:
  """:class:`NormScales` of a rule on each example's global norm.

  ``sq_norms`` holds per-example squared norms of the gradient's parts;
  ``scale_of(norms)`` is the rule's [B] factor, ``clipped_of(norms)`` which
  rows count as clipped. Padding and non-finite rows are not kept. Upper
  bounds of the norms (ghost norms) keep the bound R of a rule with
  ``n * scale_of(n) <= R`` that does not grow with n: the true norm n' <= n
  then gives ``n' * scale_of(n) <= n * scale_of(n) <= R``.
  """
  norms = _total_norms(sq_norms)
  rows = _screen_rows(norms, mask)
  scale = scale_of(norms)
  return NormScales(
      scales=jax.tree.map(lambda _: scale, sq_norms), keep=rows.keep,
      norms=rows.norms, num_nonfinite=rows.num_nonfinite,
      num_clipped=jnp.sum(rows.keep & clipped_of(norms)))


def global_rule_clipping(
    l2_bound: float, name: str,
    scale_of: Callable[[jax.Array], jax.Array],
    clipped_of: Callable[[jax.Array], jax.Array],
    *,
    elementwise: Callable[[jax.Array], jax.Array] | None = None,
    cls: type[PerExampleClipping] = PerExampleClipping,
    **fields: Any,
) -> PerExampleClipping:
  """A stateless clipping by a rule on each example's global norm.

  Each kept row g_b contributes ``f(scale_of(||g_b||) g_b)`` (``f`` is
  ``elementwise`` or the identity); ``fields`` are the extra fields of
  ``cls.spec_type``. Without ``elementwise`` the clipping also runs from
  norms alone (``scales_from_norms``).
  """

  def scales_fn(sq_norms, state, mask):
    return global_norm_scales(sq_norms, mask, scale_of, clipped_of), state

  return cls(cls.spec_type(
      init=optax.init_empty_state, clip=clip_fn_from_norms(scales_fn,
                                                           elementwise),
      l2_bound=float(l2_bound), name=name,
      scales_from_norms=None if elementwise else scales_fn, **fields))


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
  return global_rule_clipping(bound, 'flat', flat_scale(bound),
                              lambda n: n > bound)


def flat_scale(bound: float) -> Callable[[jax.Array], jax.Array]:
  """The factor min(1, C / n) of flat clipping to C, as a function of n."""
  return lambda n: bound / jnp.maximum(n, bound)


# Per-layer clipping (McMahan et al. 2018; Andrew et al. 2021, per layer).
#
# A clip group is a node of the parameter pytree: every leaf of a *prefix*
# tree of thresholds names the subtree it covers (a single tensor, a whole
# module, or the root for flat clipping). Each example's gradient is clipped
# group by group, so its contribution has norm at most sqrt(sum_i C_i^2).

LAYER_RULES: tuple[str, ...] = ('equal', 'size', 'sqrt_size')
LAYER_GROUPS: tuple[str, ...] = ('tensor', 'module')
LAYER_NOISE: tuple[str, ...] = ('isotropic', 'per_layer')


class LayerClipState(NamedTuple):
  """Per-group thresholds: a pytree prefix of the parameters, float32 leaves."""

  clip_norms: PyTree


def _group_subtrees(clip_norms: PyTree, tree: PyTree, fn) -> PyTree:
  """``fn(threshold, subtree)`` for each group; clip_norms is a prefix of tree."""
  try:
    return jax.tree.map(fn, clip_norms, tree)
  except ValueError as e:
    raise ValueError(
        'the per-layer clip norms must be a pytree prefix of the gradients'
        ' (one positive threshold per parameter group); got thresholds with'
        f' structure {jax.tree.structure(clip_norms)} for gradients with'
        f' structure {jax.tree.structure(tree)}.') from e


def group_norm_scales(sq_norms: PyTree, clip_norms: PyTree,
                      mask: jax.Array | None) -> tuple[NormScales, PyTree]:
  """:class:`NormScales` of clipping every group to its threshold.

  ``sq_norms`` holds per-example squared norms of each parameter (the
  gradients' structure); ``clip_norms`` is a prefix of it with one threshold
  C_i per group. Group i of example b is scaled by C_i / max(n_bi, C_i). A
  row with any non-finite group (or whose global squared norm overflows)
  is not kept. Also returns the per-group norms (a tree shaped like
  ``clip_norms`` with [B] leaves). Upper bounds of the norms (ghost norms)
  keep every group within its threshold, as for :func:`global_norm_scales`.
  """
  group_sq = _group_subtrees(clip_norms, sq_norms, lambda _, sub: sum(
      x.astype(jnp.float32) for x in jax.tree.leaves(sub)))
  rows = _screen_rows(_total_norms(group_sq), mask)
  norms = jax.tree.map(jnp.sqrt, group_sq)
  group_scales = jax.tree.map(lambda c, n: c / jnp.maximum(n, c), clip_norms,
                              norms)
  scales = _group_subtrees(group_scales, sq_norms,
                           lambda s, sub: jax.tree.map(lambda _: s, sub))
  clipped = functools.reduce(
      jnp.logical_or,
      jax.tree.leaves(jax.tree.map(lambda c, n: n > c, clip_norms, norms)))
  return NormScales(scales, rows.keep, rows.norms, rows.num_nonfinite,
                    jnp.sum(rows.keep & clipped)), norms


def threshold_bound(state: Any) -> jax.Array:
  """sqrt(sum_i C_i^2) of the thresholds ``state.clip_norms``.

  The add/remove sensitivity of clipping every group to its threshold, for
  any state with a ``clip_norms`` field (per-layer, adaptive).
  """
  return jnp.sqrt(sum(jnp.square(c) for c in jax.tree.leaves(state.clip_norms)))


def total_bound(clip_norms: PyTree) -> float:
  """sqrt(sum_i C_i^2) of explicit thresholds, each checked to be > 0."""
  leaves = jax.tree.leaves(clip_norms)
  if not leaves:
    raise ValueError('clip_norms must hold at least one threshold.')
  return sum(_validation.positive('per-layer clip norm', float(c)) ** 2
             for c in leaves) ** 0.5


def initial_clip_norms(params: PyTree, clip_norms: PyTree | None,
                       clip_norm: float, rule: str | None,
                       groups: str) -> PyTree:
  """Float32 thresholds: explicit ones, one flat C, or C split by a rule."""
  if clip_norms is None:
    clip_norms = clip_norm if rule is None else per_layer_clip_norms(
        params, clip_norm, rule, groups)
  return jax.tree.map(lambda c: jnp.asarray(c, jnp.float32), clip_norms)


def _group_sizes(params: PyTree, groups: str) -> PyTree:
  """Parameter count of each group: per leaf, or per top-level module."""
  if groups not in LAYER_GROUPS:
    raise ValueError(f'groups must be one of {LAYER_GROUPS}, got {groups!r}.')
  size = lambda sub: sum(int(jnp.size(x)) for x in jax.tree.leaves(sub))
  if groups == 'tensor':
    return jax.tree.map(size, params)
  if not hasattr(params, 'items'):
    raise ValueError(
        "groups='module' needs parameters that are a mapping of module name"
        f' to subtree (a flax params dict); got {type(params).__name__}.')
  return {k: size(v) for k, v in params.items()}


def per_layer_clip_norms(
    params: PyTree, clip_norm: float, rule: str = 'equal',
    groups: str = 'tensor',
) -> PyTree:
  """Per-group thresholds C_i with sum_i C_i^2 = C^2, by a data-free rule.

  Rules: ``'equal'``, C_i = C / sqrt(K) for K groups; ``'size'``, C_i
  proportional to the group's parameter count n_i; ``'sqrt_size'``, C_i
  proportional to sqrt(n_i) (every coordinate gets the same share of C^2).
  Whatever the rule, the clipped sum's sensitivity stays C.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dpjax import clipping
    >>> params = {'a': jnp.zeros(3), 'b': jnp.zeros(1)}
    >>> norms = clipping.per_layer_clip_norms(params, 2.0, 'sqrt_size')
    >>> {k: round(v, 4) for k, v in norms.items()}
    {'a': 1.7321, 'b': 1.0}

  Args:
    params: the parameters (or any tree with their structure and shapes).
    clip_norm: the total bound C.
    rule: ``'equal'``, ``'size'`` or ``'sqrt_size'``.
    groups: ``'tensor'`` (one group per parameter array) or ``'module'`` (one
      per top-level entry of the params dict, e.g. a flax layer).

  Returns:
    A pytree prefix of ``params`` with one float threshold per group.

  References:
    McMahan et al., 2018. A General Approach to Adding Differential Privacy
    to Iterative Training Procedures. https://arxiv.org/abs/1812.06210
  """
  clip_norm = _validation.positive('clip_norm', clip_norm)
  if rule not in LAYER_RULES:
    raise ValueError(f'rule must be one of {LAYER_RULES}, got {rule!r}.')
  sizes = _group_sizes(params, groups)
  weight = {'equal': lambda n: 1.0, 'size': float,
            'sqrt_size': lambda n: float(n) ** 0.5}[rule]
  weights = jax.tree.map(weight, sizes)
  total = sum(w * w for w in jax.tree.leaves(weights)) ** 0.5
  return jax.tree.map(lambda w: clip_norm * w / total, weights)


def _per_layer_bound(clip_norms: PyTree | None, clip_norm: float | None,
                     rule: str) -> float:
  """The total bound of explicit thresholds or of C split by ``rule``."""
  if (clip_norms is None) == (clip_norm is None):
    raise ValueError(
        'give exactly one of clip_norms (explicit thresholds) and clip_norm'
        f' (with a rule); got clip_norms={clip_norms!r},'
        f' clip_norm={clip_norm!r}.')
  if clip_norms is not None:
    return total_bound(clip_norms)
  if rule not in LAYER_RULES:
    raise ValueError(f'rule must be one of {LAYER_RULES}, got {rule!r}.')
  return _validation.positive('clip_norm', clip_norm)


def clip_per_layer(
    clip_norms: PyTree | None = None,
    *,
    clip_norm: float | None = None,
    rule: str = 'equal',
    groups: str = 'tensor',
    noise: str = 'isotropic',
) -> PerExampleClipping:
  """Clips each parameter group of each example to its own norm, and sums.

  Give the thresholds either explicitly (``clip_norms``, a pytree prefix of
  the parameters with a positive float per group) or by a rule
  (``clip_norm`` and ``rule``, see :func:`per_layer_clip_norms`; resolved by
  ``init(params)``). The thresholds live in the state
  (:class:`LayerClipState`), so a public schedule may replace them between
  steps. One example's contribution has norm <= sqrt(sum_i C_i^2), the
  add/remove sensitivity; non-finite and padding rows contribute zero.

  ``noise`` picks how the noise is shaped (it never changes the sum):
  ``'isotropic'`` (std sigma x sqrt(sum_i C_i^2) everywhere) or
  ``'per_layer'`` (std sigma x sqrt(K) x C_i on group i: the same Gaussian
  mechanism, i.e. the same epsilon for noise multiplier sigma, since each of
  the K groups divided by its scale has sensitivity 1 / sqrt(K); a user who
  wants std sigma' C_i per group pays noise multiplier sigma' / sqrt(K)).

  Examples:
    >>> import jax.numpy as jnp
    >>> import dpjax
    >>> clip = dpjax.clip_per_layer({'a': 1.0, 'b': 0.5})
    >>> grads = {'a': jnp.array([[3.0, 4.0]]), 'b': jnp.array([[0.3]])}
    >>> summed, state = clip.update(grads, clip.init(grads))
    >>> [round(float(v), 4) for v in summed['a']], float(summed['b'][0])
    ([0.6, 0.8], 0.30000001192092896)
    >>> round(clip.sensitivity(), 4)
    1.118

  Args:
    clip_norms: explicit per-group thresholds, or None to use a rule.
    clip_norm: the total bound C of a rule (exclusive with ``clip_norms``).
    rule: ``'equal'``, ``'size'`` or ``'sqrt_size'``.
    groups: ``'tensor'`` or ``'module'`` (see :func:`per_layer_clip_norms`).
    noise: ``'isotropic'`` or ``'per_layer'``.

  Returns:
    A :class:`PerExampleClipping` with :class:`LayerClipState`.

  References:
    McMahan et al., 2018. A General Approach to Adding Differential Privacy
    to Iterative Training Procedures. https://arxiv.org/abs/1812.06210
  """
  bound = _per_layer_bound(clip_norms, clip_norm, rule)
  if noise not in LAYER_NOISE:
    raise ValueError(f'noise must be one of {LAYER_NOISE}, got {noise!r}.')

  def init_fn(params):
    return LayerClipState(initial_clip_norms(params, clip_norms, bound, rule,
                                             groups))

  def scales_fn(sq_norms, state, mask):
    scales, _ = group_norm_scales(sq_norms, state.clip_norms, mask)
    return scales, state

  def noise_scale_fn(state):
    if noise == 'isotropic':
      return threshold_bound(state)
    num_groups = len(jax.tree.leaves(state.clip_norms))
    return jax.tree.map(lambda c: num_groups ** 0.5 * c, state.clip_norms)

  return PerExampleClipping(ClipSpec(
      init=init_fn, clip=clip_fn_from_norms(scales_fn), l2_bound=bound,
      name='per_layer', bound_fn=threshold_bound,
      noise_scale_fn=noise_scale_fn, scales_from_norms=scales_fn))


# Automatic clipping (Bu et al. 2023) and normalization (De et al. 2022).

DEFAULT_MIN_NORM = 1e-6


def _normalizing_clipping(bound: float, denominator, name: str):
  # Every row is rescaled, so every kept row counts as clipped. The scale is
  # bounded by bound / floor, so a row whose float32 norm underflows (true
  # norm ~1e-19) stays far below the bound.
  return global_rule_clipping(bound, name, lambda n: bound / denominator(n),
                              lambda n: jnp.ones_like(n, bool))


def clip_automatic(l2_norm_clip: float, gamma: float = 0.01
                   ) -> PerExampleClipping:
  """Automatic clipping: each row becomes g R / (||g|| + gamma), then sums.

  Every row is rescaled (none passes unchanged), to norm R ||g|| / (||g|| +
  gamma) < R, so the sum's sensitivity is R (2R under replace-one); rows with
  tiny norms are scaled by at most R / gamma and stay tiny. Non-finite and
  padding rows contribute exactly zero.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dpjax
    >>> clip = dpjax.clip_automatic(1.0, gamma=0.01)
    >>> grads = {'w': jnp.array([[3.0, 4.0], [0.0, 0.0]])}
    >>> summed, _ = clip.update(grads, clip.init(None))
    >>> [round(float(v), 4) for v in summed['w']]
    [0.5988, 0.7984]

  Args:
    l2_norm_clip: R > 0, the norm every row is rescaled towards.
    gamma: stability constant > 0 (Bu et al. use 0.01). For De et al.'s exact
      normalization use :func:`clip_normalized`.

  Returns:
    A :class:`PerExampleClipping` transform.

  References:
    Bu, Wang, Zha, Karypis, 2023. Automatic Clipping: Differentially Private
    Deep Learning Made Easier and Stronger. https://arxiv.org/abs/2206.07136
  """
  bound = _validation.positive('l2_norm_clip', l2_norm_clip)
  gamma = _validation.positive(
      'gamma', gamma, ' For exact normalization use clip_normalized.')
  return _normalizing_clipping(bound, lambda n: n + gamma, 'automatic')


def clip_normalized(l2_norm_clip: float,
                    min_norm: float = DEFAULT_MIN_NORM) -> PerExampleClipping:
  """Normalizes each row to norm R (g R / ||g||), then sums.

  Rows with norm below ``min_norm`` are scaled by R / ``min_norm`` instead
  (their norm stays below R), which keeps an all-zero or underflowing row
  bounded. Sensitivity R (2R under replace-one); non-finite and padding rows
  contribute exactly zero.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dpjax
    >>> clip = dpjax.clip_normalized(2.0)
    >>> grads = {'w': jnp.array([[3.0, 4.0], [0.0, 0.0], [0.03, 0.04]])}
    >>> summed, _ = clip.update(grads, clip.init(None))
    >>> [round(float(v), 4) for v in summed['w']]
    [2.4, 3.2]

  Args:
    l2_norm_clip: R > 0, the norm of every normalized row.
    min_norm: rows below this norm are not normalized but scaled by
      R / min_norm.

  Returns:
    A :class:`PerExampleClipping` transform.

  References:
    De, Berrada, Hayes, Smith, Balle, 2022. Unlocking High-Accuracy
    Differentially Private Image Classification through Scale.
    https://arxiv.org/abs/2204.13650
  """
  bound = _validation.positive('l2_norm_clip', l2_norm_clip)
  min_norm = _validation.positive('min_norm', min_norm)
  return _normalizing_clipping(
      bound, lambda n: jnp.maximum(n, min_norm), 'normalized')
