"""Per-example gradients and their clipped sum, microbatched.

The engine of DP-SGD (Abadi et al. 2016): per-example gradients come from
``jax.vmap`` of ``jax.grad`` of the user's one-example loss; a ``lax.scan`` over
microbatches keeps peak memory proportional to the microbatch (only
``microbatch_size x num_params`` per-example gradients are alive at a time),
and the clipping transform is applied to each microbatch before its rows are
summed into the running total.

Privacy invariants touched here (DESIGN.md, 1, 2 and 6): padding rows
(``mask=False``) and non-finite rows contribute exactly zero (the clipping
transform enforces it and this module counts them); the result is a clipped
SUM, so however the batch is cut into microbatches the noise is added once,
afterwards, by :mod:`dpjax.noise`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dpjax import batch_loss as batch_loss_lib
from dpjax import clipping as clipping_lib
from dpjax import sampling

PyTree = Any
LossFn = Callable[..., Any]


class _Required:
  """The default of an engine's ``mask``: it has to be given."""

  def __repr__(self) -> str:
    return '<required>'


MASK_REQUIRED: Any = _Required()


def examples_and_mask(batch: PyTree, mask: Any) -> tuple[PyTree, Any]:
  """The examples and mask of an engine call (invariant 7).

  A :class:`dpjax.Batch` carries its mask; a bare pytree needs ``mask``
  spelled out, because a padded Poisson batch repeats example 0 in its
  padding and counting those rows would silently weaken the bound. An
  explicit ``mask=None`` states that every row is a real example.
  """
  if isinstance(batch, sampling.Batch):
    if mask is not MASK_REQUIRED:
      raise ValueError(
          'the batch is a dpjax.Batch, which carries its own mask; do not'
          ' pass mask= as well.')
    return batch.examples, batch.mask
  if mask is MASK_REQUIRED:
    raise TypeError(
        "a clipped-gradient function needs the batch's mask: pass"
        ' sampler.sample(step).take(data) (a dpjax.Batch, which carries it)'
        ' or mask=...; mask=None only if every row is a real example (a'
        ' padded batch without its mask counts example 0 once per padding'
        ' row).')
  return batch, mask


class StepInputs(NamedTuple):
  """What a step feeds the per-example loss besides the example itself.

  One named pytree, passed as the loss's third argument by every engine, so
  that features wrapping the loss (augmentation multiplicity, pruning,
  normalization policies, dropout) read their field by name whatever order
  they were stacked in. Fields a run does not use stay None.

  Attributes:
    aug_key: the step's augmentation key (stream ``keys.AUGMENT``); each
      example folds in its dataset index (:mod:`dpjax.augmult`).
    dropout_key: the step's dropout key (stream ``keys.DROPOUT``); each
      example folds in its dataset index, so its mask does not depend on its
      row, microbatch or device.
    model_state: non-parameter collections the loss runs with (BatchNorm
      statistics under a :mod:`dpjax.normalization` policy).
    public: the step's public batch (public BatchNorm statistics).
    param_mask: the step's parameter mask (:mod:`dpjax.pruning`).
  """

  aug_key: Any = None
  dropout_key: Any = None
  model_state: PyTree = None
  public: PyTree = None
  param_mask: PyTree = None


class PerExampleStats(NamedTuple):
  """Per-example diagnostics of one clipped-gradient call.

  Attributes:
    losses: [B] per-example losses (0 on padding rows).
    norms: [B] per-example gradient norms before clipping (0 on padding rows,
      +inf on non-finite rows).
    num_nonfinite: number of real examples whose gradient was non-finite and
      therefore zeroed.
    num_clipped: number of real examples whose norm exceeded the clip bound.
    aux: per-example auxiliary outputs of the loss (``has_aux=True``), else None.
  """

  losses: jax.Array
  norms: jax.Array
  num_nonfinite: jax.Array
  num_clipped: jax.Array
  aux: PyTree = None


class ClippedGrad(NamedTuple):
  """Output of a clipped-gradient call: the sum, the clip state, diagnostics."""

  grad_sum: PyTree
  clip_state: Any
  stats: PerExampleStats


def batch_size_of(batch: PyTree) -> int:
  """The leading size shared by every leaf of ``batch``, or a clear error."""
  return clipping_lib.batch_size_of(batch, 'batch')


def per_example_grads(
    loss_fn: LossFn, has_aux: bool = False
) -> Callable[..., tuple[Any, PyTree]]:
  """Vectorizes ``loss_fn(params, example, *args)`` over a batch.

  Returns ``fn(params, batch, *args) -> (losses, grads)`` (``((losses, aux),
  grads)`` with ``has_aux``) where every leaf of ``grads`` has a leading batch
  axis: row b is the gradient of example b's loss alone.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def fn(params, batch, *args):
    in_axes = (None, 0) + (None,) * len(args)
    return jax.vmap(grad_fn, in_axes=in_axes)(params, batch, *args)

  return fn


def mask_param_grads(per_example_grads: PyTree,
                     param_mask: PyTree | None) -> PyTree:
  """Per-example gradients cut to a parameter mask (None: unchanged).

  ``param_mask`` has the parameters' structure with boolean leaves of their
  shapes; every coordinate outside it becomes an exact zero in every row (a
  select, never a product, so a NaN there cannot reach the norm). This is
  the per-example gradient of :func:`dpjax.pruning.masked_loss`.
  """
  if param_mask is None:
    return per_example_grads
  return jax.tree.map(
      lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)),
      per_example_grads, param_mask)


def check_param_mask(params: PyTree, param_mask: PyTree | None) -> None:
  """A clear error unless ``param_mask`` is None or shaped like ``params``."""
  if param_mask is None:
    return
  shapes = lambda t: jax.tree.map(jnp.shape, t)
  if (jax.tree.structure(param_mask) != jax.tree.structure(params)
      or shapes(param_mask) != shapes(params)):
    raise ValueError(
        'param_mask must have the structure and shapes of the parameters'
        f' (one boolean per coordinate); got {shapes(param_mask)} for'
        f' parameters {shapes(params)}.')


def _pad_rows(x: jax.Array, extra: int) -> jax.Array:
  pad = [(0, extra)] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, pad)


def clipped_grad(
    loss_fn: LossFn,
    clipping: clipping_lib.PerExampleClipping,
    *,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    keep_batch_dim: bool = False,
) -> Callable[..., ClippedGrad]:
  """Builds the per-example (vmap) clipped-gradient function ``fn``.

  ``fn(params, batch, mask, *, clip_state=None, args=(), param_mask=None)``:
  ``batch`` is a :class:`dpjax.Batch` (examples with their mask, from
  ``sampler.sample(step).take(data)``), or a pytree of examples with
  ``mask`` given: a padded batch cannot reach clipping without its mask.
  The returned function computes, for a batch of B examples,
  ``sum_b clip(grad loss_fn(params, batch[b], *args))`` over rows with
  ``mask[b]`` True, together with per-example losses and norms. With
  ``microbatch_size=m`` it scans over ceil(B / m) equal microbatches of at
  most m rows (padded with fewer masked rows than microbatches, so B need not
  be divisible by m); peak memory then grows with m, not B. The result does not depend on m.
  With ``param_mask`` (a pruning mask, :mod:`dpjax.pruning`), each
  per-example gradient is cut to it before clipping
  (:func:`mask_param_grads`), as with ``pruning.masked_loss(loss_fn)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import dpjax
    >>> def loss(w, ex):
    ...   return 0.5 * (ex['x'] @ w - ex['y']) ** 2
    >>> fn = dpjax.clipped_grad(loss, dpjax.clip_per_example(1.0),
    ...                         microbatch_size=2)
    >>> batch = {'x': jnp.ones((5, 3)), 'y': jnp.zeros(5)}
    >>> out = jax.jit(fn)(jnp.ones(3), batch, jnp.arange(5) < 4)
    >>> [round(g, 4) for g in out.grad_sum.tolist()], int(out.stats.num_clipped)
    ([2.3094, 2.3094, 2.3094], 4)

  Args:
    loss_fn: ``loss_fn(params, example, *args) -> scalar`` (or ``(scalar,
      aux)`` with ``has_aux``) for ONE example without a batch axis.
    clipping: a :class:`dpjax.PerExampleClipping` transform (e.g.
      :func:`dpjax.clip_per_example`), applied to each microbatch.
    microbatch_size: rows per vectorized chunk; None processes the whole batch
      at once. A performance setting only: it never changes the result.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    keep_batch_dim: ``loss_fn`` is the loss of a BATCH (a scalar mean or
      sum, or a [batch] vector), evaluated on each example as a batch of one
      (:func:`dpjax.batch_loss.batch_of_one`; as jax_privacy's
      ``keep_batch_dim=True``). Mean and sum give the same gradient there.

  Returns:
    A function returning :class:`ClippedGrad` ``(grad_sum, clip_state,
    stats)``. Call it under ``jax.jit``.
  """
  check_microbatch_size(microbatch_size)
  if keep_batch_dim:
    loss_fn = batch_loss_lib.batch_of_one(loss_fn, has_aux=has_aux)
  grads_fn = per_example_grads(loss_fn, has_aux=has_aux)

  def chunk_fn(params, param_mask, chunk, chunk_mask, clip_state, args):
    values, grads = grads_fn(params, chunk, *args)
    losses, aux = values if has_aux else (values, None)
    out, clip_state = clipping.clip(mask_param_grads(grads, param_mask),
                                    clip_state, chunk_mask)
    losses = jnp.where(chunk_mask, losses, 0.0)
    return out, clip_state, losses, aux

  def fn(params, batch, mask=MASK_REQUIRED, *, clip_state=None,
         args=(), param_mask=None) -> ClippedGrad:
    batch, mask = examples_and_mask(batch, mask)
    check_param_mask(params, param_mask)
    return microbatched(functools.partial(chunk_fn, params, param_mask),
                        params, batch, mask, clip_state, clipping,
                        microbatch_size, args)

  return fn


def check_microbatch_size(microbatch_size: int | None) -> None:
  """A clear error unless ``microbatch_size`` is a positive int or None."""
  if microbatch_size is not None and (
      isinstance(microbatch_size, bool)
      or not isinstance(microbatch_size, int)
      or microbatch_size <= 0
  ):
    raise ValueError(
        f'microbatch_size must be a positive integer or None, got'
        f' {microbatch_size!r}.'
    )


def chunking(size: int, microbatch_size: int | None) -> tuple[int, int]:
  """``(num_chunks, rows per chunk)`` covering ``size`` rows.

  As few chunks as ``microbatch_size`` allows, of equal size (a scan needs
  that), with the rows spread evenly over them: fewer than ``num_chunks``
  padding rows, never more than ``microbatch_size`` rows per chunk. Filling
  chunks of exactly ``microbatch_size`` instead would compute a Poisson batch
  padded to 8232 rows as 3 x 4096 = 12288 rows; here it is 3 x 2744.
  """
  if microbatch_size is None or microbatch_size >= size:
    return 1, size
  num_chunks = -(-size // microbatch_size)
  return num_chunks, -(-size // num_chunks)


def microbatched(
    chunk_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    mask: jax.Array | None,
    clip_state: Any,
    clipping: clipping_lib.PerExampleClipping,
    microbatch_size: int | None,
    args: tuple[Any, ...],
) -> ClippedGrad:
  """Runs ``chunk_fn`` over microbatches and sums the clipped chunks.

  ``chunk_fn(chunk, chunk_mask, clip_state, args) -> (ClipOutput, clip_state,
  losses, aux)`` clips one chunk of m rows; the clip state is threaded
  through the chunks, the sums accumulate in float32 and the per-example
  statistics are concatenated (rows of the padded last chunk dropped).
  """
  size = batch_size_of(batch)
  mask = clipping_lib.as_mask(mask, size)
  if clip_state is None:
    clip_state = clipping.init(params)
  num_chunks, m = chunking(size, microbatch_size)

  if num_chunks == 1:
    out, clip_state, losses, aux = chunk_fn(
        batch, mask, clip_state, args)
    stats = PerExampleStats(
        losses, out.norms, out.num_nonfinite, out.num_clipped, aux)
    return ClippedGrad(out.grad_sum, clip_state, stats)

  extra = num_chunks * m - size
  chunks = jax.tree.map(
      lambda x: _pad_rows(jnp.asarray(x), extra).reshape(
          (num_chunks, m) + jnp.shape(x)[1:]), batch)
  chunk_masks = _pad_rows(mask, extra).reshape(num_chunks, m)
  # zeros_like keeps the inputs' device-varying type under jax.shard_map,
  # where the scan's initial carry must match its body's outputs.
  zeros = jax.tree.map(
      lambda p: jnp.zeros_like(p, jnp.promote_types(
          jnp.result_type(p), jnp.float32)), params)

  def body(carry, xs):
    acc, state, nonfinite, clipped = carry
    chunk, chunk_mask = xs
    out, state, losses, aux = chunk_fn(chunk, chunk_mask, state, args)
    acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, out.grad_sum)
    carry = (acc, state, nonfinite + out.num_nonfinite,
             clipped + out.num_clipped)
    return carry, (losses, out.norms, aux)

  count = jnp.zeros_like(chunk_masks[0, 0], jnp.int32)
  init = (zeros, clip_state, count, count)
  (grad_sum, clip_state, nonfinite, clipped), ys = jax.lax.scan(
      body, init, (chunks, chunk_masks))
  losses, norms, aux = jax.tree.map(
      lambda y: y.reshape((num_chunks * m,) + y.shape[2:])[:size], ys)
  stats = PerExampleStats(losses, norms, nonfinite, clipped, aux)
  return ClippedGrad(grad_sum, clip_state, stats)
