"""Parameter freezing and per-step parameter selection for DP-SGD.

Implements Adamczewski & Park 2023 ("Differential Privacy Meets Neural Network
Pruning"): DP-SGD adds noise to every coordinate it updates, so updating fewer
coordinates spends less noise. Two modes:

* freezing: one mask, chosen before private training, marks the coordinates
  that ever move; the others stay bit-identical;
* selection: a new mask every step marks the coordinates that move at that
  step.

A mask is applied to each per-example gradient BEFORE clipping
(:func:`masked_loss` cuts the gradient outside it), so whatever clipping mode
runs bounds the masked gradient and the sensitivity is the clipping's own;
the noise and the optimizer's update are then zeroed outside the mask
(:func:`mask_updates`, :func:`masked_chain`), so noise falls on the selected
coordinates only and its norm shrinks with the square root of the kept
fraction.

Privacy invariant owned here (DESIGN.md, invariant 5): a mask is released with
every update (the coordinates that did not move), so it may depend only on
data-independent rules (a seeded random draw, the weights themselves, which are
already private outputs) or on the PUBLIC split. A mask source computed from
the private training set without noise is refused with an error that says why
(:class:`PruningConfig`). Such masks cost no privacy: the accountant's event is
the one of plain DP-SGD.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpjax import _validation
from dpjax import clipping as clipping_lib
from dpjax import keys as keys_lib

PyTree = Any
LossFn = Callable[..., jax.Array]

MODES: tuple[str, ...] = ('none', 'freeze', 'select')
SCOPES: tuple[str, ...] = ('global', 'per_layer')
# Source -> modes it serves. Each reads only a PRNG key, the weights or the
# public split.
SOURCES: dict[str, tuple[str, ...]] = {
    'random': ('freeze', 'select'),
    'magnitude_init': ('freeze',),
    'magnitude_current': ('select',),
    'public_magnitude': ('freeze',),
    'public_gradient': ('freeze', 'select'),
}
PUBLIC_SOURCES: tuple[str, ...] = ('public_magnitude', 'public_gradient')
# Sources a user may reasonably ask for that read the PRIVATE training set.
_PRIVATE_SOURCES: dict[str, str] = {
    'gradient': 'gradient magnitude on the private training set',
    'magnitude_gradient': 'gradient magnitude on the private training set',
    'private_gradient': 'gradient magnitude on the private training set',
    'train_gradient': 'gradient magnitude on the private training set',
    'private_magnitude': 'weight magnitude after non-private training on the'
                         ' private training set',
    'train_magnitude': 'weight magnitude after non-private training on the'
                       ' private training set',
}


def _check_source(source: str) -> str:
  if source in _PRIVATE_SOURCES or source.startswith(('private_', 'train_')):
    what = _PRIVATE_SOURCES.get(source, 'statistics of the private training set')
    raise ValueError(
        f'pruning source {source!r} ({what}) is refused: a mask is released'
        ' with every update (the coordinates that stay put), so a mask'
        ' computed from private data without noise leaks it, and no'
        ' accountant charges for it. Use a data-independent source'
        " ('random', 'magnitude_init', 'magnitude_current') or public data"
        " ('public_gradient', 'public_magnitude' with"
        ' config.data.public_fraction > 0).')
  if source not in SOURCES:
    raise ValueError(
        f'pruning source must be one of {sorted(SOURCES)}, got {source!r}.')
  return source


@dataclasses.dataclass(frozen=True)
class PruningConfig:
  """Which coordinates DP-SGD updates, and where the mask comes from.

  Attributes:
    mode: 'none' (update everything), 'freeze' (one mask before training) or
      'select' (a new mask every step).
    keep_fraction: fraction in (0, 1] of coordinates that move (per step for
      'select').
    source: how coordinates are scored; the top ``keep_fraction`` are kept.
      'random' (a seeded uniform draw), 'magnitude_init' (|w| at
      initialization; freeze), 'magnitude_current' (|w| at the step; select),
      'public_magnitude' (|w| after ``public_pretrain_steps`` of SGD on the
      public split, which private training then starts from; freeze),
      'public_gradient' (|gradient| of the mean loss on a public batch).
      Sources that read the private training set are refused.
    scope: 'global' (top coordinates over the whole model) or 'per_layer'
      (the same fraction in every parameter array).
    public_batch_size: public examples per gradient for 'public_gradient'
      and per pre-training step for 'public_magnitude'.
    public_pretrain_steps: SGD steps on the public split for
      'public_magnitude' (0 for every other source).
    public_learning_rate: learning rate of that pre-training (SGD, momentum
      0.9).
  """

  mode: str = 'none'
  keep_fraction: float = 1.0
  source: str = 'random'
  scope: str = 'global'
  public_batch_size: int = 256
  public_pretrain_steps: int = 0
  public_learning_rate: float = 0.1

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'pruning mode must be one of {MODES}, got'
                       f' {self.mode!r}.')
    _check_source(self.source)
    if self.scope not in SCOPES:
      raise ValueError(f'pruning scope must be one of {SCOPES}, got'
                       f' {self.scope!r}.')
    keep = _validation.positive('keep_fraction', self.keep_fraction)
    if keep > 1:
      raise ValueError(
          f'keep_fraction must lie in (0, 1], got {self.keep_fraction!r}.')
    if self.mode != 'none' and self.mode not in SOURCES[self.source]:
      hint = {
          'magnitude_current': " A frozen mask is chosen once, before"
                               " training: use 'magnitude_init'.",
          'magnitude_init': " A mask that never changes is freezing: use"
                            " mode='freeze'.",
          'public_magnitude': " A mask that never changes is freezing: use"
                              " mode='freeze'.",
      }.get(self.source, '')
      raise ValueError(
          f'pruning source {self.source!r} serves modes'
          f' {SOURCES[self.source]}, not {self.mode!r}.{hint}')
    _validation.positive_int('public_batch_size', self.public_batch_size)
    if self.source == 'public_magnitude':
      _validation.positive_int(
          'public_pretrain_steps', self.public_pretrain_steps,
          " 'public_magnitude' ranks the weights after pre-training on the"
          ' public split.')
      _validation.positive('public_learning_rate', self.public_learning_rate)
    elif self.public_pretrain_steps != 0:
      raise ValueError(
          f'public_pretrain_steps={self.public_pretrain_steps!r} is only used'
          f" by source 'public_magnitude', not {self.source!r}; set it to 0.")

  @property
  def needs_public_data(self) -> bool:
    return self.mode != 'none' and self.source in PUBLIC_SOURCES


class PruningState(NamedTuple):
  """The mask of the current step and the key of the next random draw.

  Attributes:
    mask: boolean pytree with the params' structure; True marks coordinates
      that move at this step.
    key: the pruning stream's root; draw t uses ``keys.for_step(key, t)``.
    count: number of draws so far.
  """

  mask: PyTree
  key: jax.Array
  count: jax.Array


class Pruner(NamedTuple):
  """An init/update pair that chooses masks (build it with :func:`make_pruner`).

  Attributes:
    init: ``init(params, key, public=None) -> (params, PruningState)``: the
      parameters private training starts from (pre-trained on the public split
      for 'public_magnitude', else unchanged) and the first mask state (the
      frozen mask for 'freeze'; all True for 'select').
    update: ``update(state, params, public=None) -> PruningState``: the mask
      of the next step (unchanged for 'freeze'). Call it before every step.
  """

  init: Callable[..., tuple[PyTree, PruningState]]
  update: Callable[..., PruningState]


def num_kept(size: int, keep_fraction: float) -> int:
  """round(keep_fraction * size), at least 1: the coordinates a mask keeps."""
  return max(1, min(size, int(round(keep_fraction * size))))


def _top_k_flat(scores: jax.Array, k: int) -> jax.Array:
  if k >= scores.size:
    return jnp.ones(scores.shape, bool)
  # A NaN score (a public gradient that overflowed) must never be selected
  # ahead of a finite one.
  scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
  _, idx = jax.lax.top_k(scores, k)
  return jnp.zeros(scores.shape, bool).at[idx].set(True)


def top_k_mask(scores: PyTree, keep_fraction: float,
               scope: str = 'global') -> PyTree:
  """Marks the ``keep_fraction`` highest-scoring coordinates of a pytree.

  Exactly :func:`num_kept` coordinates are marked over the whole tree
  (``scope='global'``) or in every leaf (``scope='per_layer'``); ties go to
  the lower index.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dpjax import pruning
    >>> scores = {'a': jnp.array([3.0, 1.0]), 'b': jnp.array([2.0, 0.0])}
    >>> mask = pruning.top_k_mask(scores, 0.5)
    >>> mask['a'].tolist(), mask['b'].tolist()
    ([True, False], [True, False])
    >>> pruning.top_k_mask(scores, 0.25, 'per_layer')['b'].tolist()
    [True, False]

  Args:
    scores: pytree of arrays; larger means more worth updating.
    keep_fraction: fraction in (0, 1] of coordinates to keep.
    scope: 'global' or 'per_layer'.

  Returns:
    A boolean pytree with the structure and shapes of ``scores``.
  """
  if scope not in SCOPES:
    raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}.')
  leaves, treedef = jax.tree.flatten(scores)
  if scope == 'per_layer':
    masks = [_top_k_flat(jnp.ravel(x), num_kept(x.size, keep_fraction))
             .reshape(x.shape) for x in leaves]
  else:
    flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
    mask = _top_k_flat(flat, num_kept(flat.size, keep_fraction))
    ends = list(itertools.accumulate(x.size for x in leaves))[:-1]
    masks = [m.reshape(x.shape) for m, x in zip(jnp.split(mask, ends), leaves)]
  return jax.tree.unflatten(treedef, masks)


def random_scores(key: jax.Array, params: PyTree) -> PyTree:
  """Independent U(0, 1) scores: their top-k is a uniformly random subset."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.uniform(k, jnp.shape(x)) for k, x in zip(keys, leaves)])


def magnitude_scores(params: PyTree) -> PyTree:
  """|w|: magnitude pruning keeps the largest weights."""
  return jax.tree.map(jnp.abs, params)


def _mean_loss(loss_fn: LossFn):
  def mean_loss(params, batch):
    return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch))
  return mean_loss


def public_batch(key: jax.Array, public: PyTree, batch_size: int) -> PyTree:
  """``batch_size`` distinct rows of the public split, drawn with ``key``."""
  n = clipping_lib.batch_size_of(public)
  idx = jax.random.choice(key, n, (min(batch_size, n),), replace=False)
  return jax.tree.map(lambda x: x[idx], public)


def public_gradient_scores(params: PyTree, loss_fn: LossFn,
                           batch: PyTree) -> PyTree:
  """|gradient| of the mean of ``loss_fn`` over a PUBLIC batch."""
  return magnitude_scores(jax.grad(_mean_loss(loss_fn))(params, batch))


def pretrain_on_public(params: PyTree, loss_fn: LossFn, public: PyTree,
                       key: jax.Array, steps: int, learning_rate: float,
                       batch_size: int) -> PyTree:
  """Non-private SGD (momentum 0.9) on the public split; costs no privacy."""
  tx = optax.sgd(learning_rate, momentum=0.9)
  grad_fn = jax.grad(_mean_loss(loss_fn))

  def body(carry, step_key):
    p, opt_state = carry
    grads = grad_fn(p, public_batch(step_key, public, batch_size))
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (params, _), _ = jax.lax.scan(
      body, (params, tx.init(params)), jax.random.split(key, steps))
  return params


def _require_public(public: PyTree | None, source: str) -> PyTree:
  if public is None:
    raise ValueError(
        f'pruning source {source!r} needs public data: set'
        ' config.data.public_fraction > 0 (the public split is held out of'
        ' the private set). It never falls back to the training set: a mask'
        ' computed from private data without noise would leak it.')
  return public


def make_pruner(config: PruningConfig,
                loss_fn: LossFn | None = None) -> Pruner:
  """Builds the mask init/update pair that ``config`` describes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dpjax import pruning
    >>> pruner = pruning.make_pruner(pruning.PruningConfig(
    ...     mode='select', keep_fraction=0.5, source='magnitude_current'))
    >>> params = {'w': jnp.array([0.1, -2.0, 0.5, 3.0])}
    >>> params, state = pruner.init(params, jax.random.key(0))
    >>> pruner.update(state, params).mask['w'].tolist()
    [False, True, False, True]

  Args:
    config: the pruning settings; mode 'none' is refused (no pruner needed).
    loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example; required
      by the public sources, which average it over public batches.

  Returns:
    A :class:`Pruner`.

  References:
    Adamczewski & Park, 2023. Differential Privacy Meets Neural Network
    Pruning. https://arxiv.org/abs/2303.04612
  """
  if config.mode == 'none':
    raise ValueError("pruning mode 'none' updates every coordinate; build no"
                     " pruner (set mode to 'freeze' or 'select').")
  if config.source in PUBLIC_SOURCES and loss_fn is None:
    raise ValueError(f'pruning source {config.source!r} needs loss_fn to'
                     ' compute on the public split.')
  source, keep, scope = config.source, config.keep_fraction, config.scope

  def choose(key, params, public):
    if source == 'random':
      scores = random_scores(key, params)
    elif source in ('magnitude_init', 'magnitude_current', 'public_magnitude'):
      scores = magnitude_scores(params)
    else:  # public_gradient
      batch = public_batch(key, _require_public(public, source),
                           config.public_batch_size)
      scores = public_gradient_scores(params, loss_fn, batch)
    return top_k_mask(scores, keep, scope)

  def init_fn(params, key, public=None):
    key, count = keys_lib.init_stream(key)
    if config.mode == 'select':
      return params, PruningState(
          jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params), key,
          count)
    pretrain_key, draw_key = jax.random.split(keys_lib.for_step(key, count))
    if source == 'public_magnitude':
      params = pretrain_on_public(
          params, loss_fn, _require_public(public, source), pretrain_key,
          config.public_pretrain_steps, config.public_learning_rate,
          config.public_batch_size)
    return params, PruningState(choose(draw_key, params, public), key,
                                count + 1)

  def update_fn(state, params, public=None):
    if config.mode == 'freeze':
      return state
    draw_key = keys_lib.for_step(state.key, state.count)
    return PruningState(choose(draw_key, params, public), state.key,
                        state.count + 1)

  return Pruner(init_fn, update_fn)


def mask_params(params: PyTree, param_mask: PyTree) -> PyTree:
  """``params`` whose gradient is cut outside ``param_mask``.

  The values are unchanged; ``jax.grad`` through the result is exactly zero
  on masked coordinates (a ``select``, not a product: a NaN or Inf cotangent
  there becomes an exact zero instead of poisoning the row).
  """
  return jax.tree.map(
      lambda p, m: jnp.where(m, p, jax.lax.stop_gradient(p)), params,
      param_mask)


def masked_loss(loss_fn: LossFn) -> LossFn:
  """``loss(params, example, inputs)``: gradient only on ``inputs.param_mask``.

  The gradient of the returned loss is ``loss_fn``'s per-example gradient
  with every coordinate outside ``param_mask`` set to exactly zero, so the
  mask applies to each per-example gradient BEFORE clipping: hand it to any
  engine (:func:`dpjax.clipped_grad`, batch clipping, the device mesh) with
  ``args=(dpjax.StepInputs(param_mask=...),)`` and any clipping mode bounds
  the masked
  gradient. The mask is data-independent or public, hence the same on
  neighbouring datasets, so the sensitivity is the clipping's own.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dpjax
    >>> from dpjax import pruning
    >>> loss = pruning.masked_loss(lambda w, ex, inputs: jnp.sum(w * ex['g']))
    >>> fn = dpjax.clipped_grad(loss, dpjax.clip_per_example(1.0))
    >>> batch = {'g': jnp.array([[100.0, 0.3]])}   # mass on a masked coordinate
    >>> inputs = dpjax.StepInputs(param_mask=jnp.array([False, True]))
    >>> out = fn(jnp.zeros(2), batch, None, args=(inputs,))
    >>> [round(float(v), 4) for v in out.grad_sum]
    [0.0, 0.3]

  Args:
    loss_fn: ``loss_fn(params, example, inputs) -> scalar`` (or ``(scalar,
      aux)``) for ONE example (:class:`dpjax.StepInputs`).

  Returns:
    The loss, reading the mask from ``inputs.param_mask``.

  References:
    Adamczewski & Park, 2023. Differential Privacy Meets Neural Network
    Pruning. https://arxiv.org/abs/2303.04612
  """

  def loss(params, example, inputs):
    if inputs.param_mask is None:
      raise ValueError('masked_loss needs StepInputs(param_mask=...).')
    return loss_fn(mask_params(params, inputs.param_mask), example, inputs)

  return loss


def mask_updates(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner``, then zeroes its output outside ``param_mask``.

  Coordinate-level ``optax.masked``-style composition: ``update(updates,
  state, params=None, *, param_mask, ...)``. Wrapping the noise transform puts
  noise on the selected coordinates only (the clipped sum is already zero
  elsewhere); wrapping the optimizer keeps momentum, Adam moments and weight
  decay from moving unselected coordinates. The output there is -0.0, the
  additive identity of every float (+0.0 is not for -0.0), so those
  parameters stay bit-identical.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from dpjax import pruning
    >>> tx = pruning.mask_updates(optax.add_decayed_weights(0.5))
    >>> params = {'w': jnp.array([2.0, 4.0])}
    >>> out, _ = tx.update({'w': jnp.zeros(2)}, tx.init(params), params,
    ...                    param_mask={'w': jnp.array([True, False])})
    >>> out['w'].tolist()
    [1.0, -0.0]

  Args:
    inner: any optax transform (extra arguments are passed on to it).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state; its
    ``update`` requires ``param_mask`` (a boolean pytree like the params).

  References:
    Adamczewski & Park, 2023. Differential Privacy Meets Neural Network
    Pruning. https://arxiv.org/abs/2303.04612
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, *, param_mask=None,
                **extra_args):
    if param_mask is None:
      raise ValueError(
          'mask_updates needs param_mask=; without it masked coordinates'
          ' would receive noise and move.')
    out, state = inner.update(updates, state, params, **extra_args)
    out = jax.tree.map(
        lambda u, m: jnp.where(m, u, jnp.array(-0.0, u.dtype)), out,
        param_mask)
    return out, state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def masked_chain(noise: optax.GradientTransformation,
                 optimizer: optax.GradientTransformation,
                 mode: str) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(noise, optimizer)`` with the masks ``mode`` needs.

  The noise is always masked: noise falls on the selected coordinates only,
  so the noisy gradient is zero elsewhere. Under 'freeze' the optimizer is
  masked too, so momentum, Adam's epsilon and weight decay never move a
  frozen coordinate. Under 'select' the optimizer sees the sparse noisy
  gradient unmasked: its state (momentum, Adam moments) keeps moving
  coordinates selected at earlier steps, as an optimizer fed the sparse
  gradient of the selected coordinates does; masking it would discard most
  of each gradient's momentum (a coordinate kept with probability p would
  apply about p of it).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from dpjax import pruning
    >>> tx = pruning.masked_chain(optax.identity(), optax.sgd(1.0, 0.5),
    ...                           'select')
    >>> params, mask = {'w': jnp.zeros(2)}, {'w': jnp.array([True, False])}
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.ones(2)}, state, params, param_mask=mask)
    >>> out, _ = tx.update({'w': jnp.ones(2)}, state, params,
    ...                    param_mask={'w': jnp.array([False, True])})
    >>> out['w'].tolist()   # momentum carries the first coordinate
    [-0.5, -1.0]

  Args:
    noise: the noise transform (e.g. ``plan.noise(key)``).
    optimizer: any optax optimizer.
    mode: 'freeze' or 'select'.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``param_mask``.
  """
  if mode not in ('freeze', 'select'):
    raise ValueError(f"mode must be 'freeze' or 'select', got {mode!r}.")
  if mode == 'freeze':
    optimizer = mask_updates(optimizer)
  return optax.chain(mask_updates(noise), optimizer)


def summary(config: PruningConfig, params: PyTree) -> dict[str, Any]:
  """The pruning facts of a run, for summary.json."""
  sizes = [x.size for x in jax.tree.leaves(params)]
  total = sum(sizes)
  if config.scope == 'per_layer':
    kept = sum(num_kept(s, config.keep_fraction) for s in sizes)
  else:
    kept = num_kept(total, config.keep_fraction)
  return {
      'mode': config.mode,
      'source': config.source,
      'scope': config.scope,
      'keep_fraction': config.keep_fraction,
      'num_params': total,
      'num_updated_per_step': kept,
      'mask_privacy': ('public data' if config.source in PUBLIC_SOURCES
                       else 'data-independent'),
      'noise_norm_ratio': math.sqrt(kept / total),
  }
