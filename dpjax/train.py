"""The DP-SGD training program: ``train_and_evaluate(config, workdir)``.

Shaped like the flax examples: small pure pieces (``create_train_state``,
``make_train_step``, ``evaluate``) and one driver. Each step draws a Poisson
batch from the plan's sampler, computes the clipped sum of per-example
gradients (microbatched), adds noise once through the optax chain
``noise -> optimizer`` and records the step's DP event in the ledger, so the
epsilon shown and written is always the one of what actually ran.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from flax.training import train_state as train_state_lib
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from dpjax import accounting
from dpjax import autotune
from dpjax import data as data_lib
from dpjax import ghost
from dpjax import models
from dpjax import per_example
from dpjax import plan as plan_lib
from dpjax import plots
from dpjax import sampling


class TrainState(train_state_lib.TrainState):
  """Flax TrainState; ``tx`` is ``optax.chain(noise, optimizer)`` under DP."""


def example_loss(model: nn.Module) -> Callable[..., Any]:
  """Cross-entropy of ONE example ``{'image': [H, W, C], 'label': []}``."""

  def loss_fn(params, example):
    logits = model.apply({'params': params}, example['image'][None])[0]
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


def create_train_state(model: nn.Module, key: jax.Array, image_shape,
                       tx: optax.GradientTransformation) -> TrainState:
  variables = model.init(key, jnp.zeros((1,) + tuple(image_shape)))
  extra = set(variables) - {'params'}
  if extra:
    raise ValueError(
        f'The model declares mutable collections {sorted(extra)} (e.g.'
        ' BatchNorm statistics). They depend on the data of every example in'
        ' a batch, so per-example clipping no longer bounds one example\'s'
        ' influence. Use GroupNorm/LayerNorm instead.')
  state = TrainState.create(apply_fn=model.apply,
                            params=variables['params'], tx=tx)
  # An int32 array, not the Python int 0: the first step's output then has
  # the input's type and the step compiles once per padded batch size.
  return state.replace(step=jnp.zeros((), jnp.int32))


def make_train_step(model: nn.Module, plan: plan_lib.DPPlan | None,
                    microbatch_size: int | None = None,
                    grad_route: str = 'auto'):
  """A jitted ``step(state, images, labels, indices, mask)``.

  With a plan: DP-SGD (clipped sum of per-example gradients by
  ``grad_route``, see :func:`dpjax.ghost.clipped_grad_for_route`; the noise
  is in ``state.tx``). Without one: the non-private step on the mean loss of
  the real rows, the baseline of the same model and batch.
  """
  loss_fn = example_loss(model)

  if plan is None:
    def mean_loss(params, batch, mask):
      losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, batch)
      return jnp.sum(jnp.where(mask, losses, 0)) / jnp.maximum(mask.sum(), 1)

    def step(state, images, labels, indices, mask):
      batch = {'image': images[indices], 'label': labels[indices]}
      loss, grads = jax.value_and_grad(mean_loss)(state.params, batch, mask)
      return state.apply_gradients(grads=grads), {'loss': loss}
  else:
    grad_fn = ghost.clipped_grad_for_route(
        grad_route, loss_fn, plan.clipping, microbatch_size=microbatch_size)

    def step(state, images, labels, indices, mask):
      batch = {'image': images[indices], 'label': labels[indices]}
      out = grad_fn(state.params, batch, mask)
      state = state.apply_gradients(grads=out.grad_sum)
      metrics = {
          'loss': out.stats.losses.sum() / jnp.maximum(mask.sum(), 1),
          'num_nonfinite': out.stats.num_nonfinite,
          'num_clipped': out.stats.num_clipped,
      }
      return state, metrics

  return jax.jit(step, donate_argnums=(0,))


def make_eval_fn(model: nn.Module, batch_size: int = 1000):
  """``evaluate(params, dataset) -> {'accuracy', 'loss'}`` in fixed chunks."""

  @jax.jit
  def eval_chunk(params, images, labels, mask):
    logits = model.apply({'params': params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(correct & mask), jnp.sum(jnp.where(mask, losses, 0))

  def evaluate(params, dataset: data_lib.ArrayDataset) -> dict[str, float]:
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
      c, l = eval_chunk(params, images, labels, np.arange(size) < real)
      correct += float(c)
      loss += float(l)
    return {'accuracy': correct / n, 'loss': loss / n}

  return evaluate


def tune_microbatch(model: nn.Module, plan: plan_lib.DPPlan, state: TrainState,
                    train: data_lib.ArrayDataset, grad_route: str,
                    budget_mb: float, microbatch_size: int | None) -> int:
  """The largest microbatch whose step fits ``budget_mb`` (config.perf)."""
  if microbatch_size is not None:
    raise ValueError(
        'Set config.perf.microbatch_size or config.perf.memory_budget_mb, not'
        f' both (got {microbatch_size} and {budget_mb}).')
  size = plan.sampler.max_batch_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  args = (state, spec(train.images.shape, train.images.dtype),
          spec(train.labels.shape, train.labels.dtype),
          spec((size,), jnp.int32), spec((size,), jnp.bool_))
  return autotune.microbatch_size(
      lambda m: make_train_step(model, plan, m, grad_route), args, size,
      int(budget_mb * 2**20))


def privacy_config(config: ml_collections.ConfigDict) -> plan_lib.PrivacyConfig:
  """The privacy settings of ``config.privacy`` as a :class:`PrivacyConfig`.

  On the command line a set ``steps`` replaces ``epochs`` and a set
  ``noise_multiplier`` replaces ``target_epsilon``, so one override suffices.
  """
  p = config.privacy
  steps_given = p.steps is not None
  sigma_given = p.noise_multiplier is not None
  return plan_lib.PrivacyConfig(
      clip_norm=p.clip_norm, noise_multiplier=p.noise_multiplier,
      target_epsilon=None if sigma_given else p.target_epsilon,
      delta=p.delta, expected_batch_size=p.expected_batch_size,
      epochs=None if steps_given else p.epochs, steps=p.steps,
      accountant=p.accountant)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains with DP-SGD as ``config`` says; writes summary.json and a plot.

  Args:
    config: an ml_collections config (see ``configs/default.py``).
    workdir: output directory (created if missing).

  Returns:
    The summary written to ``workdir/summary.json``.
  """
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  splits = data_lib.load(config.data.name, manual_dir=config.data.manual_dir,
                         tfds_data_dir=config.data.tfds_data_dir,
                         public_fraction=config.data.public_fraction)
  data_lib.check_dataset(splits.train, splits.num_classes, 'train split')
  data_lib.check_dataset(splits.test, splits.num_classes, 'test split')
  n = len(splits.train)

  private = config.privacy.enabled
  if private:
    plan = plan_lib.make_plan(
        privacy_config(config), n,
        pad_to_multiple_of=config.perf.pad_to_multiple_of,
        sampler_seed=config.seed)
    sampler, num_steps = plan.sampler, plan.num_steps
  else:
    plan = None
    sampler = sampling.PoissonSampler(
        n, config.privacy.expected_batch_size,
        pad_to_multiple_of=config.perf.pad_to_multiple_of, seed=config.seed)
    num_steps = privacy_config(config).steps or accounting.steps_for_epochs(
        config.privacy.epochs, sampler.sampling_rate)

  model = models.get_model(config.model.name, splits.num_classes,
                           config.model.activation)
  init_key, noise_key = jax.random.split(jax.random.key(config.seed))
  optimizer = make_optimizer(config.optimizer, num_steps)
  tx = optax.chain(plan.noise(noise_key), optimizer) if private else optimizer
  state = create_train_state(model, init_key, splits.train.images.shape[1:],
                             tx)
  microbatch = config.perf.microbatch_size
  grad_route = config.perf.get('grad_route', 'auto')
  budget_mb = config.perf.get('memory_budget_mb')
  if private and budget_mb:
    microbatch = tune_microbatch(model, plan, state, splits.train, grad_route,
                                 budget_mb, microbatch)
  train_step = make_train_step(model, plan, microbatch, grad_route)
  evaluate = make_eval_fn(model)

  images = jnp.asarray(splits.train.images)
  labels = jnp.asarray(splits.train.labels)
  ledger = accounting.PrivacyLedger()
  delta = config.privacy.delta
  eval_every = config.eval_every_steps or max(1, num_steps // 10)
  history: dict[str, list[float]] = {'step': [], 'test_accuracy': [],
                                     'epsilon': []}
  padded_sizes = set()
  num_nonfinite = jnp.zeros((), jnp.int32)
  eps, final = 0.0, None
  bar = tqdm.trange(num_steps, desc='DP-SGD' if private else 'SGD',
                    disable=not config.progress_bar, dynamic_ncols=True)
  for step in bar:
    batch = sampler.sample(step)
    padded_sizes.add(len(batch.indices))
    state, metrics = train_step(state, images, labels, batch.indices,
                                batch.mask)
    if private:
      ledger.record(plan.step_event())
      num_nonfinite += metrics['num_nonfinite']
    last = step + 1 == num_steps
    log_now = (step + 1) % config.log_every_steps == 0 or last
    eval_now = (step + 1) % eval_every == 0 or last
    if private and (log_now or eval_now):
      eps = ledger.epsilon(delta, config.privacy.accountant)
    if log_now:
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", eps=f'{eps:.3f}')
    if eval_now:
      final = evaluate(state.params, splits.test)
      history['step'].append(step + 1)
      history['test_accuracy'].append(final['accuracy'])
      history['epsilon'].append(eps if private else float('inf'))
  bar.close()

  summary: dict[str, Any] = plan.summary() if private else {
      'epsilon': float('inf'), 'delta': None, 'noise_multiplier': 0.0,
      'accountant': None, 'steps': num_steps,
      'sampling_rate': sampler.sampling_rate, 'clip_norm': None}
  if private:
    summary['epsilon'] = eps
  summary.update({
      'private': private,
      'dataset': splits.name,
      'public_examples': 0 if splits.public is None else len(splits.public),
      'model': config.model.name,
      'test_accuracy': final['accuracy'],
      'test_loss': final['loss'],
      'train_time_s': time.time() - start,
      'num_nonfinite_gradients': int(num_nonfinite),
      'compiled_batch_sizes': sorted(padded_sizes),
      'microbatch_size': microbatch,
      'config': config.to_dict(),
  })
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2, default=str)
  with open(os.path.join(workdir, 'history.json'), 'w') as f:
    json.dump(history, f, indent=2)
  plots.plot_training(history, os.path.join(workdir, 'training.png'),
                      title=f'{splits.name} / {config.model.name}')
  return summary
