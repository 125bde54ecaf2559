"""summary.json: what a run released, and apart from it what it did not.

The top level holds (epsilon, delta)-DP outputs and data-independent facts:
the guarantee and its accounting, the settings, the test metrics of the
released model. What the run computed from private data without noise
(non-finite gradient counts, compiled batch sizes, wall time) sits under
:data:`DIAGNOSTICS`, labelled as not differentially private; the noise key
itself is never written (only how it was chosen).
"""

from __future__ import annotations

from typing import Any

from dpjax import keys as keys_lib
from dpjax import pruning
from dpjax import workdir as workdir_lib

# summary.json's section of unnoised data-dependent values.
DIAGNOSTICS = workdir_lib.DIAGNOSTICS
# The progress bar's name for the batch loss, for the same reason.
LOSS_LABEL = 'loss (not DP)'


def noise_key_statement(keys: keys_lib.KeySchedule) -> str:
  """summary.json's words on the noise key (never the key itself)."""
  if keys.secret_given:
    return ('reproducible from config.privacy.noise_seed: the guarantee'
            ' assumes that seed stays secret (whoever knows it can remove'
            ' the noise from the released model)')
  return ('secret: drawn from the OS entropy and kept only in the'
          ' checkpoints (keep them as secret as the training data)')


def build(run, state, log, epsilon: float,
          train_time_s: float) -> dict[str, Any]:
  """The run's summary.json, from its final state and its log."""
  config, plan, splits = run.config, run.plan, run.splits
  summary: dict[str, Any] = plan.summary(state.clip_state)
  if plan.private:
    summary['epsilon'] = epsilon
  summary.update(run.features.summary(state))
  history = log.history
  prune = run.features.get('pruning')
  summary.update({
      'private': plan.private,
      'noise_key': noise_key_statement(run.keys) if plan.private else None,
      'dataset': splits.name,
      'data_source': splits.source,  # files read (SHA-256) and the cache
      'public_examples': 0 if splits.public is None else len(splits.public),
      'model': config.model.name,
      'test_accuracy': history['test_accuracy'][-1],
      'test_loss': history['test_loss'][-1],
      DIAGNOSTICS: {
          'train_time_s': train_time_s,
          'num_nonfinite_gradients': int(log.num_nonfinite),
          'compiled_batch_sizes': sorted(log.padded_sizes),
      },
      'num_devices': run.num_devices,
      'physical_batch_size': config.perf.physical_batch_size,
      'augmult_views': config.augmult.num_views,
      'pruning': None if prune is None else pruning.summary(
          prune.pruner_config, state.params),
      'resumed_from_steps': log.resumed_from,
      'microbatch_size': run.microbatch,
      'config': config.to_dict(),
  })
  for name in ('ema', 'polyak'):
    if f'test_accuracy_{name}' in history:
      summary[f'test_accuracy_{name}'] = history[f'test_accuracy_{name}'][-1]
  return summary
