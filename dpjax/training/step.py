"""One logical DP-SGD step, in order, and the evaluation of a model.

sample (the loop) -> prepare (each feature's step inputs) -> gather ->
engine (clipped sum of each physical batch) -> accumulate -> noise ->
optimizer -> mix -> average (``state.tx``) -> the features' state. The
engine is the one :func:`dpjax.engines.select` chose, on one device or
sharded over a mesh; the noise is drawn once per logical step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import accumulation
from dpjax import augmult as augmult_lib
from dpjax import autotune
from dpjax import clipping as clipping_lib
from dpjax import data as data_lib
from dpjax import distributed
from dpjax import engines
from dpjax import losses
from dpjax import normalization
from dpjax import plan as plan_lib
from dpjax import pruning
from dpjax import sampling
from dpjax.training import features as features_lib

PyTree = Any


def _gather(data, indices, mask, with_index: bool) -> sampling.Batch:
  images, labels = data
  examples = {data_lib.input_field(images): images[indices],
              'label': labels[indices]}
  if with_index:
    examples['index'] = indices
  return sampling.Batch(examples, mask)


def build_step(plan, features: features_lib.Features, engine: engines.Engine,
               *, physical_batch_size: int | None = None,
               mesh: jax.sharding.Mesh | None = None):
  """``step(state, images, labels, indices, mask, public=None)``.

  One logical step of ``plan`` (private or not) with ``features``, the
  clipped sums computed by ``engine``; returns ``(state, metrics)``. The
  padded batch is cut into physical batches of ``physical_batch_size``
  rows (noise once, after all of them: :mod:`dpjax.accumulation`).
  """

  def grad_step(state, data, indices, mask, context):
    batch = _gather(data, indices, mask, features.needs_index)
    out = engine(state.params, batch, state.clip_state, context.inputs)
    sums = {
        # Per-group losses in 'batch' mode are means over m rows.
        'loss_sum': out.stats.losses.sum() * plan.group_size,
        'count': mask.sum(),
        'num_nonfinite': out.stats.num_nonfinite,
        'num_clipped': out.stats.num_clipped,
        # What the clipping accumulated (adaptive: counts); additive over
        # physical batches like the gradient sums.
        'clip_increment': clipping_lib.state_increment(
            state.clip_state, out.clip_state),
        **features.piece_sums(state, context, out, mask),
    }
    return out.grad_sum, sums

  def apply_step(state, grads, sums, context):
    clip_state = clipping_lib.add_state_increment(
        state.clip_state, sums['clip_increment'])
    state = features.after_step(state, sums, context)
    # The noise is scaled to the thresholds the sum was clipped with and
    # divides by the PUBLIC batch size (non-private: the realized count).
    updates, opt_state = state.tx.update(
        grads, state.opt_state, state.params, clip_state=clip_state,
        count=sums['count'], **features.update_kwargs(state))
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state, clip_state=plan.end_step(clip_state))

  place = None if mesh is None else (
      lambda x: distributed.put_sharded(x, mesh))
  logical_step = accumulation.make_logical_step(
      grad_step, apply_step, physical_batch_size=physical_batch_size,
      place_batch=place)
  prepare = jax.jit(features.prepare)

  def step(state, images, labels, indices, mask, public=None):
    if plan.private and state.clip_state is None:
      # A state made by create_train_state alone: the clipping starts fresh.
      state = state.replace(clip_state=plan.init_clip_state(state.params))
    state, context = prepare(state, public)
    state, sums = logical_step(state, (images, labels), indices, mask,
                               context)
    metrics = {k: sums[k] for k in ('loss_sum', 'count', 'num_nonfinite',
                                    'num_clipped')}
    metrics['loss'] = sums['loss_sum'] / jnp.maximum(sums['count'], 1)
    return state, metrics

  return step


def features_of(*, augmult: augmult_lib.AugMult | None = None,
                pruner: pruning.Pruner | None = None,
                public_split: Any = None,
                normalizer: normalization.Normalizer | None = None,
                stats_key: jax.Array | None = None
                ) -> features_lib.Features:
  """The :class:`~dpjax.training.features.Features` of given feature objects."""
  items = []
  norm = normalizer if normalizer is not None and normalizer.policies else None
  if norm is not None:
    if norm.has_aux and stats_key is None:
      raise ValueError(
          "policy 'privatized' needs stats_key (its noise key).")
    items.append(features_lib.NormalizationFeature(norm, stats_key))
  if augmult is not None:
    items.append(features_lib.AugMultFeature(augmult))
  if pruner is not None:
    items.append(features_lib.PruningFeature(pruner,
                                             public_split=public_split))
  return features_lib.Features(tuple(items))


def selection_of(plan, features: features_lib.Features, *,
                 route: str = 'auto', devices: int = 1,
                 accumulation_on: bool = False) -> features_lib.Selection:
  """The run's :class:`Selection`, for the refusal table."""
  norm = features.get('normalization')
  prune = features.get('pruning')
  return features_lib.Selection(
      mode=plan.mode if plan.private else 'none', route=route,
      devices=devices, accumulation=accumulation_on,
      normalization='none' if norm is None else (
          norm.normalizer.bn_policy or 'none'),
      pruning='none' if prune is None else prune.mode,
      modelmix=features.get('modelmix') is not None,
      augmult=features.get('augmult') is not None)


def make_train_step(model: nn.Module, plan, microbatch_size: int | None = None,
                    *, mesh: jax.sharding.Mesh | None = None,
                    physical_batch_size: int | None = None,
                    augmult: augmult_lib.AugMult | None = None,
                    pruner: pruning.Pruner | None = None,
                    public_split: Any = None,
                    normalizer: normalization.Normalizer | None = None,
                    stats_key: jax.Array | None = None,
                    grad_route: str = 'auto',
                    features: features_lib.Features | None = None):
  """The step of ``model`` under ``plan``, from feature objects.

  ``step(state, images, labels, indices, mask, public=None) -> (state,
  metrics)``: see :func:`build_step`. ``plan`` is a :class:`dpjax.DPPlan`
  (or :class:`dpjax.plan.NonPrivatePlan`, the baseline, also meant by None),
  and ``state.tx`` starts with its ``plan.noise()``; the features
  (augmentation multiplicity, a pruner with ``state.tx`` built by
  :func:`dpjax.pruning.masked_chain`, a normalizer with its ``stats_key``)
  may be given one by one or as ``features``. The combination is checked
  against :data:`dpjax.training.features.REFUSALS` and the engine chosen by
  :func:`dpjax.engines.select` (``grad_route``, ``microbatch_size``, the
  ``mesh``). With a mesh, put the state and the data on it first
  (:func:`dpjax.distributed.put_replicated`).
  """
  if plan is None:
    plan = plan_lib.NonPrivatePlan()
  if features is None:
    features = features_of(augmult=augmult, pruner=pruner,
                           public_split=public_split,
                           normalizer=normalizer, stats_key=stats_key)
  features_lib.check(selection_of(
      plan, features, route=grad_route,
      devices=1 if mesh is None else mesh.size,
      accumulation_on=physical_batch_size is not None))
  engine = engines.select(plan, features.loss_spec(model), route=grad_route,
                          microbatch_size=microbatch_size, mesh=mesh)
  return build_step(plan, features, engine,
                    physical_batch_size=physical_batch_size, mesh=mesh)


def tune_microbatch(model: nn.Module, plan, state, train: data_lib.ArrayDataset,
                    batch_size: int, *, budget_mb: float,
                    grad_route: str = 'auto',
                    features: features_lib.Features | None = None) -> int:
  """The largest microbatch whose clipped gradient fits ``budget_mb``.

  The budget (config.perf.memory_budget_mb) covers one device call on a
  physical batch of ``batch_size`` rows: parameters, clip state, the batch
  and XLA's temporaries (:func:`dpjax.autotune.peak_bytes`), not the
  training set kept on the device.
  """
  features = features or features_lib.Features()
  loss = features.loss_spec(model)
  spec = jax.ShapeDtypeStruct
  examples = {data_lib.input_field(train.images): spec(
      (batch_size,) + train.images.shape[1:], train.images.dtype),
              'label': spec((batch_size,) + train.labels.shape[1:],
                            train.labels.dtype)}
  if features.needs_index:
    examples['index'] = spec((batch_size,), jnp.int32)
  _, context = jax.eval_shape(features.prepare, state, None)

  def make(m):
    engine = engines.select(plan, loss, route=grad_route, microbatch_size=m)
    return jax.jit(lambda params, batch, clip_state, inputs: engine(
        params, batch, clip_state, inputs))

  batch = sampling.Batch(examples, spec((batch_size,), jnp.bool_))
  return autotune.microbatch_size(
      make, (state.params, batch, state.clip_state, context.inputs),
      batch_size, int(budget_mb * 2**20))


def make_eval_fn(model: nn.Module, batch_size: int = 1000,
                 normalizer: normalization.Normalizer | None = None):
  """``evaluate(params, dataset, model_state=None) -> {'accuracy', 'loss'}``.

  Evaluates in fixed chunks, deterministically (no dropout); with a
  normalizer, BatchNorm uses the statistics its policy keeps in
  ``model_state`` (or each chunk's own, masked). Labels per token count
  per token: accuracy and loss are means over tokens.
  """
  norm = normalizer if normalizer is not None and normalizer.policies else None

  @jax.jit
  def eval_chunk(params, images, labels, mask, model_state):
    if norm is None:
      logits = model.apply({'params': params, **model_state}, images)
    else:
      logits = norm.eval_apply({'params': params, **model_state}, images, mask)

    def per_example(x):  # the mean over an example's tokens
      return x.reshape(x.shape[0], -1).mean(-1)

    loss = per_example(losses.cross_entropy(logits, labels))
    correct = per_example(jnp.argmax(logits, -1) == labels)
    return (jnp.sum(jnp.where(mask, correct, 0)),
            jnp.sum(jnp.where(mask, loss, 0)))

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
        labels = np.concatenate([labels, np.zeros(
            (size - real,) + labels.shape[1:], labels.dtype)])
      c, l = eval_chunk(params, images, labels, np.arange(size) < real,
                        model_state or {})
      correct += float(c)
      loss += float(l)
    return {'accuracy': correct / n, 'loss': loss / n}

  return evaluate
