"""``train_and_evaluate(config, workdir)``: the loop around the step.

Each logical step: the host-side features (ALC thresholds), the Poisson
batch from the plan's sampler, the step (:mod:`dpjax.training.step`), the
step's DP event in the ledger, so the epsilon shown and written is always
the one of what actually ran; then evaluation and checkpoints on schedule.
A run resumes from the newest good checkpoint in ``workdir/checkpoints`` (if
its run had the same privacy settings; else a clear error).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from dpjax import averaging
from dpjax import checkpoint
from dpjax import data as data_lib
from dpjax import distributed
from dpjax import keys as keys_lib
from dpjax import plots
from dpjax.training import run as run_lib
from dpjax.training import step as step_lib
from dpjax.training import summary as summary_lib


@dataclasses.dataclass
class RunLog:
  """What a run accumulates besides its state (checkpointed with it)."""

  step: int = 0
  ledger: Any = None
  history: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {
      'step': [], 'test_accuracy': [], 'test_loss': [], 'epsilon': []})
  num_nonfinite: Any = 0
  padded_sizes: set[int] = dataclasses.field(default_factory=set)
  resumed_from: list[int] = dataclasses.field(default_factory=list)
  train_time_s: float = 0.0

  @classmethod
  def from_meta(cls, meta: dict[str, Any]) -> 'RunLog':
    return cls(meta['step'], checkpoint.ledger_from_json(meta['ledger']),
               meta['history'],
               jnp.asarray(meta['num_nonfinite'], jnp.int32),
               set(meta['compiled_batch_sizes']),
               meta['resumed_from'] + [meta['step']], meta['train_time_s'])

  def meta(self, run, train_time_s: float) -> dict[str, Any]:
    return {'step': self.step, 'secret_seed': str(run.keys.secret_seed),
            'ledger': checkpoint.ledger_to_json(self.ledger),
            'history': self.history, 'num_nonfinite': int(self.num_nonfinite),
            'compiled_batch_sizes': sorted(self.padded_sizes),
            'resumed_from': self.resumed_from, 'train_time_s': train_time_s}


def _place(run: run_lib.Run):
  """The state and the training set on the device(s)."""
  images = jnp.asarray(run.splits.train.images)
  labels = jnp.asarray(run.splits.train.labels)
  if run.mesh is None:
    return run.state, images, labels
  return distributed.put_replicated((run.state, images, labels), run.mesh)


def _evaluate(run, evaluate, state, log: RunLog, eps: float,
              test: data_lib.ArrayDataset) -> None:
  """Metrics on ``test`` of the parameters (and their averages) into the
  history."""
  history = log.history
  result = evaluate(state.params, test, state.model_state)
  history['step'].append(log.step)
  history['test_accuracy'].append(result['accuracy'])
  history['test_loss'].append(result['loss'])
  history['epsilon'].append(eps if run.plan.private else float('inf'))
  mixing = run.features.get('modelmix')
  if mixing is not None:
    history.setdefault('epsilon_modelmix', []).append(
        mixing.report.plot_value())
  for name, params in averaging.averaged_params(state.opt_state).items():
    history.setdefault(f'test_accuracy_{name}', []).append(
        evaluate(params, test, state.model_state)['accuracy'])


def _schedule(config: ml_collections.ConfigDict, num_steps: int):
  eval_every = config.eval_every_steps or max(1, num_steps // 10)
  ckpt_every = config.perf.checkpoint_every_steps
  return eval_every, eval_every if ckpt_every is None else ckpt_every


def _loop(run: run_lib.Run, state, images, labels, log: RunLog,
          start: float):
  """Steps from ``log.step`` to the plan's end; returns (state, epsilon)."""
  config, plan = run.config, run.plan
  accountant, delta = config.privacy.accountant, config.privacy.delta
  eval_every, ckpt_every = _schedule(config, plan.num_steps)
  evaluate = step_lib.make_eval_fn(run.model, normalizer=run.normalizer)
  # Evaluations during training may use a subset; the last uses every example.
  eval_set = data_lib.eval_subset(run.splits.test, config.get('eval_size'),
                                  run.keys.rng(keys_lib.EVAL))
  mixing = run.features.get('modelmix')
  eps = 0.0
  bar = tqdm.trange(log.step, plan.num_steps,
                    desc='DP-SGD' if plan.private else 'SGD',
                    initial=log.step, total=plan.num_steps,
                    disable=not config.progress_bar, dynamic_ncols=True)
  for t in bar:
    state = run.features.before_host_step(state, t)
    batch = plan.sampler.sample(t)
    log.padded_sizes.add(len(batch.indices))
    state, metrics = run.step(state, images, labels, batch.indices,
                              batch.mask, run.normalizer.public_batch(t))
    plan.record_step(log.ledger, t)
    log.num_nonfinite += metrics['num_nonfinite']
    log.step = t + 1
    last = log.step == plan.num_steps
    log_now = log.step % config.log_every_steps == 0 or last
    eval_now = log.step % eval_every == 0 or last
    if plan.private and (log_now or eval_now):
      eps = log.ledger.epsilon(delta, accountant)
      if mixing is not None:
        mixing.report.update(log.ledger)
    if log_now:
      # The batch loss is a diagnostic of private data, not a DP release:
      # the bar says so (README, 'Threat model').
      bar.set_postfix({summary_lib.LOSS_LABEL: f"{float(metrics['loss']):.3f}",
                       'eps': f'{eps:.3f}',
                       **(mixing.report.postfix() if mixing else {})})
    if eval_now:
      _evaluate(run, evaluate, state, log, eps,
                run.splits.test if last else eval_set)
    if ckpt_every and (log.step % ckpt_every == 0 or last):
      run.checkpointer.save(log.step, state, log.meta(
          run, log.train_time_s + time.time() - start))
  bar.close()
  return state, eps


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains as ``config`` says; writes summary.json, history.json and a plot.

  Checkpoints every ``config.perf.checkpoint_every_steps`` steps and resumes
  from the newest good checkpoint in ``workdir``.

  Args:
    config: an ml_collections config (see ``configs/default.py``).
    workdir: output directory (created if missing).

  Returns:
    The summary written to ``workdir/summary.json``.
  """
  start = time.time()
  run = run_lib.from_config(config, workdir)
  state, images, labels = _place(run)
  restored = run.checkpointer.restore(state)
  log = RunLog(ledger=checkpoint.ledger_from_json([]))
  if run.plan.private:
    run.plan.record_start(log.ledger)
  if restored is not None:
    state, meta = restored
    log = RunLog.from_meta(meta)
  state, _ = _loop(run, state, images, labels, log, start)
  run.checkpointer.close()
  epsilon = log.ledger.epsilon(config.privacy.delta, config.privacy.accountant)
  mixing = run.features.get('modelmix')
  if mixing is not None:
    mixing.report.update(log.ledger)
  summary = summary_lib.build(run, state, log, epsilon,
                              log.train_time_s + time.time() - start)
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(workdir, 'summary.json'),
                                 summary)
    checkpoint.write_json_atomic(os.path.join(workdir, 'history.json'),
                                 log.history)
    plots.plot_training(log.history, os.path.join(workdir, 'training.png'),
                        title=f'{run.splits.name} / {config.model.name}')
  return summary
