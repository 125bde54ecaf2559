"""Batch clipping (BC) and adaptive layerwise clipping (ALC), made sound.

Implements Nguyen, Nguyen, Nguyen, van Dijk 2023 ("Batch Clipping and
Adaptive Layerwise Clipping for Differential Private Stochastic Gradient
Descent") on the analysis of van Dijk et al. 2022 ("Generalizing DP-SGD with
Shuffling and Batch Clipping").

Batch clipping: a batch of s examples is cut into K = s / m groups of m; the
gradient of each group's MEAN loss (divisor m, a public constant) is clipped
to C, the K clipped vectors are summed, noise N(0, (2 C sigma)^2) is added
and the sum is divided by the public K. m = 1 is per-example clipping; m = s
clips the batch once. Because a group's gradient is one clipped quantity,
BatchNorm may run in training mode inside a group (the group loss hook
below); its updated statistics come back as ``aux`` and are NOT covered by
the gradient's bound: the caller must never release them unprotected.

ALC: per-layer thresholds C_i = C n_i / max_j n_j from layer gradient norms
n_i on PUBLIC data only (never the private set, which the authors' rule does
not require but their guarantee does), optionally recomputed every epoch with
a decaying C. Sound noise either rescales the C_i so that sum_i C_i^2 = C^2
(isotropic noise, sensitivity C) or keeps per-layer noise proportional to C_i
and pays sqrt(L) in the noise multiplier (see
:func:`dpjax.clipping.clip_per_layer`).

Privacy invariants owned here (DESIGN.md, 1, 4 and 5): one example changes
one group's clipped vector, so the sum moves by at most 2C (replace-one; also
add/remove once m > 1, since a group's vector may jump anywhere in its
C-ball); padding rows are zeroed before the group loss and excluded by the
mask; the thresholds are functions of public data and public constants.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import _validation
from dpjax import clipping as clipping_lib
from dpjax import per_example

PyTree = Any
GroupLossFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupClipSpec(clipping_lib.ClipSpec):
  """:class:`dpjax.clipping.ClipSpec` of a clipping of group gradients.

  Attributes:
    group_size: m, the examples per group.
  """

  group_size: int


class BatchClipping(clipping_lib.PerExampleClipping):
  """A clipping transform applied to group gradients, with BC's sensitivity.

  Beyond :class:`dpjax.PerExampleClipping` it carries ``group_size`` (m).
  With m > 1 one example moves its group's clipped vector anywhere in the
  C-ball, so the sensitivity is 2C under add/remove too.
  """

  spec_type = GroupClipSpec
  spec: GroupClipSpec
  group_size = property(lambda self: self.spec.group_size)

  def relation_factor(self, relation=clipping_lib.NeighboringRelation
                      .ADD_OR_REMOVE_ONE) -> float:
    factor = super().relation_factor(relation)
    return 2.0 if self.group_size > 1 else factor


def clip_groups_of(clipping: clipping_lib.PerExampleClipping,
                   group_size: int) -> BatchClipping:
  """``clipping`` applied to the gradients of groups of ``group_size``.

  Examples:
    >>> import dpjax
    >>> from dpjax import batch_clipping
    >>> bc = batch_clipping.clip_groups_of(dpjax.clip_per_example(1.0), 8)
    >>> bc.sensitivity(), bc.group_size
    (2.0, 8)

  Args:
    clipping: how each group gradient is clipped (flat or per layer).
    group_size: m >= 1.

  Returns:
    A :class:`BatchClipping` with the same state and clip function. It
    clips group gradients, which only :func:`batch_clipped_grad` computes,
    so it declares no ``scales_from_norms`` (no per-example route).
  """
  group_size = _validation.positive_int('group_size', group_size)
  fields = clipping_lib.spec_fields(clipping.spec)
  fields.update(name=f'batch_{clipping.name}', scales_from_norms=None)
  return BatchClipping(GroupClipSpec(**fields, group_size=group_size))


def group_loss_from_example_loss(loss_fn: Callable[..., Any],
                                 group_size: int) -> GroupLossFn:
  """The group loss of a one-example loss: masked sum over the group / m.

  The divisor is the public group size m, never the number of real rows.
  """
  group_size = _validation.positive_int('group_size', group_size)

  def group_loss(params, group, group_mask, *args):
    in_axes = (None, 0) + (None,) * len(args)
    losses = jax.vmap(loss_fn, in_axes=in_axes)(params, group, *args)
    return jnp.sum(jnp.where(group_mask, losses, 0.0)) / group_size

  return group_loss


def _groups(batch: PyTree, mask: jax.Array | None, m: int) -> PyTree:
  """``{'rows': [K, m, ...], 'mask': [K, m]}``, padding rows zeroed."""
  size = per_example.batch_size_of(batch)
  if size % m:
    raise ValueError(
        f'the batch has {size} rows, not a multiple of the group size'
        f' {m}; pad it (with mask=False rows) to a multiple of {m}.')
  mask = clipping_lib.as_mask(mask, size)
  # A masked row must not reach the gradient even through a zero cotangent
  # (0 * NaN = NaN), so its values are replaced by zeros.
  clean = jax.tree.map(
      lambda x: jnp.where(mask.reshape((-1,) + (1,) * (jnp.ndim(x) - 1)),
                          x, jnp.zeros((), jnp.result_type(x))), batch)
  return {'rows': jax.tree.map(
      lambda x: x.reshape((size // m, m) + jnp.shape(x)[1:]), clean),
          'mask': mask.reshape(size // m, m)}


def batch_clipped_grad(
    group_loss_fn: GroupLossFn,
    clipping: BatchClipping,
    *,
    microbatch_size: int | None = None,
    has_aux: bool = False,
) -> Callable[..., per_example.ClippedGrad]:
  """Builds the batch-clipping engine ``fn``.

  ``fn(params, batch, mask, *, clip_state=None, args=(), param_mask=None)``:
  ``batch`` and ``mask`` as in :func:`dpjax.clipped_grad` (a
  :class:`dpjax.Batch`, or examples with their mask), ``param_mask`` cuts
  every group gradient to a pruning mask before it is clipped. The batch of
  s rows (s a multiple of m = ``clipping.group_size``) is cut into K = s / m
  consecutive groups; ``fn`` returns the sum over groups of
  ``clip(grad group_loss_fn(params, group, group_mask, *args))``. Padding
  rows (``mask`` False) are zeroed before the group loss sees them, and a
  group with no real row contributes nothing. The group loss must exclude
  masked rows from its sum and from any batch statistics, and divide by m.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import dpjax
    >>> from dpjax import batch_clipping
    >>> def group_loss(w, group, group_mask):
    ...   return jnp.sum(jnp.where(group_mask, group @ w, 0.0)) / 2
    >>> bc = batch_clipping.clip_groups_of(dpjax.clip_per_example(1.0), 2)
    >>> fn = batch_clipping.batch_clipped_grad(group_loss, bc)
    >>> rows = jnp.array([[4., 0.], [2., 0.], [0., .2], [0., .4]])
    >>> out = fn(jnp.zeros(2), rows, mask=None)
    >>> [round(float(g), 4) for g in out.grad_sum]
    [1.0, 0.3]

  Args:
    group_loss_fn: ``group_loss_fn(params, group, group_mask, *args) ->
      loss`` (or ``(loss, aux)`` with ``has_aux``); ``group`` has leading
      axis m, ``group_mask`` is bool [m]. BatchNorm in training mode may run
      inside it; ``aux`` may carry its updated statistics.
    clipping: a :class:`BatchClipping` (see :func:`clip_groups_of`).
    microbatch_size: GROUPS per vectorized chunk (None: all at once).
      Performance only.
    has_aux: whether the group loss returns ``(loss, aux)``.

  Returns:
    A function returning :class:`dpjax.ClippedGrad` whose ``stats`` are per
    group ([K] losses, norms; ``aux`` stacked over groups).

  References:
    Nguyen, Nguyen, Nguyen, van Dijk, 2023. Batch Clipping and Adaptive
    Layerwise Clipping for Differential Private Stochastic Gradient Descent.
    https://arxiv.org/abs/2307.11939
  """
  if not isinstance(clipping, BatchClipping):
    raise TypeError(
        'batch_clipped_grad needs a BatchClipping (its sensitivity is 2C);'
        ' wrap the clipping with batch_clipping.clip_groups_of(clipping, m).')
  m = clipping.group_size

  def one_group_loss(params, group, *args):
    return group_loss_fn(params, group['rows'], group['mask'], *args)

  inner = per_example.clipped_grad(
      one_group_loss, clipping, microbatch_size=microbatch_size,
      has_aux=has_aux)

  def fn(params, batch, mask=per_example.MASK_REQUIRED, *, clip_state=None,
         args=(), param_mask=None) -> per_example.ClippedGrad:
    groups = _groups(*per_example.examples_and_mask(batch, mask), m)
    return inner(params, groups, groups['mask'].any(axis=1),
                 clip_state=clip_state, args=args, param_mask=param_mask)

  return fn


# Adaptive layerwise clipping (ALC) thresholds from public data.

ALC_MIN_FRACTION = 1e-3


def group_norms(grads: PyTree, groups: str = 'tensor') -> PyTree:
  """L2 norm of each clip group of ``grads`` (a prefix tree of scalars)."""
  norm = lambda sub: jnp.sqrt(sum(
      jnp.sum(jnp.square(x.astype(jnp.float32)))
      for x in jax.tree.leaves(sub)))
  if groups == 'tensor':
    return jax.tree.map(norm, grads)
  if groups == 'module':
    if not hasattr(grads, 'items'):
      raise ValueError(
          "groups='module' needs parameters that are a mapping of module"
          f' name to subtree; got {type(grads).__name__}.')
    return {k: norm(v) for k, v in grads.items()}
  raise ValueError(f'groups must be one of {clipping_lib.LAYER_GROUPS}, got'
                   f' {groups!r}.')


def alc_clip_norms(public_grads: PyTree, clip_norm: float, *,
                   groups: str = 'tensor', rescale: bool = True) -> PyTree:
  """ALC thresholds C_i = C n_i / max_j n_j from a PUBLIC gradient.

  n_i is group i's norm in ``public_grads``; a group whose public gradient
  (nearly) vanishes gets C x 1e-3 rather than a zero threshold. With
  ``rescale`` the C_i are scaled so that sum_i C_i^2 = C^2 (isotropic noise
  at sensitivity C); without, the largest is C and the sensitivity is
  sqrt(sum_i C_i^2) > C (the authors' thresholds, for per-layer noise).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dpjax import batch_clipping
    >>> g = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([1.0])}
    >>> c = batch_clipping.alc_clip_norms(g, 1.0, rescale=False)
    >>> {k: round(float(v), 4) for k, v in c.items()}
    {'a': 1.0, 'b': 0.2}

  Args:
    public_grads: a gradient computed on public data only.
    clip_norm: C (the largest threshold, or the total after rescaling).
    groups: ``'tensor'`` or ``'module'``.
    rescale: whether to rescale to sum_i C_i^2 = C^2.

  Returns:
    A pytree prefix of the parameters with one float32 threshold per group.

  References:
    Nguyen, Nguyen, Nguyen, van Dijk, 2023. Batch Clipping and Adaptive
    Layerwise Clipping for Differential Private Stochastic Gradient Descent.
    https://arxiv.org/abs/2307.11939
  """
  norms = group_norms(public_grads, groups)
  largest = functools.reduce(jnp.maximum, jax.tree.leaves(norms))
  thresholds = jax.tree.map(
      lambda n: clip_norm * jnp.maximum(n / largest, ALC_MIN_FRACTION), norms)
  if rescale:
    total = jnp.sqrt(sum(jnp.square(c) for c in jax.tree.leaves(thresholds)))
    thresholds = jax.tree.map(lambda c: c * clip_norm / total, thresholds)
  return thresholds


class LayerwiseThresholds:
  """The ALC schedule of a training run: thresholds from public data.

  At step 0, and (with ``every_epoch``) at the first step of every epoch,
  the thresholds are recomputed from the gradient of the mean loss over a
  fixed public batch at the current parameters, with C decayed as
  C x decay^epoch. The parameters are themselves a DP output, and nothing
  else private enters, so the thresholds cost no privacy. (The authors'
  code first trains a copy of the model briefly on the public data; here the
  norms are measured at the training parameters themselves.)

  Args:
    loss_fn: the one-example loss ``loss_fn(params, example)``.
    public_batch: a batch of PUBLIC examples (``DataSplits.public``).
    clip_norm: C at epoch 0.
    steps_per_epoch: logical steps per epoch (public).
    groups: ``'tensor'`` or ``'module'``.
    rescale: see :func:`alc_clip_norms`.
    every_epoch: recompute at every epoch start (else only at step 0).
    decay: C's factor per epoch when recomputing (the authors use 0.9).
  """

  def __init__(self, loss_fn: Callable[..., Any], public_batch: PyTree,
               clip_norm: float, steps_per_epoch: int, *,
               groups: str = 'tensor', rescale: bool = True,
               every_epoch: bool = False, decay: float = 1.0):
    self.clip_norm = _validation.positive('clip_norm', clip_norm)
    self.steps_per_epoch = _validation.positive_int(
        'steps_per_epoch', steps_per_epoch)
    self.decay = _validation.positive('alc_decay', decay)
    self.every_epoch = bool(every_epoch)
    self.public_batch = public_batch

    def mean_loss(params, batch):
      return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch))

    def thresholds(params, batch, clip_norm):
      grads = jax.grad(mean_loss)(params, batch)
      return alc_clip_norms(grads, clip_norm, groups=groups, rescale=rescale)

    self._thresholds = jax.jit(thresholds)

  def due(self, step: int) -> bool:
    """Whether the thresholds are (re)computed before step ``step``."""
    return step == 0 or (self.every_epoch
                         and step % self.steps_per_epoch == 0)

  def __call__(self, params: PyTree, step: int) -> PyTree:
    """The thresholds for the epoch of ``step``, at ``params``."""
    epoch = step // self.steps_per_epoch if self.every_epoch else 0
    clip_norm = np.float32(self.clip_norm * self.decay ** epoch)
    norms = self._thresholds(params, self.public_batch, clip_norm)
    if not all(np.isfinite(np.asarray(c)) for c in jax.tree.leaves(norms)):
      raise ValueError(
          'the public gradient used for the ALC thresholds is not finite;'
          ' check the public data and the learning rate.')
    return norms
