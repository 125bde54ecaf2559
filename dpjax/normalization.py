"""Normalization layers under DP: a policy for each data-dependent collection.

Flax Linen keeps BatchNorm statistics in the ``batch_stats`` collection. In
training mode they are computed over the batch, so one example changes every
other example's gradient and per-example clipping no longer bounds its
influence; under ``vmap`` the same layer silently becomes a per-example op.
dpjax makes the choice explicit, per collection (``config.normalization.policy``):

* ``reject`` (default): DP training of a model with such state is an error.
* ``public``: every BatchNorm normalizes with statistics of a PUBLIC batch only,
  in training and at evaluation (the sound form of Davody et al. 2020,
  "On the effect of normalization layers on differentially private training
  of deep neural networks"); per-example gradients stay independent, with or
  without gradients flowing through the public statistics. Each step uses a
  fresh public batch's statistics at the step's parameters; evaluation uses
  those of a fixed public batch at the evaluated parameters (never a running
  average of past parameters' statistics, which lags behind the weights).
* ``frozen``: statistics fixed (from public data, or the initial values),
  scale and bias still trained.
* ``privatized``: statistics updated from noised sums of clipped per-example
  feature moments (after Tramer & Boneh 2021, "Differentially Private Learning
  Needs Better Features"), released on the same Poisson batch as the gradient
  and accounted with it as one Gaussian mechanism.
* ``privatized_once``: statistics estimated once, before training, from the
  whole private training set at the initial parameters (a noised sum of
  clipped per-example moments: Tramer & Boneh 2021's private data
  normalization of ScatterNet features), then frozen; the release is one
  Gaussian mechanism, composed with the steps in the accountant.
* ``batch``: training-mode BatchNorm over a batch-clipping group only (Nguyen
  et al. 2023, "Batch Clipping and Adaptive Layerwise Clipping for
  Differential Private Stochastic Gradient Descent"), where the whole group's
  gradient is one clipped quantity; evaluation normalizes with public
  statistics (a fixed public batch's, at the evaluated parameters) or with
  each evaluation batch's own.

Other mutable collections accept ``reject`` or ``frozen``. GroupNorm,
LayerNorm, ScaleNorm and weight standardization need no policy.

Privacy invariant owned here (DESIGN.md, 5): anything data-dependent that
leaves a step (BatchNorm statistics) is computed from public data only, or
noised and accounted, or refused with a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from dpjax import _validation
from dpjax import clipping as clipping_lib
from dpjax import keys as keys_lib
from dpjax import lora
from dpjax import losses
from dpjax.per_example import StepInputs

PyTree = Any
BATCH_STATS = 'batch_stats'
POLICIES: tuple[str, ...] = ('reject', 'public', 'frozen', 'privatized',
                             'privatized_once', 'batch')
# Policies that only make sense for BatchNorm statistics.
BATCHNORM_POLICIES: tuple[str, ...] = ('public', 'privatized',
                                       'privatized_once', 'batch')
# Rows per forward pass of the privatized_once release (memory only).
ONCE_CHUNK = 512
EVAL_STATISTICS: tuple[str, ...] = ('public', 'batch')

ALTERNATIVES = (
    "Choose config.normalization.policy: 'public' (statistics from a public"
    ' batch; needs config.data.public_fraction > 0 or config.data.'
    "public_dataset), 'frozen' (statistics fixed, from public data or the"
    " initial values), 'privatized' (noised statistics, charged to the"
    " accountant), 'privatized_once' (noised once over the private set"
    " before training, charged to the accountant) or 'batch' (training-mode"
    " BatchNorm inside batch-clipping"
    " groups); or use a model without them (config.model.norm='group').")


@dataclasses.dataclass(frozen=True)
class NormalizationConfig:
  """How DP training treats the model's data-dependent collections.

  Attributes:
    policy: one of :data:`POLICIES` for every collection, or per collection
      as ``'batch_stats:public,cache:frozen'``.
    public_batch_size: public examples per step whose statistics the
      ``public`` policy normalizes with (also the size of the fixed public
      batch that evaluation normalizes with, and that ``frozen`` and
      ``privatized`` initialize from).
    stats_gradient: ``public`` only: whether gradients flow through the public
      statistics (they depend on the parameters, never on private data).
    momentum: ``privatized`` only: decay of the running estimate that the
      noised statistics are averaged into.
    stats_clip_norm: ``privatized`` and ``privatized_once``: L2 bound on each
      example's moment vector, all layers together (``privatized``: its
      deviation from the current statistics; ``privatized_once``: the raw
      moments).
    stats_budget: ``privatized``: the share of each step's privacy spent on
      the statistics, in (0, 1): with the step's effective noise multiplier
      sigma, the gradient gets sigma / sqrt(1 - share) and the statistics
      sigma / sqrt(share), which together cost exactly what a gradient step
      at sigma costs.
    eval_statistics: ``batch`` only: 'public' (statistics of a fixed public
      batch at the evaluated parameters) or 'batch' (each evaluation batch's
      own statistics).
    once_noise_multiplier: ``privatized_once``: sigma of the one release
      (noise std ``sigma * stats_clip_norm`` on the clipped sum); Tramer &
      Boneh used 6-8 for each of their two moments.
  """

  policy: str = 'reject'
  public_batch_size: int = 32
  stats_gradient: bool = False
  momentum: float = 0.9
  stats_clip_norm: float = 10.0
  stats_budget: float = 0.1
  eval_statistics: str = 'public'
  once_noise_multiplier: float = 8.0


def parse_policy(policy: str, collections: list[str] | tuple[str, ...]
                 ) -> dict[str, str]:
  """Collection -> policy, from ``'name'`` or ``'coll:name,coll:name'``.

  Examples:
    >>> parse_policy('public', ['batch_stats'])
    {'batch_stats': 'public'}
    >>> parse_policy('batch_stats:privatized,cache:frozen',
    ...              ['batch_stats', 'cache'])
    {'batch_stats': 'privatized', 'cache': 'frozen'}
  """
  if not isinstance(policy, str) or not policy:
    raise ValueError(
        f'normalization.policy must be a non-empty string, got {policy!r}.')
  if ':' not in policy:
    chosen = {c: policy.strip() for c in collections}
  else:
    chosen = {}
    for item in policy.split(','):
      name, sep, value = item.partition(':')
      if not sep:
        raise ValueError(
            f'normalization.policy {policy!r}: write every entry as'
            ' collection:policy, e.g. "batch_stats:public".')
      chosen[name.strip()] = value.strip()
    unknown = sorted(set(chosen) - set(collections))
    if unknown:
      raise ValueError(
          f'normalization.policy names collections {unknown} the model does'
          f' not have; it has {sorted(collections)}.')
    for c in collections:
      chosen.setdefault(c, 'reject')
  for c, p in chosen.items():
    if p not in POLICIES:
      raise ValueError(
          f'normalization.policy for {c!r} must be one of {POLICIES}, got'
          f' {p!r}.')
    if c != BATCH_STATS and p in BATCHNORM_POLICIES:
      raise ValueError(
          f'policy {p!r} applies to BatchNorm statistics ({BATCH_STATS!r})'
          f" only; collection {c!r} accepts 'reject' or 'frozen'.")
  return chosen


def check_policies(policies: Mapping[str, str], *, has_public: bool,
                   batch_clipping: bool) -> None:
  """Refuses policies a DP run cannot honour, naming the fix."""
  rejected = sorted(c for c, p in policies.items() if p == 'reject')
  if rejected:
    raise ValueError(
        f'The model declares mutable collections {rejected} (e.g. BatchNorm'
        ' statistics in batch_stats). They depend on the data of every'
        ' example in a batch, so per-example clipping no longer bounds one'
        f" example's influence, and DP training rejects them by default."
        f' {ALTERNATIVES}')
  needs_public = sorted(c for c, p in policies.items() if p == 'public')
  if needs_public and not has_public:
    raise ValueError(
        f"policy 'public' for {needs_public} needs public data: set"
        ' config.data.public_fraction > 0 (a held-out slice of the training'
        ' set) or config.data.public_dataset (another dataset).')
  if policies.get(BATCH_STATS) == 'batch' and not batch_clipping:
    raise ValueError(
        "normalization policy 'batch' runs BatchNorm in training mode over a"
        ' batch-clipping group, which is sound only when the whole group\'s'
        ' gradient is clipped as one quantity; it requires batch clipping,'
        " which this run does not use. Set privacy.clipping.mode='batch'"
        ' (with clipping.group_size > 1), or choose'
        " 'public', 'frozen' or 'privatized'.")


# ---------------------------------------------------------------------------
# BatchNorm moments, read from every nn.BatchNorm call by a method interceptor.


def _feature_axes(module: nn.BatchNorm, ndim: int) -> tuple[int, ...]:
  axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
  return tuple(a % ndim for a in axes)


def moments(x: jax.Array, feature_axes: tuple[int, ...],
            mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Mean and mean square over all axes but ``feature_axes`` (float32).

  Examples:
    >>> m = moments(jnp.array([[1.0, 2.0], [3.0, 6.0]]), (1,))
    >>> m['mean'].tolist(), m['meansq'].tolist()
    ([2.0, 4.0], [5.0, 20.0])
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  if mask is not None:
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
  return {'mean': jnp.mean(x, axes, where=mask),
          'meansq': jnp.mean(jnp.square(x), axes, where=mask)}


@contextlib.contextmanager
def batchnorm_interceptor(
    record: dict[tuple[str, ...], dict[str, jax.Array]] | None = None,
    mask: jax.Array | None = None) -> Iterator[None]:
  """Reads (and optionally masks) every ``nn.BatchNorm`` call in its scope.

  Args:
    record: if given, ``record[module path] = moments(input)`` for every
      BatchNorm call, over the rows its statistics would use.
    mask: if given, a bool [B] marking real rows: passed to every BatchNorm as
      its ``mask``, so padding rows never enter batch statistics.
  """

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, nn.BatchNorm)
            and context.method_name == '__call__'):
      return next_fun(*args, **kwargs)
    x = args[0]
    if mask is not None:
      if x.shape[0] != mask.shape[0]:
        raise ValueError(
            f'BatchNorm at {"/".join(module.path)} sees a batch of'
            f' {x.shape[0]} rows but the mask has {mask.shape[0]}; the'
            ' batch axis must come first.')
      kwargs = dict(kwargs, mask=mask.reshape(
          (-1,) + (1,) * (x.ndim - 1)))
    if record is not None:
      path = tuple(module.path)
      if path in record:
        raise ValueError(
            f'BatchNorm at {"/".join(path)} is called twice in one forward'
            ' pass; a shared BatchNorm layer is not supported.')
      record[path] = moments(x, _feature_axes(module, x.ndim),
                             kwargs.get('mask'))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def _as_tree(record: dict[tuple[str, ...], dict[str, jax.Array]]) -> PyTree:
  flat = {path + (k,): v for path, m in record.items() for k, v in m.items()}
  return traverse_util.unflatten_dict(flat)


def moments_to_stats(moment_tree: PyTree) -> PyTree:
  """{'mean', 'meansq'} leaves -> BatchNorm's {'mean', 'var'} (var >= 0)."""
  flat = traverse_util.flatten_dict(moment_tree)
  out = {}
  for path, value in flat.items():
    if path[-1] == 'mean':
      meansq = flat[path[:-1] + ('meansq',)]
      out[path] = value
      out[path[:-1] + ('var',)] = jnp.maximum(meansq - jnp.square(value), 0.0)
  return traverse_util.unflatten_dict(out)


def stats_to_moments(stats: PyTree) -> PyTree:
  """BatchNorm's {'mean', 'var'} leaves -> {'mean', 'meansq'}."""
  flat = traverse_util.flatten_dict(stats)
  out = {}
  for path, value in flat.items():
    if path[-1] == 'mean':
      out[path] = value
      out[path[:-1] + ('meansq',)] = flat[path[:-1] + ('var',)] + jnp.square(
          value)
  return traverse_util.unflatten_dict(out)


def _check_structure(stats: PyTree, reference: PyTree, what: str) -> PyTree:
  if jax.tree.structure(stats) != jax.tree.structure(reference):
    raise ValueError(
        f'{what}: the BatchNorm layers called in the forward pass'
        f' ({sorted(traverse_util.flatten_dict(stats))}) differ from the'
        f' model\'s batch_stats ({sorted(traverse_util.flatten_dict(reference))}).')
  return stats


def takes_train(model: nn.Module) -> bool:
  """Whether ``model.__call__`` takes a ``train`` keyword."""
  return 'train' in inspect.signature(model.__call__).parameters


def batch_statistics(model: nn.Module, variables: PyTree, images: jax.Array,
                     mask: jax.Array | None = None) -> PyTree:
  """The statistics every BatchNorm computes on ``images`` in training mode.

  Later layers see activations normalized by earlier layers' statistics of
  the same batch, exactly as in a training-mode forward pass; the returned
  tree has the structure of ``variables['batch_stats']``.

  Examples:
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return nn.BatchNorm(use_running_average=not train)(x)
    >>> x = jnp.array([[1.0], [3.0], [100.0]])
    >>> variables = Net().init(jax.random.key(0), x)
    >>> stats = batch_statistics(Net(), variables, x, mask=jnp.arange(3) < 2)
    >>> stats['BatchNorm_0']['mean'].tolist(), stats['BatchNorm_0']['var'].tolist()
    ([2.0], [1.0])

  Args:
    model: a Linen model taking ``train``.
    variables: its variables (``params`` and ``batch_stats``).
    images: the batch [P, ...].
    mask: optional bool [P]: rows outside it enter no statistics.

  Returns:
    The batch statistics ({'mean', 'var'} per BatchNorm layer).
  """
  record = {}
  with batchnorm_interceptor(record, mask):
    model.apply(variables, images, train=True, mutable=[BATCH_STATS])
  stats = moments_to_stats(_as_tree(record))
  return _check_structure(stats, variables[BATCH_STATS], 'batch_statistics')


def ema(old: PyTree, new: PyTree, momentum: float) -> PyTree:
  """``momentum * old + (1 - momentum) * new``, leaf by leaf."""
  return jax.tree.map(lambda o, n: momentum * o + (1 - momentum) * n, old, new)


# ---------------------------------------------------------------------------
# Privatized statistics.


def privatize_moments(per_example: PyTree, mask: jax.Array, center: PyTree,
                      clip_norm: float, noise_std: float, divisor: float,
                      key: jax.Array) -> PyTree:
  """``center + (sum_i clip(m_i - center) + N(0, noise_std^2)) / divisor``.

  Each row's deviation from the current (public) estimate is clipped to
  ``clip_norm`` over the whole tree; padding and non-finite rows contribute
  exactly zero (:func:`dpjax.clip_per_example`); the noisy sum is divided by
  the public ``divisor`` (the expected batch size), never the realized size.

  Examples:
    >>> rows = {'mean': jnp.array([[1.0], [3.0], [50.0]])}
    >>> out = privatize_moments(rows, jnp.array([True, True, False]),
    ...                         {'mean': jnp.zeros(1)}, clip_norm=10.0,
    ...                         noise_std=0.0, divisor=2.0, key=jax.random.key(0))
    >>> out['mean'].tolist()
    [2.0]

  Args:
    per_example: moment tree with a leading row axis on every leaf.
    mask: bool [rows], True on real rows.
    center: moment tree without the row axis (public: a past release).
    clip_norm: the L2 bound of one row's deviation (its sensitivity).
    noise_std: std of the Gaussian noise on the clipped sum.
    divisor: the public expected number of rows.
    key: PRNG key of this release.

  Returns:
    The noised estimate, shaped like ``center``.

  References:
    Tramer & Boneh, 2021. Differentially Private Learning Needs Better
    Features (or Much More Data). https://arxiv.org/abs/2011.11660
  """
  total = clipped_moment_sum(per_example, mask, center, clip_norm)
  return noised_moments(total, center, noise_std, divisor, key)


def clipped_moment_sum(per_example: PyTree, mask: jax.Array, center: PyTree,
                       clip_norm: float) -> PyTree:
  """``sum_i clip(m_i - center)`` over real rows: additive over pieces.

  Each row's deviation is clipped to ``clip_norm`` over the whole tree, so
  the sum of several physical batches' sums is the logical batch's sum.
  """
  deviations = jax.tree.map(lambda m, c: m - c[None], per_example, center)
  out, _ = clipping_lib.clip_per_example(clip_norm).clip(deviations, None, mask)
  return out.grad_sum


def noised_moments(total: PyTree, center: PyTree, noise_std: float,
                   divisor: float, key: jax.Array) -> PyTree:
  """``center + (total + N(0, noise_std^2)) / divisor``: once per step."""
  # One draw for the whole tree: a draw per leaf compiles one PRNG kernel per
  # leaf shape, which dominates compile time on CPU.
  flat, unravel = flatten_util.ravel_pytree(total)
  noisy = (flat + noise_std * jax.random.normal(key, flat.shape, flat.dtype)
           ) / divisor
  return jax.tree.map(jnp.add, center, unravel(noisy))


# ---------------------------------------------------------------------------
# Batch clipping: training-mode BatchNorm inside one group.


def batchnorm_group_loss(
    model: nn.Module,
    loss_of_logits: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Callable[..., tuple[jax.Array, PyTree]]:
  """``group_loss_fn(params, group, group_mask, inputs) -> (loss, aux)``.

  The batch-clipping group loss with BatchNorm in training mode: statistics
  over the group's real rows only (padding rows enter neither the loss nor
  any statistic), the loss the MEAN over the group with the public group size
  m as divisor. ``aux`` holds ``{'batch_stats': running statistics updated
  by the group, 'batch_moments': the group's own moments}``; neither may be
  released unprotected (use public statistics, :func:`privatize_moments`
  with the batch-clipping accountant, or batch statistics at evaluation).

  Examples:
    >>> import optax
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     x = nn.BatchNorm(use_running_average=not train)(x)
    ...     return nn.Dense(3)(x.reshape(x.shape[0], -1))
    >>> group = {'image': jnp.array([[1.0], [3.0], [1e6]]),
    ...          'label': jnp.array([0, 1, 2])}
    >>> variables = Net().init(jax.random.key(0), group['image'])
    >>> loss_fn = batchnorm_group_loss(Net())
    >>> inputs = StepInputs(
    ...     model_state={'batch_stats': variables['batch_stats']})
    >>> loss, aux = loss_fn(variables['params'], group, jnp.arange(3) < 2,
    ...                     inputs)
    >>> aux['batch_moments']['BatchNorm_0']['mean'].tolist()
    [2.0]

  Args:
    model: a Linen model taking ``train``.
    loss_of_logits: ``f(logits [m, K], labels [m]) -> [m]`` per-row losses
      (default: softmax cross-entropy).

  Returns:
    The group loss, for the batch-clipping engine (``has_aux=True``).

  References:
    Nguyen, Nguyen, Nguyen & van Dijk, 2023. Batch Clipping and Adaptive
    Layerwise Clipping for Differential Private Stochastic Gradient Descent.
    https://arxiv.org/abs/2307.11939
  """
  loss_of_logits = loss_of_logits or (
      losses.cross_entropy)

  def group_loss_fn(params, group, group_mask, inputs):
    model_state = inputs.model_state
    group_mask = jnp.asarray(group_mask, bool)
    images = group['image']
    # Zeroed so that not even a NaN padding row reaches the backward pass.
    images = jnp.where(group_mask.reshape((-1,) + (1,) * (images.ndim - 1)),
                       images, 0)
    record = {}
    with batchnorm_interceptor(record, group_mask):
      logits, updated = model.apply(
          {'params': params, **model_state}, images, train=True,
          mutable=[BATCH_STATS])
    losses = loss_of_logits(logits, group['label'])
    loss = jnp.sum(jnp.where(group_mask, losses, 0.0)) / group_mask.shape[0]
    return loss, {BATCH_STATS: updated[BATCH_STATS],
                  'batch_moments': _as_tree(record)}

  return group_loss_fn


# ---------------------------------------------------------------------------
# The policies, tied to a model for a training run.


def _collections(variables: Mapping[str, PyTree]) -> list[str]:
  # LoRA's frozen pretrained weights are public constants, not statistics
  # of the data: no policy applies to them (they stay in model_state).
  return sorted(c for c in variables if c not in ('params', lora.FROZEN))


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity under jit
class Normalizer:
  """A model's data-dependent collections under their policies, for one run.

  Build it with :func:`make_normalizer`. The training program keeps the
  collections in ``TrainState.model_state`` and calls: :meth:`init_state`
  once; per step :meth:`public_batch` (host), :meth:`step_statistics` and
  the per-example :meth:`example_loss` (device), then :meth:`update_state`;
  :meth:`eval_apply` at evaluation; :meth:`gradient_noise` to build the
  noise transform, and :meth:`summary` for summary.json.
  """

  model: nn.Module
  policies: Mapping[str, str]
  config: NormalizationConfig
  public_images: np.ndarray | None = None
  private: bool = True
  # Root of the public batches' stream (keys.PUBLIC_BATCH): never the
  # sampler's, so which public images a step uses says nothing about which
  # private examples it sampled.
  public_key: jax.Array | None = None
  # 'privatized' only, from the run's plan (see make_normalizer).
  stats_noise_std: float = 0.0
  expected_batch_size: float = 1.0
  gradient_noise_multiplier: float | None = None
  stats_noise_multiplier: float | None = None
  # 'privatized_once' only, from the run's plan.
  once_noise_std: float = 0.0

  @property
  def bn_policy(self) -> str | None:
    return self.policies.get(BATCH_STATS)

  @property
  def needs_public_batch(self) -> bool:
    """Whether each step draws a public batch."""
    return self.private and self.bn_policy == 'public'

  @property
  def evaluates_on_public(self) -> bool:
    """Whether evaluation normalizes with a public batch's statistics at the
    evaluated parameters (``public``; ``batch`` with public evaluation)."""
    return self.private and (self.bn_policy == 'public' or (
        self.bn_policy == 'batch' and self.config.eval_statistics == 'public'))

  @property
  def has_aux(self) -> bool:
    """Whether :meth:`example_loss` returns per-example moments as aux."""
    return self.private and self.bn_policy == 'privatized'

  def _apply_kwargs(self, train: bool) -> dict[str, bool]:
    return {'train': train} if takes_train(self.model) else {}

  def _public_slice(self, step: int | None) -> np.ndarray:
    n = len(self.public_images)
    size = min(self.config.public_batch_size, n)
    if step is None:
      return self.public_images[:size]
    if self.public_key is None:
      raise ValueError(
          'this policy draws a public batch each step: build the normalizer'
          ' with public_key=KeySchedule.root(keys.PUBLIC_BATCH).')
    rng = keys_lib.host_rng(keys_lib.for_step(self.public_key, step))
    return self.public_images[np.sort(rng.choice(n, size, replace=False))]

  def init_state(self, variables: Mapping[str, PyTree]) -> dict[str, PyTree]:
    """The collections a run starts from (public statistics where available).

    ``public``, ``frozen``, ``privatized`` and ``privatized_once`` start
    from the statistics of one public batch at the initial parameters when
    public data exists, else from the layers' initial values (mean 0,
    variance 1); ``privatized_once`` then replaces them with
    :meth:`release_once`.
    """
    state = {c: variables[c] for c in variables if c != 'params'}
    from_public = self.needs_public_batch or (
        self.private
        and self.bn_policy in ('frozen', 'privatized', 'privatized_once')
        and self.public_images is not None)
    if from_public:
      state[BATCH_STATS] = jax.jit(batch_statistics, static_argnums=0)(
          self.model, {'params': variables['params'], **state},
          jnp.asarray(self._public_slice(None)))
    return state

  @property
  def releases_once(self) -> bool:
    """Whether :meth:`release_once` runs before training."""
    return self.private and self.bn_policy == 'privatized_once'

  def once_moment_sum(self, params: PyTree, model_state: PyTree,
                      images: np.ndarray, progress: bool = False) -> PyTree:
    """``privatized_once``: ``sum_i clip(m_i)`` over ``images``.

    ``m_i``: every BatchNorm input's moments (mean and mean square per
    channel) for example i at ``params``, each layer normalizing with
    ``model_state``'s (public) statistics; each row is clipped to
    ``stats_clip_norm`` over all layers together, as Tramer & Boneh clip the
    raw moments (deviations from the initial variance 1 would spend the
    bound on features whose scale is far from 1, e.g. ScatterNet's ~0.03);
    non-finite rows contribute zero. The sum that :meth:`release_once`
    noises (not a release: it is un-noised); its sensitivity is
    ``stats_clip_norm``. With several BatchNorm layers, deeper layers'
    moments are of inputs normalized upstream by ``model_state``, not by
    the released statistics: the policy is meant for one BatchNorm on the
    inputs.
    """
    center = jax.tree.map(jnp.zeros_like,
                          stats_to_moments(model_state[BATCH_STATS]))
    variables = {'params': params, **model_state}
    model, kwargs = self.model, self._apply_kwargs(False)

    def one(image):
      record = {}
      with batchnorm_interceptor(record):
        model.apply(variables, image[None], **kwargs)
      return _as_tree(record)

    @jax.jit
    def chunk_sum(rows, mask):
      return clipped_moment_sum(jax.vmap(one)(rows), mask, center,
                                self.config.stats_clip_norm)

    chunk = ONCE_CHUNK
    total = jax.tree.map(jnp.zeros_like, center)
    for start in tqdm.trange(0, len(images), chunk, disable=not progress,
                             desc='private statistics'):
      rows = np.asarray(images[start:start + chunk])
      real = len(rows)
      if real < chunk:  # one compiled shape: pad, mask the padding out
        rows = np.concatenate(
            [rows, np.zeros((chunk - real,) + rows.shape[1:], rows.dtype)])
      total = jax.tree.map(jnp.add, total, chunk_sum(
          jnp.asarray(rows), jnp.arange(chunk) < real))
    return total

  def release_once(self, params: PyTree, model_state: PyTree,
                   images: np.ndarray, key: jax.Array,
                   progress: bool = False) -> PyTree:
    """``privatized_once``: the state with statistics from the private set.

    :meth:`once_moment_sum` over ``images`` (every private training example,
    once), noised once with std ``once_noise_multiplier * stats_clip_norm``,
    divided by ``len(images)`` (the expected count of a pass at sampling
    rate 1: public as the dataset size every sampling rate is built from).
    Each variance is floored at the noise std of its mean square
    (``once_noise_std / len(images)``, public): below it the estimate is
    noise, and a variance clamped at 0 would scale the channel by
    ``1 / sqrt(BatchNorm.epsilon)``. With one BatchNorm on the inputs
    (ScatterNet features) these are the input statistics of Tramer &
    Boneh's private data normalization. ``key`` must be fresh (two releases
    with one key would cancel their noise in a difference).
    """
    if not (self.releases_once and self.once_noise_std > 0):
      raise ValueError(
          'release_once needs a privatized_once Normalizer built by'
          f' make_normalizer (noise std {self.once_noise_std!r}): it never'
          ' releases un-noised statistics.')
    total = self.once_moment_sum(params, model_state, images, progress)
    n = float(len(images))
    estimate = noised_moments(
        total, jax.tree.map(jnp.zeros_like, total), self.once_noise_std, n,
        key)
    flat = traverse_util.flatten_dict(moments_to_stats(estimate))
    floor = self.once_noise_std / n
    stats = traverse_util.unflatten_dict({
        path: jnp.maximum(v, floor) if path[-1] == 'var' else v
        for path, v in flat.items()})
    return {**model_state, BATCH_STATS: _check_structure(
        stats, model_state[BATCH_STATS], 'privatized_once')}

  def public_batch(self, step: int) -> np.ndarray | None:
    """Step ``step``'s public batch (its own stream, by step), or None."""
    return self._public_slice(step) if self.needs_public_batch else None

  @property
  def tracks_public(self) -> bool:
    """Whether the stored statistics are the last step's public ones."""
    return self.needs_public_batch

  def step_state(self, params: PyTree, model_state: PyTree,
                 public: jax.Array | None) -> tuple[PyTree, PyTree]:
    """``(state the step's loss uses, state after the step)`` (device; pure).

    ``public``: the public batch's statistics at ``params`` (no gradient),
    for the loss and kept after the step; otherwise ``model_state`` twice
    (the ``privatized`` update comes from :meth:`privatized_state`).
    """
    if public is None:
      return model_state, model_state
    stats = jax.lax.stop_gradient(batch_statistics(
        self.model, {'params': params, **model_state}, public))
    state = {**model_state, BATCH_STATS: stats}
    return state, state

  def example_loss(
      self,
      loss_of_logits: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
  ) -> Callable[..., Any]:
    """``loss_fn(params, example, inputs)`` for ONE example.

    The model runs in inference mode with the statistics the policy gives:
    ``inputs.model_state`` (``frozen``, ``privatized``; ``public`` with the
    step's public statistics put there by the caller), or, for ``public``
    with ``stats_gradient``, the statistics of ``inputs.public`` recomputed
    inside the loss so that gradients flow through them. With ``privatized``
    it returns ``(loss, moments)``: the example's BatchNorm input moments.
    """
    loss_of_logits = loss_of_logits or (
        losses.cross_entropy)
    model, kwargs = self.model, self._apply_kwargs(False)
    through_stats = self.bn_policy == 'public' and self.config.stats_gradient

    def loss_fn(params, example, inputs):
      variables = {'params': params, **inputs.model_state}
      if through_stats:
        variables[BATCH_STATS] = batch_statistics(model, variables,
                                                  inputs.public)
      record = {} if self.has_aux else None
      with batchnorm_interceptor(record):
        logits = model.apply(variables, example['image'][None], **kwargs)[0]
      loss = loss_of_logits(logits, example['label'])
      if self.has_aux:
        return loss, _as_tree(record)
      return loss

    return loss_fn

  def moment_sum(self, model_state: PyTree, per_example_moments: PyTree,
                 mask: jax.Array) -> PyTree:
    """``privatized``: the clipped sum of the rows' moment deviations.

    Additive over the physical batches of a logical step; noised once by
    :meth:`privatized_state`.
    """
    return clipped_moment_sum(per_example_moments, mask,
                              stats_to_moments(model_state[BATCH_STATS]),
                              self.config.stats_clip_norm)

  def privatized_state(self, model_state: PyTree, moment_sum: PyTree,
                       key: jax.Array) -> PyTree:
    """``privatized``: the state after one step from its moment sum.

    The sum gets noise of std :attr:`stats_noise_std` once, is divided by the
    public expected batch size and averaged into the running estimate.
    """
    center = stats_to_moments(model_state[BATCH_STATS])
    estimate = noised_moments(moment_sum, center, self.stats_noise_std,
                              self.expected_batch_size, key)
    return {**model_state, BATCH_STATS: moments_to_stats(
        ema(center, estimate, self.config.momentum))}

  def eval_statistics(self, variables: PyTree) -> PyTree:
    """The variables evaluation normalizes with (device; pure).

    ``public`` and ``batch`` with public evaluation statistics: the
    statistics of the fixed public evaluation batch (the first
    ``public_batch_size`` public examples) at ``variables['params']``, the
    parameters being evaluated; otherwise the stored ones (``frozen``,
    ``privatized``).
    """
    if not self.evaluates_on_public:
      return variables
    stats = batch_statistics(self.model, variables,
                             jnp.asarray(self._public_slice(None)))
    return {**variables, BATCH_STATS: stats}

  def eval_apply(self, variables: PyTree, images: jax.Array,
                 mask: jax.Array) -> jax.Array:
    """Logits for evaluation, with the statistics of :meth:`eval_statistics`
    or the batch's own (masked)."""
    if self.bn_policy == 'batch' and self.config.eval_statistics == 'batch':
      with batchnorm_interceptor(None, mask):
        logits, _ = self.model.apply(variables, images, train=True,
                                     mutable=[BATCH_STATS])
      return logits
    return self.model.apply(self.eval_statistics(variables), images,
                            **self._apply_kwargs(False))

  def summary(self) -> dict[str, Any]:
    """Entries for summary.json: ``normalization``, the policies and their
    settings (with ``privatized``, both noise multipliers and how they are
    accounted; the gradient's noise std is in the plan's summary)."""
    out: dict[str, Any] = {'policies': dict(self.policies)}
    if self.bn_policy in ('public', 'frozen', 'privatized', 'privatized_once',
                          'batch'):
      out['public_batch_size'] = (
          0 if self.public_images is None
          else min(self.config.public_batch_size, len(self.public_images)))
    if self.bn_policy == 'public':
      out['stats_gradient'] = self.config.stats_gradient
    if self.bn_policy == 'batch':
      out['eval_statistics'] = self.config.eval_statistics
    if self.bn_policy == 'privatized_once':
      out.update({
          'stats_clip_norm': self.config.stats_clip_norm,
          'once_noise_multiplier': self.config.once_noise_multiplier,
          'once_noise_std_on_sum': self.once_noise_std,
          'accounting': (
              'statistics released once before training over the whole'
              ' private set: one Gaussian mechanism composed with the steps'),
      })
    entries: dict[str, Any] = {'normalization': out}
    if self.gradient_noise_multiplier is not None:
      joint = (self.gradient_noise_multiplier ** -2
               + self.stats_noise_multiplier ** -2) ** -0.5
      out.update({
          'stats_clip_norm': self.config.stats_clip_norm,
          'stats_budget': self.config.stats_budget,
          'gradient_noise_multiplier': self.gradient_noise_multiplier,
          'stats_noise_multiplier': self.stats_noise_multiplier,
          'stats_noise_std_on_sum': self.stats_noise_std,
          'accounting': (
              'gradient and statistics are released on the same Poisson'
              ' batch and accounted together as one Gaussian mechanism with'
              f' noise multiplier {joint:.6g}'),
      })
    return entries


def resolve_policies(variables: Mapping[str, PyTree],
                     config: NormalizationConfig) -> dict[str, str]:
  """Collection -> policy for a model's variables (empty: no collections)."""
  collections = _collections(variables)
  return parse_policy(config.policy, collections) if collections else {}


def make_normalizer(model: nn.Module, variables: Mapping[str, PyTree],
                    config: NormalizationConfig | None = None, *,
                    public_images: np.ndarray | None = None, plan=None,
                    private: bool = True,
                    batch_clipping: bool = False,
                    public_key: jax.Array | None = None) -> Normalizer:
  """Resolves and checks the policies of ``model``'s collections for a run.

  Examples:
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return nn.BatchNorm(use_running_average=not train)(x)
    >>> variables = Net().init(jax.random.key(0), jnp.ones((1, 3)))
    >>> make_normalizer(Net(), variables)
    Traceback (most recent call last):
    ...
    ValueError: The model declares mutable collections ['batch_stats'] ...
    >>> norm = make_normalizer(Net(), variables,
    ...                        NormalizationConfig(policy='frozen'))
    >>> norm.policies
    {'batch_stats': 'frozen'}

  Args:
    model: the Linen model.
    variables: its initial variables.
    config: the policies and their settings (default: reject).
    public_images: the public split's images, if any (never private data).
    plan: the run's :class:`dpjax.DPPlan` (needed by ``privatized``).
    private: False for a non-private baseline: BatchNorm then trains as usual
      and no policy applies.
    batch_clipping: whether the run clips batch-clipping groups (allows the
      ``batch`` policy).
    public_key: root of the public batches' stream
      (``KeySchedule.root(keys.PUBLIC_BATCH)``), for the policies that draw
      one each step.

  Returns:
    A :class:`Normalizer`.
  """
  config = config or NormalizationConfig()
  policies = resolve_policies(variables, config)
  extra: dict[str, Any] = {}
  if private and policies:
    check_policies(policies, has_public=public_images is not None,
                   batch_clipping=batch_clipping)
    if config.eval_statistics not in EVAL_STATISTICS:
      raise ValueError(
          f'normalization.eval_statistics must be one of {EVAL_STATISTICS},'
          f' got {config.eval_statistics!r}.')
    if (policies.get(BATCH_STATS) == 'batch'
        and config.eval_statistics == 'public' and public_images is None):
      raise ValueError(
          "normalization.eval_statistics='public' needs public data (set"
          " config.data.public_fraction or public_dataset), or use 'batch'.")
    if BATCH_STATS in policies and not takes_train(model):
      raise ValueError(
          'a model with BatchNorm must take a `train` keyword (BatchNorm('
          'use_running_average=not train)) for dpjax to choose its mode.')
    _validation.positive_int('normalization.public_batch_size',
                             config.public_batch_size)
    if not 0 <= config.momentum < 1:
      raise ValueError(
          f'normalization.momentum must lie in [0, 1), got {config.momentum!r}.')
    if policies.get(BATCH_STATS) == 'privatized':
      if plan is None:
        raise ValueError("policy 'privatized' needs the run's DP plan.")
      if batch_clipping:
        raise ValueError(
            "policy 'privatized' releases per-example feature moments, which"
            " batch clipping (clipping.mode='batch') does not produce; use"
            " 'batch', 'public' or 'frozen' with batch clipping.")
      if plan.stats_noise_multiplier is None:
        raise ValueError(
            "policy 'privatized' is a second release of each batch: build the"
            ' plan with PrivacyConfig(stats_share=normalization.stats_budget)'
            ' so that both releases are accounted as one step.')
      sigma_g, sigma_s = (plan.grad_noise_multiplier,
                          plan.stats_noise_multiplier)
      clip = clipping_lib.clip_per_example(config.stats_clip_norm)
      extra = dict(
          gradient_noise_multiplier=sigma_g, stats_noise_multiplier=sigma_s,
          stats_noise_std=sigma_s * clip.sensitivity(plan.relation),
          expected_batch_size=float(plan.config.expected_batch_size))
    if policies.get(BATCH_STATS) == 'privatized_once':
      extra = _once_settings(config, plan, batch_clipping)
  return Normalizer(model=model, policies=policies, config=config,
                    public_images=public_images, private=private,
                    public_key=public_key, **extra)


def _once_settings(config: NormalizationConfig, plan,
                   batch_clipping: bool) -> dict[str, float]:
  """``privatized_once``'s noise std, checked against the plan's release."""
  if batch_clipping:
    raise ValueError(
        "policy 'privatized_once' releases per-example moments under the"
        " add/remove relation, which batch clipping (clipping.mode='batch')"
        " does not account; use 'public' or 'frozen' with batch clipping.")
  sigma = _validation.positive('normalization.once_noise_multiplier',
                               config.once_noise_multiplier)
  if plan is None or plan.config.initial_noise_multiplier != sigma:
    raise ValueError(
        "policy 'privatized_once' releases statistics before training: build"
        ' the plan with PrivacyConfig(initial_noise_multiplier='
        'normalization.once_noise_multiplier) so that the release is'
        ' accounted.')
  clip = clipping_lib.clip_per_example(
      _validation.positive('normalization.stats_clip_norm',
                           config.stats_clip_norm))
  return dict(once_noise_std=sigma * clip.sensitivity(plan.relation))
