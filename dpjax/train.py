"""The DP-SGD training program: ``train_and_evaluate(config, workdir)``.

Shaped like the flax examples: small pure pieces (``create_train_state``,
``make_train_step``, ``evaluate``) and one driver. Each step draws a Poisson
batch from the plan's sampler, computes the clipped sum of per-example
gradients (microbatched), adds noise once through the optax chain
``noise -> optimizer`` and records the step's DP event in the ledger, so the
epsilon shown and written is always the one of what actually ran.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple

from flax import struct
from flax.training import train_state as train_state_lib
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from dpjax import accounting
from dpjax import accumulation
from dpjax import augmult as augmult_lib
from dpjax import autotune
from dpjax import averaging
from dpjax import batch_clipping
from dpjax import checkpoint
from dpjax import clipping as clipping_lib
from dpjax import config_validation
from dpjax import data as data_lib
from dpjax import distributed
from dpjax import ghost
from dpjax import modelmix as modelmix_lib
from dpjax import models
from dpjax import normalization
from dpjax import plan as plan_lib
from dpjax import plots
from dpjax import pruning
from dpjax import sampling


class TrainState(train_state_lib.TrainState):
  """Flax TrainState; ``tx`` is ``optax.chain(noise, optimizer)`` under DP.

  ``clip_state`` is the clipping's state (per-layer thresholds, adaptive
  thresholds and counts), carried across steps and checkpointed with the rest.
  ``pruning`` is the :class:`dpjax.pruning.PruningState` (the step's parameter
  mask) when ``config.pruning`` is on. ``model_state`` holds the model's
  non-parameter collections (BatchNorm's ``batch_stats``) as its
  :mod:`dpjax.normalization` policy keeps them.
  """

  clip_state: Any = None
  pruning: Any = None
  model_state: Any = struct.field(default_factory=dict)


class RunKeys(NamedTuple):
  """Independent PRNG streams of one run, all derived from ``config.seed``.

  Each randomness source gets its own stream: a released noise (gradient noise,
  adaptive clip counts) must never share bits with a secret one (ModelMix's
  mixing weights) or with another release.
  """

  init: jax.Array
  noise: jax.Array
  clip: jax.Array
  mix: jax.Array
  prune: jax.Array
  stats: jax.Array  # privatized BatchNorm statistics (dpjax.normalization)

  @classmethod
  def from_seed(cls, seed: int) -> 'RunKeys':
    root = jax.random.key(seed)
    return cls(*(jax.random.fold_in(root, i)
                 for i in range(len(cls._fields))))


def example_loss(model: nn.Module,
                 model_state: Any = None) -> Callable[..., Any]:
  """Cross-entropy of ONE example ``{'image': [H, W, C], 'label': []}``.

  ``model_state``: fixed non-parameter collections (inference mode).
  """

  def loss_fn(params, example):
    logits = model.apply({'params': params, **(model_state or {})},
                         example['image'][None])[0]
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, example['label'])
    return loss

  return loss_fn


def make_optimizer(config: ml_collections.ConfigDict,
                   num_steps: int) -> optax.GradientTransformation:
  """The optax optimizer named by ``config`` (applied after the noise)."""
  lr = config.learning_rate
  if config.schedule == 'cosine':
    lr = optax.cosine_decay_schedule(config.learning_rate, num_steps)
  elif config.schedule != 'constant':
    raise ValueError(
        f"optimizer.schedule must be 'constant' or 'cosine', got"
        f' {config.schedule!r}.')
  if config.name == 'sgd':
    return optax.sgd(lr, momentum=config.momentum or None,
                     nesterov=config.get('nesterov', False))
  if config.name == 'adam':
    return optax.adam(lr)
  if config.name == 'nadam':
    return optax.nadam(lr)
  raise ValueError(
      f"optimizer.name must be 'sgd', 'adam' or 'nadam', got {config.name!r}.")


def create_train_state(
    model: nn.Module, key: jax.Array, image_shape,
    tx: optax.GradientTransformation,
    normalizer: normalization.Normalizer | None = None) -> TrainState:
  """Initial state; the model's collections as ``normalizer`` keeps them.

  Without a normalizer, a model with data-dependent collections (BatchNorm
  statistics) is refused: the default policy is 'reject'.
  """
  # One compilation instead of one per initializer op.
  variables = jax.jit(model.init)(key, jnp.zeros((1,) + tuple(image_shape)))
  if normalizer is None:
    normalizer = normalization.make_normalizer(model, variables)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           tx=tx, model_state=normalizer.init_state(variables))


def make_train_step(model: nn.Module, plan: plan_lib.DPPlan | None,
                    microbatch_size: int | None = None, *,
                    mesh: jax.sharding.Mesh | None = None,
                    physical_batch_size: int | None = None,
                    augmult: augmult_lib.AugMult | None = None,
                    pruner: pruning.Pruner | None = None,
                    public_split: Any = None,
                    normalizer: normalization.Normalizer | None = None,
                    stats_key: jax.Array | None = None,
                    grad_route: str = 'auto'):
  """``step(state, images, labels, indices, mask, public=None)``.

  One logical step, returning ``(state, metrics)``. With a plan: DP-SGD
  (clipped sum of per-example gradients, computed by ``grad_route``: see
  :func:`clipped_grad_fn`; the noise is in ``state.tx``). Without one: the
  non-private step on the mean loss of the real rows, the baseline of the
  same model and batch.

  The padded batch is cut into physical batches of ``physical_batch_size``
  rows, each one's gradient sum computed by its own device call (over the
  ``mesh``'s data axis when given), the sums accumulated and the update (noise
  first) applied once (:mod:`dpjax.accumulation`). With ``augmult``, each
  example's gradient is averaged over its augmented views before clipping.
  With a ``mesh``, put the state and the data on it first
  (:func:`dpjax.distributed.put_replicated`). With a ``pruner`` (DP only;
  ``state.tx`` built with :func:`dpjax.pruning.masked_chain`), each step first
  updates ``state.pruning`` (``public_split``: the public split, for the
  public mask sources), cuts each per-example gradient to the mask before
  clipping and passes the mask to ``state.tx``.

  A model with BatchNorm statistics runs as ``normalizer``'s policy says
  (:mod:`dpjax.normalization`); ``public`` is the step's public batch
  (:meth:`~dpjax.normalization.Normalizer.public_batch`) and ``stats_key``
  the key of privatized statistics' noise.
  """
  norm = normalizer if normalizer is not None and normalizer.policies else None
  bn = None if norm is None else norm.bn_policy
  privatized = norm is not None and norm.has_aux
  group_bn = plan is not None and bn == 'batch'
  train_bn = plan is None and bn is not None
  if norm is not None and mesh is not None:
    raise ValueError(
        f'the model has data-dependent collections {sorted(norm.policies)}'
        ' (BatchNorm statistics), which the multi-device path does not'
        ' carry; set perf.num_devices=1 (physical batches work:'
        " perf.physical_batch_size), or use model.norm='group'.")
  if augmult is not None and (privatized or group_bn or train_bn):
    raise ValueError(
        'augmentation multiplicity (augmult.num_views > 0) averages a'
        ' one-example loss over views; it does not combine with BatchNorm in'
        f' training mode or privatized statistics (policy {bn!r}). Set'
        " augmult.num_views=0, or use normalization.policy 'public' or"
        " 'frozen'.")
  if pruner is not None and norm is not None:
    raise ValueError(
        'config.pruning does not combine with data-dependent collections'
        f' {sorted(norm.policies)} (BatchNorm statistics) yet: the mask'
        " chooser's loss has no model state. Use model.norm='group' or"
        " 'none', or pruning.mode='none'.")
  if privatized and stats_key is None:
    raise ValueError("policy 'privatized' needs stats_key (its noise key).")
  loss_fn = example_loss(model) if norm is None else norm.example_loss()
  if augmult is not None:
    loss_fn = augmult.loss(loss_fn)
  if pruner is not None:
    if plan is None:
      raise ValueError('pruning applies to DP-SGD; pass a plan or no pruner.')
    loss_fn = pruning.masked_loss(loss_fn)
    update_mask = jax.jit(pruner.update)

  def gather(data, indices):
    images, labels = data[:2]
    batch = {'image': images[indices], 'label': labels[indices]}
    if augmult is not None:
      batch['index'] = indices
    return batch

  def loss_args(state, data):
    # The step's model state and public batch ride in data (normalization);
    # the pruning mask is the outermost loss's first argument.
    args = () if augmult is None else (augmult.step_key(state.step),)
    args = args + tuple(data[2:])
    return args if pruner is None else (state.pruning.mask,) + args

  if train_bn:
    # Non-private baseline: BatchNorm in training mode over each physical
    # batch's real rows; the running statistics average over the pieces.
    group_loss = normalization.batchnorm_group_loss(model)

    def bn_sum_loss(params, batch, mask, model_state, public):
      del public
      loss, aux = group_loss(params, batch, mask, model_state)
      return loss * mask.shape[0], aux[normalization.BATCH_STATS]

    bn_sum_grad = jax.value_and_grad(bn_sum_loss, has_aux=True)

    def grad_step(state, data, indices, mask):
      (loss_sum, stats), grads = bn_sum_grad(
          state.params, gather(data, indices), mask, *loss_args(state, data))
      # A piece of padding only has no statistics (and NaN gradients).
      real = mask.any()
      keep = lambda t: jax.tree.map(lambda x: jnp.where(real, x, 0), t)
      return keep(grads), {'loss_sum': keep(loss_sum), 'count': mask.sum(),
                           'bn_stats': keep(stats), 'bn_pieces': real * 1}

    def apply_step(state, grads, sums):
      count = jnp.maximum(sums['count'], 1)
      pieces = sums['bn_pieces']
      stats = jax.tree.map(
          lambda new, old: jnp.where(pieces > 0,
                                     new / jnp.maximum(pieces, 1), old),
          sums['bn_stats'], state.model_state[normalization.BATCH_STATS])
      return state.apply_gradients(
          grads=jax.tree.map(lambda g: g / count, grads),
          model_state={**state.model_state,
                       normalization.BATCH_STATS: stats})
  elif plan is None:
    def sum_loss(params, batch, mask, *args):
      in_axes = (None, 0) + (None,) * len(args)
      losses = jax.vmap(loss_fn, in_axes=in_axes)(params, batch, *args)
      return jnp.sum(jnp.where(mask, losses, 0))

    sum_grad = (jax.value_and_grad(sum_loss) if mesh is None
                else distributed.summed_grad(sum_loss, mesh))

    def grad_step(state, data, indices, mask):
      loss_sum, grads = sum_grad(state.params, gather(data, indices), mask,
                                 *loss_args(state, data))
      return grads, {'loss_sum': loss_sum, 'count': mask.sum()}

    def apply_step(state, grads, sums):
      count = jnp.maximum(sums['count'], 1)
      return state.apply_gradients(
          grads=jax.tree.map(lambda g: g / count, grads))
  else:
    if group_bn:
      # Training-mode BatchNorm inside each batch-clipping group; the
      # group's updated statistics (aux) are dropped, never released.
      group_loss = normalization.batchnorm_group_loss(model)
      grad_fn = batch_clipping.batch_clipped_grad(
          lambda params, group, group_mask, model_state, public: group_loss(
              params, group, group_mask, model_state),
          plan.clipping, has_aux=True,
          microbatch_size=None if microbatch_size is None else max(
              1, microbatch_size // plan.group_size))
    elif mesh is None and (norm is not None or pruner is not None):
      # Ghost norms see the layers' own inputs; a parameter mask or policy
      # statistics in the loss need the per-example (vmap) route.
      if grad_route not in ('auto', 'vmap'):
        raise ValueError(
            f'perf.grad_route={grad_route!r} does not combine with'
            ' config.pruning or a normalization policy; set'
            " perf.grad_route='auto' (or 'vmap').")
      grad_fn = plan.clipped_grad(loss_fn, microbatch_size=microbatch_size,
                                  has_aux=privatized)
    elif mesh is None:
      grad_fn = clipped_grad_fn(plan, loss_fn, microbatch_size, grad_route)
    elif plan.mode == 'batch':
      raise ValueError(
          "clipping.mode='batch' does not run on a device mesh; set"
          ' perf.num_devices=1 (physical batches work: perf.physical_batch_size'
          ' a multiple of the group size).')
    else:
      grad_fn = distributed.clipped_grad(
          loss_fn, plan.clipping, mesh, microbatch_size=microbatch_size)

    def grad_step(state, data, indices, mask):
      out = grad_fn(state.params, gather(data, indices), mask,
                    clip_state=state.clip_state, args=loss_args(state, data))
      sums = {
          # Per-group losses in 'batch' mode are means over m rows.
          'loss_sum': out.stats.losses.sum() * plan.group_size,
          'count': mask.sum(),
          'num_nonfinite': out.stats.num_nonfinite,
          'num_clipped': out.stats.num_clipped,
          # Statistics the clipping accumulated (adaptive: counts); they add
          # up over physical batches like the gradient sums.
          'clip_increment': clipping_lib.state_increment(
              state.clip_state, out.clip_state),
      }
      if privatized:
        # Clipped per-example moments: summed over pieces, noised once.
        sums['moment_sum'] = norm.moment_sum(state.model_state,
                                             out.stats.aux, mask)
      return out.grad_sum, sums

    def apply_step(state, grads, sums):
      clip_state = clipping_lib.add_state_increment(
          state.clip_state, sums['clip_increment'])
      # The noise is scaled to the thresholds the sum was clipped with and
      # divides by the PUBLIC batch size; then the clipping's state advances
      # once per logical step (adaptive: noised counts).
      mask_args = {} if pruner is None else {'param_mask': state.pruning.mask}
      updates, opt_state = state.tx.update(
          grads, state.opt_state, state.params, clip_state=clip_state,
          **mask_args)
      model_state = state.model_state
      if privatized:
        model_state = norm.privatized_state(
            model_state, sums['moment_sum'],
            jax.random.fold_in(stats_key, state.step))
      return state.replace(
          step=state.step + 1,
          params=optax.apply_updates(state.params, updates),
          opt_state=opt_state,
          clip_state=plan.clipping.end_step(clip_state),
          model_state=model_state)

  place = None if mesh is None else (
      lambda x: distributed.put_sharded(x, mesh))
  logical_step = accumulation.make_logical_step(
      grad_step, apply_step, physical_batch_size=physical_batch_size,
      place_batch=place)
  step_state = None if norm is None else jax.jit(norm.step_state)

  def step(state, images, labels, indices, mask, public=None):
    if plan is not None and state.clip_state is None:
      # A state made by create_train_state alone: the clipping starts fresh.
      state = state.replace(clip_state=plan.clipping.init(state.params))
    if pruner is not None:
      state = state.replace(
          pruning=update_mask(state.pruning, state.params, public_split))
    data = (images, labels)
    if norm is not None:
      loss_state, next_state = step_state(state.params, state.model_state,
                                          public)
      data = (images, labels, loss_state, public)
    state, sums = logical_step(state, data, indices, mask)
    if norm is not None and norm.tracks_public:
      state = state.replace(model_state=next_state)
    for key in ('clip_increment', 'moment_sum', 'bn_stats', 'bn_pieces'):
      sums.pop(key, None)
    metrics = dict(sums, loss=sums['loss_sum'] / jnp.maximum(sums['count'], 1))
    return state, metrics

  return step


def make_eval_fn(model: nn.Module, batch_size: int = 1000,
                 normalizer: normalization.Normalizer | None = None):
  """``evaluate(params, dataset, model_state=None) -> {'accuracy', 'loss'}``.

  Evaluates in fixed chunks; with a normalizer, BatchNorm uses the statistics
  its policy keeps in ``model_state`` (or each chunk's own, masked).
  """
  norm = normalizer if normalizer is not None and normalizer.policies else None

  @jax.jit
  def eval_chunk(params, images, labels, mask, model_state):
    if norm is None:
      logits = model.apply({'params': params}, images)
    else:
      logits = norm.eval_apply({'params': params, **model_state}, images, mask)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(correct & mask), jnp.sum(jnp.where(mask, losses, 0))

  def evaluate(params, dataset: data_lib.ArrayDataset,
               model_state=None) -> dict[str, float]:
    n = len(dataset)
    size = min(batch_size, n)
    correct = loss = 0.0
    for start in range(0, n, size):
      images = dataset.images[start:start + size]
      labels = dataset.labels[start:start + size]
      real = len(labels)
      if real < size:
        images = np.concatenate([images, np.zeros(
            (size - real,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.zeros(size - real, labels.dtype)])
      c, l = eval_chunk(params, images, labels, np.arange(size) < real,
                        model_state or {})
      correct += float(c)
      loss += float(l)
    return {'accuracy': correct / n, 'loss': loss / n}

  return evaluate


def clipped_grad_fn(plan: plan_lib.DPPlan, loss_fn: Callable[..., Any],
                    microbatch_size: int | None = None,
                    grad_route: str = 'auto') -> Callable[..., Any]:
  """The clipped-gradient engine of ``plan`` on one device, by ``grad_route``.

  Per-example modes go through :func:`dpjax.ghost.clipped_grad_for_route`
  ('auto': ghost norms and book-keeping when the clipping can clip from
  norms, as flat clipping can; else vmap). 'batch' mode has its own engine
  (:meth:`DPPlan.clipped_grad`), on the 'auto' and 'vmap' routes. Every route
  computes the same clipped sum: the route is a performance setting.
  """
  if grad_route not in ghost.GRAD_ROUTES:
    raise ValueError(
        f'perf.grad_route must be one of {ghost.GRAD_ROUTES}, got'
        f' {grad_route!r}.')
  if plan.mode == 'batch':
    if grad_route not in ('auto', 'vmap'):
      raise ValueError(
          f"perf.grad_route={grad_route!r} clips per example; clipping.mode="
          "'batch' clips groups by vmap: set perf.grad_route='auto'.")
    return plan.clipped_grad(loss_fn, microbatch_size=microbatch_size)
  return ghost.clipped_grad_for_route(
      grad_route, loss_fn, plan.clipping, microbatch_size=microbatch_size)


def tune_microbatch(model: nn.Module, plan: plan_lib.DPPlan, state: TrainState,
                    train: data_lib.ArrayDataset, batch_size: int, *,
                    budget_mb: float, grad_route: str = 'auto',
                    augmult: augmult_lib.AugMult | None = None) -> int:
  """The largest microbatch whose clipped gradient fits ``budget_mb``.

  The budget (config.perf.memory_budget_mb) covers one device call on a
  physical batch of ``batch_size`` rows: parameters, clip state, the batch
  and XLA's temporaries (:func:`dpjax.autotune.peak_bytes`), not the
  training set kept on the device.
  """
  loss_fn = example_loss(model)
  spec = jax.ShapeDtypeStruct
  batch = {'image': spec((batch_size,) + train.images.shape[1:],
                        train.images.dtype),
           'label': spec((batch_size,), train.labels.dtype)}
  args = ()
  if augmult is not None:
    loss_fn = augmult.loss(loss_fn)
    batch['index'] = spec((batch_size,), jnp.int32)
    args = (augmult.step_key(state.step),)

  def make(m):
    fn = clipped_grad_fn(plan, loss_fn, m, grad_route)
    return jax.jit(lambda params, batch, mask, clip_state, args: fn(
        params, batch, mask, clip_state=clip_state, args=args))

  return autotune.microbatch_size(
      make, (state.params, batch, spec((batch_size,), jnp.bool_),
             state.clip_state, args), batch_size, int(budget_mb * 2**20))


def layerwise_thresholds(plan: plan_lib.DPPlan, model: nn.Module,
                         splits: data_lib.DataSplits, model_state: Any = None):
  """The run's ALC schedule (None unless clipping.layers = 'alc').

  It sees ``splits.public`` only: the private split never sets a threshold.
  BatchNorm models run in inference mode on the (public or initial)
  statistics ``model_state``.
  """
  public = None if splits.public is None else {
      'image': jnp.asarray(splits.public.images),
      'label': jnp.asarray(splits.public.labels)}
  return plan.layerwise_thresholds(example_loss(model, model_state), public)


def privacy_config(config: ml_collections.ConfigDict) -> plan_lib.PrivacyConfig:
  """The privacy settings of ``config.privacy`` as a :class:`PrivacyConfig`.

  On the command line a set ``steps`` replaces ``epochs`` and a set
  ``noise_multiplier`` replaces ``target_epsilon``, so one override suffices.
  """
  p = config.privacy
  steps_given = p.steps is not None
  sigma_given = p.noise_multiplier is not None
  clipping = plan_lib.ClippingConfig(**p.clipping.to_dict()) if (
      'clipping' in p) else plan_lib.ClippingConfig()
  return plan_lib.PrivacyConfig(
      clip_norm=p.clip_norm, noise_multiplier=p.noise_multiplier,
      target_epsilon=None if sigma_given else p.target_epsilon,
      delta=p.delta, expected_batch_size=p.expected_batch_size,
      epochs=None if steps_given else p.epochs, steps=p.steps,
      accountant=p.accountant, clipping=clipping)


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The normalization and width options of ``config.model`` for get_model."""
  return {k: config[k] for k in ('norm', 'num_groups', 'scale_norm', 'width',
                                 'affine') if k in config}


def data_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The public-data, subset and feature options of ``config.data`` for
  data.load."""
  return {k: config[k] for k in ('public_dataset', 'public_manual_dir',
                                 'public_size', 'train_size', 'features')
          if k in config}


def normalization_config(
    config: ml_collections.ConfigDict) -> normalization.NormalizationConfig:
  """``config.normalization`` as a :class:`NormalizationConfig`."""
  fields = config.get('normalization') or {}
  return normalization.NormalizationConfig(seed=config.seed, **fields)


def _optimizer_chain(config: ml_collections.ConfigDict,
                     plan: plan_lib.DPPlan | None, keys: RunKeys,
                     num_steps: int) -> optax.GradientTransformation:
  """noise -> optimizer -> ModelMix -> parameter averages.

  ModelMix acts on the parameters the optimizer produced; the averages come
  last so that they see the parameters the step really ends with.
  """
  optimizer = make_optimizer(config.optimizer, num_steps)
  prune_mode = pruning_config(config).mode
  if plan and prune_mode != 'none':
    # Noise on the selected coordinates only (and, frozen, no optimizer move).
    tx = pruning.masked_chain(plan.noise(keys.noise), optimizer, prune_mode)
  else:
    tx = optax.chain(plan.noise(keys.noise), optimizer) if plan else optimizer
  if config.get('modelmix') is not None and config.modelmix.enabled:
    tau = config.modelmix.tau_over_lr * config.optimizer.learning_rate
    tx = optax.chain(tx, modelmix_lib.mix_model_states(tau, keys.mix))
  averages = []
  if config.averaging.ema_decay is not None:
    averages.append(averaging.ema_params(config.averaging.ema_decay))
  if config.averaging.polyak:
    averages.append(
        averaging.polyak_params(config.averaging.polyak_start_step))
  return optax.chain(tx, *averages) if averages else tx


def pruning_config(config: ml_collections.ConfigDict) -> pruning.PruningConfig:
  """``config.pruning`` (absent: no pruning) as a :class:`PruningConfig`."""
  if 'pruning' not in config:
    return pruning.PruningConfig()
  return pruning.PruningConfig(**config.pruning.to_dict())


def _pruner(config: ml_collections.ConfigDict,
            model: nn.Module) -> pruning.Pruner | None:
  """The run's mask chooser (None without pruning); refuses what cannot mix."""
  prune = pruning_config(config)
  if prune.mode == 'none':
    return None
  if not config.privacy.enabled:
    raise ValueError('config.pruning applies to DP-SGD; set'
                     " privacy.enabled=True or pruning.mode='none'.")
  if config.get('modelmix') is not None and config.modelmix.enabled:
    raise ValueError(
        'config.pruning and modelmix.enabled do not compose: ModelMix moves'
        ' every coordinate (frozen ones too) and its accountant assumes all'
        " are mixed. Set modelmix.enabled=False or pruning.mode='none'.")
  return pruning.make_pruner(prune, example_loss(model))


def _augmult(config: ml_collections.ConfigDict) -> augmult_lib.AugMult | None:
  if not config.augmult.num_views:
    return None
  return augmult_lib.AugMult(
      augmult_lib.get_augmentation(tuple(config.augmult.augmentations)),
      config.augmult.num_views, config.seed)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains with DP-SGD as ``config`` says; writes summary.json and a plot.

  Resumes from the newest good checkpoint in ``workdir/checkpoints`` (if its
  run had the same privacy settings; else a clear error), and checkpoints
  every ``config.perf.checkpoint_every_steps`` steps.

  Args:
    config: an ml_collections config (see ``configs/default.py``).
    workdir: output directory (created if missing).

  Returns:
    The summary written to ``workdir/summary.json``.
  """
  start = time.time()
  config_validation.validate_config(config)
  if config.perf.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize()  # auto-detects SLURM, Open MPI, TPU pods
  splits = data_lib.load(config.data.name, manual_dir=config.data.manual_dir,
                         tfds_data_dir=config.data.tfds_data_dir,
                         public_fraction=config.data.public_fraction,
                         **data_options(config.data))
  config_validation.check_splits(splits)
  n = len(splits.train)

  model = models.get_model(config.model.name, splits.num_classes,
                           config.model.activation,
                           **model_options(config.model))
  pruner = _pruner(config, model)
  keys = RunKeys.from_seed(config.seed)
  num_devices = config.perf.num_devices or jax.device_count()
  mesh = distributed.make_mesh(num_devices) if num_devices != 1 else None
  physical = config.perf.physical_batch_size
  pad = config.perf.pad_to_multiple_of
  if mesh is not None or physical is not None:
    pad = distributed.batch_multiple(
        num_devices, physical, pad or sampling.PoissonSampler(
            n, config.privacy.expected_batch_size).pad_to_multiple_of)

  private = config.privacy.enabled
  mixing = config.get('modelmix') is not None and config.modelmix.enabled
  image_shape = splits.train.images.shape[1:]
  variables_shape = jax.eval_shape(model.init, jax.random.key(0),
                                   jnp.zeros((1,) + image_shape))
  if private:
    params_shape = variables_shape['params']
    plan = plan_lib.make_plan(
        privacy_config(config), n, pad_to_multiple_of=pad,
        sampler_seed=config.seed, params=params_shape, clip_key=keys.clip)
    sampler, num_steps = plan.sampler, plan.num_steps
    if mixing:
      plan = modelmix_lib.with_refined_clipping(plan, config.modelmix.p)
  else:
    plan = None
    sampler = sampling.PoissonSampler(
        n, config.privacy.expected_batch_size, pad_to_multiple_of=pad,
        seed=config.seed)
    num_steps = privacy_config(config).steps or accounting.steps_for_epochs(
        config.privacy.epochs, sampler.sampling_rate)

  normalizer = normalization.make_normalizer(
      model, variables_shape, normalization_config(config),
      public_images=None if splits.public is None else splits.public.images,
      plan=plan, private=private,
      batch_clipping=private and plan.mode == 'batch')
  if mixing and normalizer.has_aux:
    raise ValueError(
        "normalization.policy 'privatized' releases statistics beside the"
        " gradient, which the ModelMix accountant does not cover; use"
        " 'public' or 'frozen' with modelmix.enabled.")
  if private:
    # 'privatized' statistics take their share of the gradient's noise.
    plan = normalizer.noise_plan(plan)
  tx = _optimizer_chain(config, plan, keys, num_steps)
  if mixing:
    mixing_report = _modelmix_report(
        config, plan, config.modelmix.tau_over_lr
        * config.optimizer.learning_rate)
  state = create_train_state(model, keys.init, image_shape, tx, normalizer)
  alc = None
  if private:
    state = state.replace(clip_state=plan.clipping.init(state.params))
    alc = layerwise_thresholds(plan, model, splits, state.model_state)
  public_split = None
  if pruner is not None:
    if pruning_config(config).needs_public_data and splits.public is not None:
      public_split = {'image': jnp.asarray(splits.public.images),
                      'label': jnp.asarray(splits.public.labels)}
      if mesh is not None:
        public_split = distributed.put_replicated(public_split, mesh)
    # The mask is data-independent or public: it costs no privacy.
    params, pruning_state = jax.jit(pruner.init)(state.params, keys.prune,
                                                 public_split)
    state = state.replace(params=params, opt_state=tx.init(params),
                          pruning=pruning_state)
  microbatch = config.perf.microbatch_size
  grad_route = config.perf.get('grad_route', 'auto')
  budget_mb = config.perf.get('memory_budget_mb')
  if private and budget_mb:
    if microbatch is not None or mesh is not None:
      raise ValueError(
          'perf.memory_budget_mb picks perf.microbatch_size on one device: set'
          ' one of the two, and perf.num_devices=1 (got microbatch_size='
          f'{microbatch}, num_devices={num_devices}).')
    if state.model_state:
      raise ValueError(
          'perf.memory_budget_mb does not tune models with BatchNorm'
          ' statistics yet; set perf.microbatch_size instead.')
    microbatch = tune_microbatch(
        model, plan, state, splits.train, physical or sampler.max_batch_size,
        budget_mb=budget_mb, grad_route=grad_route, augmult=_augmult(config))
  train_step = make_train_step(model, plan, microbatch,
                               mesh=mesh, physical_batch_size=physical,
                               augmult=_augmult(config), pruner=pruner,
                               public_split=public_split,
                               normalizer=normalizer, stats_key=keys.stats,
                               grad_route=grad_route)
  evaluate = make_eval_fn(model, normalizer=normalizer)
  images = jnp.asarray(splits.train.images)
  labels = jnp.asarray(splits.train.labels)
  if mesh is not None:
    state, images, labels = distributed.put_replicated(
        (state, images, labels), mesh)

  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpoint.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      checkpoint.privacy_fields(config, n))
  restored = checkpointer.restore(state)
  meta: dict[str, Any] = {
      'step': 0, 'ledger': [], 'num_nonfinite': 0, 'train_time_s': 0.0,
      'compiled_batch_sizes': [], 'resumed_from': [],
      'history': {'step': [], 'test_accuracy': [], 'test_loss': [],
                  'epsilon': []}}
  if restored is not None:
    state, meta = restored
    meta['resumed_from'] = meta['resumed_from'] + [meta['step']]
  start_step = meta['step']
  ledger = checkpoint.ledger_from_json(meta['ledger'])
  history: dict[str, list[float]] = meta['history']
  padded_sizes = set(meta['compiled_batch_sizes'])
  num_nonfinite = jnp.asarray(meta['num_nonfinite'], jnp.int32)

  delta = config.privacy.delta
  eval_every = config.eval_every_steps or max(1, num_steps // 10)
  # Evaluations during training may use a subset; the last uses every example.
  eval_set = data_lib.eval_subset(splits.test, config.get('eval_size'))
  ckpt_every = config.perf.checkpoint_every_steps
  ckpt_every = eval_every if ckpt_every is None else ckpt_every
  eps = 0.0
  if mixing:
    history.setdefault('epsilon_modelmix', [])
  bar = tqdm.trange(start_step, num_steps,
                    desc='DP-SGD' if private else 'SGD',
                    initial=start_step, total=num_steps,
                    disable=not config.progress_bar, dynamic_ncols=True)
  for step in bar:
    if alc is not None and alc.due(step):
      state = state.replace(clip_state=state.clip_state._replace(
          clip_norms=alc(state.params, step)))
    batch = sampler.sample(step)
    padded_sizes.add(len(batch.indices))
    state, metrics = train_step(state, images, labels, batch.indices,
                                batch.mask, normalizer.public_batch(step))
    if private:
      plan.record_step(ledger, step)
      num_nonfinite += metrics['num_nonfinite']
    last = step + 1 == num_steps
    log_now = (step + 1) % config.log_every_steps == 0 or last
    eval_now = (step + 1) % eval_every == 0 or last
    if private and (log_now or eval_now):
      eps = ledger.epsilon(delta, config.privacy.accountant)
      if mixing:
        mixing_report.update(ledger)
    if log_now:
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", eps=f'{eps:.3f}',
                      **(mixing_report.postfix() if mixing else {}))
    if eval_now:
      test_set = splits.test if last else eval_set
      result = evaluate(state.params, test_set, state.model_state)
      history['step'].append(step + 1)
      history['test_accuracy'].append(result['accuracy'])
      history['test_loss'].append(result['loss'])
      history['epsilon'].append(eps if private else float('inf'))
      if mixing:
        history['epsilon_modelmix'].append(mixing_report.plot_value())
      for name, params in averaging.averaged_params(state.opt_state).items():
        history.setdefault(f'test_accuracy_{name}', []).append(
            evaluate(params, test_set, state.model_state)['accuracy'])
    if ckpt_every and ((step + 1) % ckpt_every == 0 or last):
      checkpointer.save(step + 1, state, dict(
          meta, ledger=checkpoint.ledger_to_json(ledger), history=history,
          num_nonfinite=int(num_nonfinite),
          compiled_batch_sizes=sorted(padded_sizes),
          train_time_s=meta['train_time_s'] + time.time() - start))
  bar.close()
  checkpointer.close()

  summary: dict[str, Any] = plan.summary(state.clip_state) if private else {
      'epsilon': float('inf'), 'delta': None, 'noise_multiplier': 0.0,
      'accountant': None, 'steps': num_steps,
      'sampling_rate': sampler.sampling_rate, 'clip_norm': None}
  if private:
    summary['epsilon'] = ledger.epsilon(delta, config.privacy.accountant)
  if mixing:
    mixing_report.update(ledger)
    summary.update(mixing_report.summary())
  if private and normalizer.policies:
    summary.update(normalizer.summary())
  summary.update({
      'private': private,
      'dataset': splits.name,
      'public_examples': 0 if splits.public is None else len(splits.public),
      'model': config.model.name,
      'test_accuracy': history['test_accuracy'][-1],
      'test_loss': history['test_loss'][-1],
      'train_time_s': meta['train_time_s'] + time.time() - start,
      'num_nonfinite_gradients': int(num_nonfinite),
      'compiled_batch_sizes': sorted(padded_sizes),
      'num_devices': num_devices,
      'physical_batch_size': physical,
      'augmult_views': config.augmult.num_views,
      'pruning': (None if pruner is None else pruning.summary(
          pruning_config(config), state.params)),
      'resumed_from_steps': meta['resumed_from'],
      'microbatch_size': microbatch,
      'config': config.to_dict(),
  })
  for name in ('ema', 'polyak'):
    if f'test_accuracy_{name}' in history:
      summary[f'test_accuracy_{name}'] = history[f'test_accuracy_{name}'][-1]
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(workdir, 'summary.json'),
                                 summary)
    checkpoint.write_json_atomic(os.path.join(workdir, 'history.json'),
                                 history)
    plots.plot_training(history, os.path.join(workdir, 'training.png'),
                        title=f'{splits.name} / {config.model.name}')
  return summary


def _modelmix_report(config: ml_collections.ConfigDict,
                     plan: plan_lib.DPPlan | None,
                     tau: float) -> modelmix_lib.ModelMixReport:
  """The ModelMix epsilon's tracker, with the assumptions ``config`` breaks."""
  if plan is None:
    return modelmix_lib.ModelMixReport(None, tau)
  failures = modelmix_lib.failed_assumptions(
      optimizer=config.optimizer.name, momentum=config.optimizer.momentum,
      constant_learning_rate=config.optimizer.schedule == 'constant',
      clipping=plan.clipping,
      poisson_sampling=isinstance(plan.sampler, sampling.PoissonSampler),
      relation=plan.relation)
  accountant = modelmix_lib.ModelMixAccountant(plan,
                                               config.modelmix.tau_over_lr)
  return modelmix_lib.ModelMixReport(accountant, tau, failures)
