"""Everything a run is built from its config, once: ``from_config``.

The config's sections become typed objects here and nowhere else: the data,
the model, the key schedule, the plan (which declares every release of the
run: the gradient, adaptive counts, privatized statistics, ModelMix's clamp),
the features (:mod:`dpjax.training.features`, checked against the one
refusal table), the engine and the initial state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dpjax import augmult as augmult_lib
from dpjax import checkpoint
from dpjax import config_validation
from dpjax import data as data_lib
from dpjax import distributed
from dpjax import engines
from dpjax import keys as keys_lib
from dpjax import modelmix as modelmix_lib
from dpjax import models
from dpjax import normalization
from dpjax import plan as plan_lib
from dpjax import pruning
from dpjax import sampling
from dpjax import transformers
from dpjax.training import features as features_lib
from dpjax.training import state as state_lib
from dpjax.training import step as step_lib


def privacy_config(config: ml_collections.ConfigDict, *,
                   stats_share: float | None = None,
                   linf_p: float | None = None,
                   initial_noise_multiplier: float | None = None
                   ) -> plan_lib.PrivacyConfig:
  """The privacy settings of ``config.privacy`` as a :class:`PrivacyConfig`.

  ``stats_share``, ``linf_p`` and ``initial_noise_multiplier`` declare the
  releases other features add (privatized statistics, per step or once
  before training; ModelMix's clamp). Exactly one of
  ``noise_multiplier`` and ``target_epsilon`` is set (config_validation
  refuses both); a set ``steps`` replaces ``epochs``.
  """
  p = config.privacy
  clipping = plan_lib.ClippingConfig(**p.clipping.to_dict()) if (
      'clipping' in p) else plan_lib.ClippingConfig()
  return plan_lib.PrivacyConfig(
      clip_norm=p.clip_norm, noise_multiplier=p.noise_multiplier,
      target_epsilon=p.target_epsilon, delta=p.delta,
      expected_batch_size=p.expected_batch_size,
      epochs=None if p.steps is not None else p.epochs, steps=p.steps,
      accountant=p.accountant, clipping=clipping,
      secure_noise=p.get('secure_noise', False), linf_p=linf_p,
      stats_share=stats_share,
      initial_noise_multiplier=initial_noise_multiplier)


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The normalization, width and transformer options of ``config.model``
  for get_model (transformer options only where set)."""
  options = {k: config[k] for k in ('norm', 'num_groups', 'scale_norm',
                                    'width', 'affine') if k in config}
  options.update({k: config[k] for k in transformers.OPTIONS
                  if config.get(k) is not None})
  return options


def data_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The public-data, subset, own-data and feature options of config.data."""
  return {k: config[k] for k in (
      'public_dataset', 'public_manual_dir', 'public_size', 'train_size',
      'path', 'num_classes', 'test_fraction', 'features') if k in config}


def normalization_config(
    config: ml_collections.ConfigDict) -> normalization.NormalizationConfig:
  """``config.normalization`` as a :class:`NormalizationConfig`."""
  fields = config.get('normalization') or {}
  return normalization.NormalizationConfig(**fields)


def pruning_config(config: ml_collections.ConfigDict) -> pruning.PruningConfig:
  """``config.pruning`` (absent: no pruning) as a :class:`PruningConfig`."""
  if 'pruning' not in config:
    return pruning.PruningConfig()
  return pruning.PruningConfig(**config.pruning.to_dict())


def modelmix_enabled(config: ml_collections.ConfigDict) -> bool:
  return config.get('modelmix') is not None and config.modelmix.enabled


def augmult_of(config: ml_collections.ConfigDict,
               keys: keys_lib.KeySchedule) -> augmult_lib.AugMult | None:
  if not config.augmult.num_views:
    return None
  return augmult_lib.AugMult(
      augmult_lib.get_augmentation(tuple(config.augmult.augmentations)),
      config.augmult.num_views, keys.root(keys_lib.AUGMENT))


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A run built from its config, ready for the loop."""

  config: ml_collections.ConfigDict
  splits: data_lib.DataSplits
  model: nn.Module
  keys: keys_lib.KeySchedule
  plan: Any  # DPPlan, ShufflePlan or NonPrivatePlan
  features: features_lib.Features
  normalizer: normalization.Normalizer
  mesh: jax.sharding.Mesh | None
  num_devices: int
  microbatch: int | None
  state: state_lib.TrainState
  step: Any
  checkpointer: checkpoint.Checkpointer


def load_data(config: ml_collections.ConfigDict,
              workdir: str) -> data_lib.DataSplits:
  """The run's splits, checked (structure refused, out-of-domain counted)."""
  splits = data_lib.load(
      config.data.name, manual_dir=config.data.manual_dir,
      tfds_data_dir=data_lib.cache_root(config.data.tfds_data_dir, workdir),
      public_fraction=config.data.public_fraction,
      key=keys_lib.public_root(config.seed, keys_lib.DATA),
      **data_options(config.data))
  config_validation.check_splits(splits)
  return splits


def _padding(config, n: int, num_devices: int, keys) -> int | None:
  """The sampler's pad multiple: devices and physical batches divide it."""
  pad = config.perf.pad_to_multiple_of
  physical = config.perf.physical_batch_size
  if num_devices == 1 and physical is None:
    return pad
  default = sampling.PoissonSampler(
      n, config.privacy.expected_batch_size,
      key=keys.root(keys_lib.SAMPLER)).pad_to_multiple_of
  return distributed.batch_multiple(num_devices, physical, pad or default)


def make_plan(config, n: int, keys, params_shape, pad: int | None,
              normalizer_policy: str | None):
  """The run's plan, every release it makes declared up front."""
  if not config.privacy.enabled:
    p = config.privacy
    return plan_lib.make_nonprivate_plan(
        p.expected_batch_size, n, steps=p.steps,
        epochs=None if p.steps is not None else p.epochs,
        pad_to_multiple_of=pad, keys=keys)
  norm = normalization_config(config)
  stats_share = (norm.stats_budget if normalizer_policy == 'privatized'
                 else None)
  initial = (norm.once_noise_multiplier
             if normalizer_policy == 'privatized_once' else None)
  linf_p = config.modelmix.p if modelmix_enabled(config) else None
  return plan_lib.make_plan(
      privacy_config(config, stats_share=stats_share, linf_p=linf_p,
                     initial_noise_multiplier=initial), n,
      pad_to_multiple_of=pad, keys=keys, params=params_shape)


def _pruner(config, model: nn.Module) -> pruning.Pruner | None:
  prune = pruning_config(config)
  if prune.mode == 'none':
    return None
  return pruning.make_pruner(prune, features_lib.example_loss(model))


def _public_split(config, splits, mesh):
  """The public split on the device(s), for pruning's public sources."""
  if not (pruning_config(config).needs_public_data
          and splits.public is not None):
    return None
  public = {'image': jnp.asarray(splits.public.images),
            'label': jnp.asarray(splits.public.labels)}
  return public if mesh is None else distributed.put_replicated(public, mesh)


def _modelmix_report(config, plan) -> modelmix_lib.ModelMixReport:
  """The ModelMix epsilon's tracker, with the assumptions the run breaks."""
  tau = config.modelmix.tau_over_lr * config.optimizer.learning_rate
  if not plan.private:
    return modelmix_lib.ModelMixReport(None, tau)
  failures = modelmix_lib.failed_assumptions(
      optimizer=config.optimizer.name, momentum=config.optimizer.momentum,
      constant_learning_rate=config.optimizer.schedule == 'constant',
      clipping=plan.clipping,
      poisson_sampling=isinstance(plan.sampler, sampling.PoissonSampler),
      relation=plan.relation)
  if pruning_config(config).mode != 'none':
    failures.append('every coordinate noised and mixed alike: config.pruning'
                    ' noises the selected coordinates only')
  if plan.stats_noise_multiplier is not None:
    failures.append('the noisy gradient is the only release: privatized'
                    ' BatchNorm statistics are released beside it')
  if plan.config.initial_noise_multiplier is not None:
    failures.append('the noisy gradients are the only releases: BatchNorm'
                    ' statistics are released once before training')
  accountant = modelmix_lib.ModelMixAccountant(plan,
                                               config.modelmix.tau_over_lr)
  return modelmix_lib.ModelMixReport(accountant, tau, failures)


def build_features(config, model, plan, keys, normalizer, splits, mesh
                   ) -> features_lib.Features:
  """The run's features, in the order the step applies them."""
  items = []
  if normalizer.policies:
    items.append(features_lib.NormalizationFeature(
        normalizer, keys.root(keys_lib.STATS)))
  if getattr(model, 'dropout_rate', 0):
    if normalizer.policies:
      raise ValueError(
          'model.dropout_rate > 0 with a BatchNorm policy is not implemented'
          ' (the policy\'s loss runs without dropout); set dropout_rate=0.')
    items.append(features_lib.DropoutFeature(keys.root(keys_lib.DROPOUT)))
  if getattr(model, 'lora_rank', 0):
    items.append(features_lib.FrozenFeature())
  augmult = augmult_of(config, keys)
  if augmult is not None:
    items.append(features_lib.AugMultFeature(augmult))
  pruner = _pruner(config, model)
  if pruner is not None:
    items.append(features_lib.PruningFeature(
        pruner, pruning_config(config), _public_split(config, splits, mesh)))
  if modelmix_enabled(config):
    items.append(features_lib.ModelMixFeature(
        config.modelmix.tau_over_lr * config.optimizer.learning_rate,
        keys.root(keys_lib.MIX), _modelmix_report(config, plan)))
  avg = config.averaging
  items.append(features_lib.AveragingFeature(
      avg.ema_decay, avg.polyak, avg.polyak_start_step))
  return features_lib.Features(tuple(items))


def alc_feature(plan, model, splits, model_state
                ) -> features_lib.AlcFeature | None:
  """The run's ALC schedule (None unless clipping.layers = 'alc').

  It sees ``splits.public`` only: the private split never sets a threshold.
  BatchNorm models run in inference mode on the (public or initial)
  statistics ``model_state``.
  """
  if not plan.private:
    return None
  public = None if splits.public is None else {
      'image': jnp.asarray(splits.public.images),
      'label': jnp.asarray(splits.public.labels)}
  schedule = plan.layerwise_thresholds(
      features_lib.example_loss(model, model_state), public)
  return None if schedule is None else features_lib.AlcFeature(schedule)


def _initial_state(config, run_parts) -> state_lib.TrainState:
  """The state at step 0: parameters, optimizer, clip state, pruning mask,
  and the statistics a ``privatized_once`` policy releases before training
  (recorded in the ledger by the loop, through the plan)."""
  model, plan, keys, features, normalizer, inputs = run_parts
  optimizer = state_lib.make_optimizer(config.optimizer, plan.num_steps)
  tx = features.optimizer_chain(plan, optimizer)
  init_from = config.get('init_from')
  state = state_lib.create_train_state(
      model, keys.key(keys_lib.INIT), inputs.shape[1:], tx, normalizer,
      input_dtype=inputs.dtype,
      pretrained=None if init_from is None else checkpoint.load_params(
          init_from, config.data.name))
  state = state.replace(clip_state=plan.init_clip_state(state.params))
  if normalizer.releases_once:
    state = state.replace(model_state=normalizer.release_once(
        state.params, state.model_state, inputs,
        keys.key(keys_lib.STATS_ONCE), progress=config.progress_bar))
  prune = features.get('pruning')
  if prune is not None:
    # The mask is data-independent or public: it costs no privacy.
    params, pruning_state = jax.jit(prune.pruner.init)(
        state.params, keys.root(keys_lib.PRUNE), prune.public_split)
    state = state.replace(params=params, opt_state=tx.init(params),
                          pruning=pruning_state)
  return state


# XLA:CPU leaves a convolution's kernel gradient uncanonicalized inside a
# while loop (the microbatch scan) and runs it on a slow generic path: 91x a
# whole-batch call for a 3x3 conv on 243 channels (docs/BENCHMARKS.md). The
# summed (non-private) engine does not microbatch.
CPU_SCAN_WARNING = (
    'perf.microbatch_size on a CPU: XLA:CPU runs convolution gradients inside'
    ' the microbatch scan many times slower (docs/BENCHMARKS.md, "Microbatches'
    ' on a CPU"); for a convolutional model bound memory with'
    ' perf.physical_batch_size instead.')


def _microbatch(config, model, plan, state, features, splits, mesh) -> int | None:
  """perf.microbatch_size, or the largest within perf.memory_budget_mb."""
  microbatch = config.perf.microbatch_size
  budget_mb = config.perf.get('memory_budget_mb')
  if plan.private and budget_mb:
    if microbatch is not None or mesh is not None:
      raise ValueError(
          'perf.memory_budget_mb picks perf.microbatch_size on one device: set'
          ' one of the two, and perf.num_devices=1 (got microbatch_size='
          f'{microbatch}, num_devices={1 if mesh is None else mesh.size}).')
    microbatch = step_lib.tune_microbatch(
        model, plan, state, splits.train,
        config.perf.physical_batch_size or plan.sampler.max_batch_size,
        budget_mb=budget_mb, grad_route=config.perf.get('grad_route', 'auto'),
        features=features)
  if (plan.private and microbatch is not None
      and jax.default_backend() == 'cpu'
      and microbatch < (config.perf.physical_batch_size
                        or max(plan.sampler.padded_sizes))):
    logging.warning(CPU_SCAN_WARNING)
  return microbatch


def from_config(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Builds the run ``config`` describes: data to step, nothing run yet."""
  config_validation.validate_config(config)
  if config.perf.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize()  # auto-detects SLURM, Open MPI, TPU pods
  splits = load_data(config, workdir)
  n = len(splits.train)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpoint.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      checkpoint.privacy_fields(config, n))
  keys = state_lib.key_schedule(config, checkpointer.stored_secret())
  model = models.get_model(config.model.name, splits.num_classes,
                           config.model.activation,
                           **model_options(config.model))
  num_devices = config.perf.num_devices or jax.device_count()
  mesh = distributed.make_mesh(num_devices) if num_devices != 1 else None
  inputs = splits.train.images
  variables = jax.eval_shape(model.init, keys.key(keys_lib.INIT),
                             jnp.zeros((1,) + inputs.shape[1:], inputs.dtype))
  norm_config = normalization_config(config)
  policy = normalization.resolve_policies(
      variables, norm_config).get(normalization.BATCH_STATS)
  plan = make_plan(config, n, keys, variables['params'],
                   _padding(config, n, num_devices, keys), policy)
  normalizer = normalization.make_normalizer(
      model, variables, norm_config,
      public_images=None if splits.public is None else splits.public.images,
      plan=plan if plan.private else None, private=plan.private,
      batch_clipping=plan.mode == 'batch',
      public_key=keys.root(keys_lib.PUBLIC_BATCH))
  features = build_features(config, model, plan, keys, normalizer, splits,
                            mesh)
  state = _initial_state(config, (model, plan, keys, features, normalizer,
                                  inputs))
  alc = alc_feature(plan, model, splits, state.model_state)
  if alc is not None:
    features = features_lib.Features(features.items + (alc,))
  microbatch = _microbatch(config, model, plan, state, features, splits, mesh)
  step = step_lib.make_train_step(
      model, plan, microbatch, mesh=mesh,
      physical_batch_size=config.perf.physical_batch_size,
      grad_route=config.perf.get('grad_route', 'auto'), features=features)
  return Run(config, splits, model, keys, plan, features, normalizer, mesh,
             num_devices, microbatch, state, step, checkpointer)
