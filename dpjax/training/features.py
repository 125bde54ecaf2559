"""A run's features as typed objects, built once, and the one refusal table.

Each feature of a training run (a normalization policy, pruning,
augmentation multiplicity, ModelMix, parameter averages, ALC thresholds) is
one object with the hooks the step needs, in step order:

* ``wrap_loss``: the per-example loss it adds to (losses read their inputs
  by name from :class:`dpjax.StepInputs`, so the order of wrapping is free);
* ``prepare``: once per logical step, on the device, before any physical
  batch: its fields of the step's inputs (a key, a mask, statistics);
* ``piece_sums``: additive statistics of each physical batch (privatized
  moments), noised once later;
* ``after_step``: its state after the step (privatized or public
  statistics);
* ``update_kwargs``, ``chain``: what it adds to the optimizer chain;
* ``summary``: its entries in summary.json.

Which combinations a run may not make is decided in ONE place,
:data:`REFUSALS`: each refusal says why (the privacy reason, or that a
route is not implemented), and docs/COMPOSITION.md is generated from it
(``python scripts/composition.py``; a test keeps it current).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dpjax import augmult as augmult_lib
from dpjax import averaging
from dpjax import batch_clipping
from dpjax import engines
from dpjax import example_keys
from dpjax import keys as keys_lib
from dpjax import losses
from dpjax import modelmix as modelmix_lib
from dpjax import normalization
from dpjax import per_example
from dpjax import plan as plan_lib
from dpjax import pruning

PyTree = Any


def example_loss(model: nn.Module,
                 model_state: Any = None) -> Callable[..., Any]:
  """Cross-entropy of ONE example ``{'image': [H, W, C] | 'tokens': [T],
  'label': [] | [T]}``.

  ``loss_fn(params, example, inputs=None)``. A label per token (next-token
  prediction) gives the mean of the per-token losses, so every example's
  loss has the same scale. A label outside the model's classes contributes
  nothing (:mod:`dpjax.losses`).

  The non-parameter collections are ``model_state`` if given, else
  ``inputs.model_state`` (e.g. LoRA's frozen weights, :class:`FrozenFeature`).
  With ``inputs.dropout_key`` set (:class:`DropoutFeature`) the model runs
  with dropout (``deterministic=False``) keyed by the example's own key,
  ``fold_in(dropout_key, example['index'])`` (:mod:`dpjax.example_keys`):
  the same in any row, microbatch or device. Otherwise it is deterministic.
  """

  def loss_fn(params, example, inputs=None):
    state = model_state
    if state is None and inputs is not None:
      state = inputs.model_state
    kwargs = {}
    if inputs is not None and inputs.dropout_key is not None:
      key = example_keys.example_key(inputs.dropout_key, example['index'])
      kwargs = {'deterministic': False, 'rngs': {'dropout': key}}
    field = 'tokens' if 'tokens' in example else 'image'
    logits = model.apply({'params': params, **(state or {})},
                         example[field][None], **kwargs)[0]
    return losses.cross_entropy(logits, example['label']).mean()

  return loss_fn


class Feature:
  """A feature of a run; every hook defaults to doing nothing."""

  name = 'feature'
  needs_index = False  # whether the loss reads each example's dataset index

  def wrap_loss(self, loss: engines.LossSpec) -> engines.LossSpec:
    return loss

  def prepare(self, state, public) -> tuple[Any, dict[str, Any]]:
    """``(state, fields)``: StepInputs fields (and ``_``-prefixed context)."""
    del public
    return state, {}

  def piece_sums(self, state, context, out, mask) -> dict[str, Any]:
    del state, context, out, mask
    return {}

  def after_step(self, state, sums, context):
    del sums, context
    return state

  def update_kwargs(self, state) -> dict[str, Any]:
    del state
    return {}

  def chain(self, tx: optax.GradientTransformation
            ) -> optax.GradientTransformation:
    return tx

  def before_host_step(self, state, step: int):
    del step
    return state

  def summary(self, state) -> dict[str, Any]:
    del state
    return {}


@dataclasses.dataclass(frozen=True, eq=False)
class AugMultFeature(Feature):
  """Augmentation multiplicity (De et al. 2022): views averaged per example."""

  augmult: augmult_lib.AugMult
  name = 'augmult'
  needs_index = True

  def wrap_loss(self, loss):
    group = loss.group_loss_fn
    return loss._replace(
        loss_fn=self.augmult.loss(loss.loss_fn),
        group_loss_fn=None if group is None else self.augmult.group_loss(
            group))

  def prepare(self, state, public):
    del public
    return state, {'aug_key': self.augmult.step_key(state.step)}


@dataclasses.dataclass(frozen=True, eq=False)
class DropoutFeature(Feature):
  """Dropout in the per-example loss, one key per example.

  Each step's key is drawn from the run's secret stream ``keys.DROPOUT``
  (``root``), so no mask shares bits with the noise or the sampler; each
  example folds in its dataset index (:func:`example_loss`).
  """

  root: jax.Array
  name = 'dropout'
  needs_index = True

  def prepare(self, state, public):
    del public
    return state, {'dropout_key': keys_lib.for_step(self.root, state.step)}


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenFeature(Feature):
  """Non-trained collections the loss reads (LoRA's frozen weights).

  They reach the loss through ``inputs.model_state``, never as parameters:
  the engine neither differentiates nor clips nor noises them.
  """

  name = 'frozen'

  def prepare(self, state, public):
    del public
    return state, {'model_state': state.model_state}


@dataclasses.dataclass(frozen=True, eq=False)
class PruningFeature(Feature):
  """Parameter freezing / selection (Adamczewski & Park 2023)."""

  pruner: pruning.Pruner
  pruner_config: pruning.PruningConfig | None = None
  public_split: Any = None
  name = 'pruning'

  @property
  def mode(self) -> str:
    return 'select' if self.pruner_config is None else self.pruner_config.mode

  def prepare(self, state, public):
    # The engine cuts each row's gradient to inputs.param_mask before
    # clipping (engines._with_inputs), on every route.
    del public
    state = state.replace(pruning=self.pruner.update(
        state.pruning, state.params, self.public_split))
    return state, {'param_mask': state.pruning.mask}

  def update_kwargs(self, state):
    return {'param_mask': state.pruning.mask}


@dataclasses.dataclass(frozen=True, eq=False)
class NormalizationFeature(Feature):
  """BatchNorm statistics under a policy (:mod:`dpjax.normalization`)."""

  normalizer: normalization.Normalizer
  stats_key: jax.Array | None = None
  name = 'normalization'

  @property
  def _train_bn(self) -> bool:
    """The non-private baseline: BatchNorm in training mode per piece."""
    return not self.normalizer.private

  def wrap_loss(self, loss):
    norm = self.normalizer
    if self._train_bn or norm.bn_policy == 'batch':
      group = normalization.batchnorm_group_loss(norm.model)
      return loss._replace(group_loss_fn=group, has_aux=True)
    return loss._replace(
        loss_fn=norm.example_loss(), has_aux=norm.has_aux,
        stats_through_public=(norm.bn_policy == 'public'
                              and norm.config.stats_gradient))

  def prepare(self, state, public):
    loss_state, next_state = self.normalizer.step_state(
        state.params, state.model_state, public)
    return state, {'model_state': loss_state, 'public': public,
                   '_next_model_state': next_state}

  def piece_sums(self, state, context, out, mask):
    norm = self.normalizer
    if self._train_bn:
      # A piece of padding only has no statistics (and NaN gradients).
      real = mask.any()
      stats = jax.tree.map(lambda x: jnp.where(real, x, 0),
                           out.stats.aux[normalization.BATCH_STATS])
      return {'bn_stats': stats, 'bn_pieces': real * 1}
    if norm.has_aux:
      # Clipped per-example moments: summed over pieces, noised once.
      return {'moment_sum': norm.moment_sum(context.inputs.model_state,
                                            out.stats.aux, mask)}
    return {}

  def after_step(self, state, sums, context):
    norm = self.normalizer
    model_state = state.model_state
    if self._train_bn:
      pieces = sums['bn_pieces']
      stats = jax.tree.map(
          lambda new, old: jnp.where(pieces > 0,
                                     new / jnp.maximum(pieces, 1), old),
          sums['bn_stats'], model_state[normalization.BATCH_STATS])
      model_state = {**model_state, normalization.BATCH_STATS: stats}
    elif norm.has_aux:
      model_state = norm.privatized_state(
          model_state, sums['moment_sum'],
          keys_lib.for_step(self.stats_key, state.step))
    elif norm.tracks_public:
      model_state = context.extra['_next_model_state']
    return state.replace(model_state=model_state)

  def summary(self, state):
    del state
    return self.normalizer.summary() if self.normalizer.private else {}


@dataclasses.dataclass(frozen=True, eq=False)
class ModelMixFeature(Feature):
  """ModelMix (Xiao, Wan, Devadas 2022): secret mixing of model states."""

  tau: float
  key: jax.Array
  report: modelmix_lib.ModelMixReport
  name = 'modelmix'

  def chain(self, tx):
    return optax.chain(tx, modelmix_lib.mix_model_states(self.tau, self.key))

  def summary(self, state):
    del state
    return self.report.summary()


@dataclasses.dataclass(frozen=True, eq=False)
class AveragingFeature(Feature):
  """EMA / Polyak parameter averages (post-processing, no privacy cost)."""

  ema_decay: float | None
  polyak: bool
  polyak_start_step: int = 0
  name = 'averaging'

  def chain(self, tx):
    averages = []
    if self.ema_decay is not None:
      averages.append(averaging.ema_params(self.ema_decay))
    if self.polyak:
      averages.append(averaging.polyak_params(self.polyak_start_step))
    return optax.chain(tx, *averages) if averages else tx


@dataclasses.dataclass(frozen=True, eq=False)
class AlcFeature(Feature):
  """Adaptive layerwise clipping thresholds from PUBLIC data (host-side)."""

  schedule: batch_clipping.LayerwiseThresholds
  name = 'alc'

  def before_host_step(self, state, step):
    if not self.schedule.due(step):
      return state
    return state.replace(clip_state=state.clip_state._replace(
        clip_norms=self.schedule(state.params, step)))


class Context(NamedTuple):
  """What ``prepare`` hands every physical batch and the update of a step."""

  inputs: per_example.StepInputs
  extra: dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Features:
  """The features of a run, applied in one order by the step."""

  items: tuple[Feature, ...] = ()

  def get(self, name: str) -> Feature | None:
    return next((f for f in self.items if f.name == name), None)

  @property
  def needs_index(self) -> bool:
    return any(f.needs_index for f in self.items)

  def loss_spec(self, model: nn.Module) -> engines.LossSpec:
    loss = engines.LossSpec(example_loss(model))
    for f in self.items:
      loss = f.wrap_loss(loss)
    return loss

  def prepare(self, state, public) -> tuple[Any, Context]:
    fields: dict[str, Any] = {}
    for f in self.items:
      state, new = f.prepare(state, public)
      fields.update(new)
    extra = {k: v for k, v in fields.items() if k.startswith('_')}
    inputs = per_example.StepInputs(
        **{k: v for k, v in fields.items() if not k.startswith('_')})
    return state, Context(inputs, extra)

  def piece_sums(self, state, context, out, mask) -> dict[str, Any]:
    sums: dict[str, Any] = {}
    for f in self.items:
      sums.update(f.piece_sums(state, context, out, mask))
    return sums

  def after_step(self, state, sums, context):
    for f in self.items:
      state = f.after_step(state, sums, context)
    return state

  def update_kwargs(self, state) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for f in self.items:
      kwargs.update(f.update_kwargs(state))
    return kwargs

  def optimizer_chain(self, plan, optimizer: optax.GradientTransformation
                      ) -> optax.GradientTransformation:
    """noise -> optimizer -> ModelMix -> parameter averages.

    ModelMix acts on the parameters the optimizer produced; the averages come
    last so that they see the parameters the step really ends with. Under
    pruning the noise falls on the selected coordinates only.
    """
    prune = self.get('pruning')
    if prune is not None:
      tx = pruning.masked_chain(plan.noise(), optimizer, prune.mode)
    else:
      tx = optax.chain(plan.noise(), optimizer)
    for f in self.items:
      tx = f.chain(tx)
    return tx

  def before_host_step(self, state, step: int):
    for f in self.items:
      state = f.before_host_step(state, step)
    return state

  def summary(self, state) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in self.items:
      out.update(f.summary(state))
    return out


# ---------------------------------------------------------------------------
# What may compose with what: the one table.


class Selection(NamedTuple):
  """One combination of a run's settings, as the refusal table sees it."""

  mode: str = 'flat'  # clipping mode; 'none': non-private
  route: str = 'auto'  # perf.grad_route
  devices: int = 1
  accumulation: bool = False  # physical batches
  normalization: str = 'none'  # no BatchNorm, or the policy
  pruning: str = 'none'
  modelmix: bool = False
  augmult: bool = False


class Refusal(NamedTuple):
  """A combination a run refuses, and why (the fix is in the message)."""

  applies: Callable[[Selection], bool]
  reason: str
  privacy: bool  # False: a route or feature not implemented, not a risk


REFUSALS: tuple[Refusal, ...] = (
    Refusal(lambda s: s.normalization == 'batch' and s.mode != 'batch',
            "normalization.policy='batch' runs BatchNorm in training mode,"
            " which mixes the examples of a batch: only clipping.mode='batch'"
            " bounds one example's influence then (through its group); use"
            " 'public', 'frozen' or 'privatized' with per-example clipping.",
            privacy=True),
    Refusal(lambda s: s.normalization == 'privatized' and s.mode == 'batch',
            "normalization.policy='privatized' releases per-example moments,"
            " accounted as a Poisson-subsampled Gaussian with the gradient;"
            " batch clipping's shuffling accountant (replace-one, per epoch)"
            " does not cover that release: use 'batch', 'public' or 'frozen'"
            ' with batch clipping.', privacy=True),
    Refusal(lambda s: s.normalization == 'privatized_once'
            and s.mode == 'batch',
            "normalization.policy='privatized_once' releases per-example"
            ' moments once under the add/remove relation; batch clipping\'s'
            ' shuffling accountant (replace-one) does not compose that'
            " release: use 'public' or 'frozen' with batch clipping.",
            privacy=True),
)


def check(selection: Selection) -> None:
  """Raises ValueError with the reason of the first refusal that applies."""
  for refusal in REFUSALS:
    if refusal.applies(selection):
      raise ValueError(refusal.reason)


def refusal_of(selection: Selection) -> Refusal | None:
  return next((r for r in REFUSALS if r.applies(selection)), None)


DIMENSIONS: dict[str, Sequence[Any]] = {
    'mode': plan_lib.CLIPPING_MODES + ('none',),
    'route': engines.ROUTES,
    'devices': (1, 2, 8),
    'accumulation': (False, True),
    'normalization': ('none',) + normalization.POLICIES[1:],
    'pruning': pruning.MODES,
    'modelmix': (False, True),
    'augmult': (False, True),
}


def selections() -> Iterable[Selection]:
  """Every combination of :data:`DIMENSIONS`."""
  for values in itertools.product(*DIMENSIONS.values()):
    yield Selection(*values)
