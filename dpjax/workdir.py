"""A run's working directory: finished, interrupted, or to be started over.

``dpjax-train`` writes ``summary.json`` only when a run ends, and a
checkpoint every few steps (:mod:`dpjax.checkpoint`). So a workdir with a
summary holds a finished run: rerunning the same command reports it instead
of training again and rewriting the summary; the same workdir with other
settings is refused, naming the fields that differ. An interrupted run has
checkpoints and no summary; rerunning the same command resumes it.
:func:`clear` removes what a run wrote, and nothing else, for a fresh start.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import ml_collections

from dpjax import checkpoint

SUMMARY = 'summary.json'
# What train_and_evaluate writes into a workdir; clear() removes only these.
RUN_FILES: tuple[str, ...] = (SUMMARY, 'history.json', 'training.png')
RUN_DIRS: tuple[str, ...] = ('checkpoints', 'corrupt_checkpoints')


# summary.json's section of what a run computed from private data without
# noise: useful to the data owner, not covered by the guarantee.
DIAGNOSTICS = 'diagnostics (not differentially private)'


class WorkdirError(ValueError):
  """The workdir holds a run that the requested one cannot continue."""


def read_summary(workdir: str) -> dict[str, Any] | None:
  """The finished run's summary.json in ``workdir``, or None if there is none."""
  path = os.path.join(workdir, SUMMARY)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _settings(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """The fields that make a run what it is (not perf, logging, data paths)."""
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  fields = checkpoint.privacy_fields(config, 0)
  fields.pop('dataset_size')
  return fields


def settings_differences(recorded: dict[str, Any],
                         config: ml_collections.ConfigDict) -> list[str]:
  """``'field: recorded -> now'`` for each run-defining field that differs."""
  old, new = _settings(recorded), _settings(config)
  return [f'{k}: {old.get(k, "<absent>")!r} there, {new.get(k, "<absent>")!r}'
          ' now' for k in sorted(set(old) | set(new))
          if old.get(k, '<absent>') != new.get(k, '<absent>')]


def describe(summary: dict[str, Any]) -> str:
  """One line: accuracy, epsilon, steps and time of a run's summary."""
  seconds = summary.get(DIAGNOSTICS, summary).get('train_time_s', 0)
  eps = summary.get('epsilon')
  privacy = ('not private' if not summary.get('private', True) else
             f"epsilon {eps:.3f} (delta={summary.get('delta')})")
  return (f"test accuracy {summary['test_accuracy']:.4f}, {privacy},"
          f" {summary.get('steps')} steps, {seconds:.0f} s")


def check_finished(workdir: str,
                   config: ml_collections.ConfigDict) -> str | None:
  """A message if ``workdir`` holds this config's finished run, else None.

  Raises:
    WorkdirError: ``workdir`` holds a finished run of other settings.
  """
  summary = read_summary(workdir)
  if summary is None:
    return None
  diffs = settings_differences(summary.get('config', {}), config)
  if diffs:
    raise WorkdirError(
        f'{workdir} holds a finished run with other settings ('
        + '; '.join(diffs) + '). Choose another --workdir, or pass'
        ' --overwrite to replace that run.')
  return (f'{workdir} already holds this finished run: {describe(summary)}'
          f' ({os.path.join(workdir, SUMMARY)}). Nothing to do; --overwrite'
          ' trains it again from step 0.')


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the committed checkpoints in ``workdir/checkpoints``."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit()
                and os.path.isdir(os.path.join(directory, name)))


def interrupted_message(workdir: str, checkpoints_enabled: bool = True) -> str:
  """What a user needs after Ctrl-C: where the run stands, how to resume."""
  steps = checkpoint_steps(workdir)
  if steps:
    return (f'Interrupted. The last checkpoint is step {steps[-1]} in'
            f" {os.path.join(workdir, 'checkpoints')}; rerun the same command"
            f' to resume from it (same epsilon as an uninterrupted run).')
  if not checkpoints_enabled:
    return ('Interrupted. No checkpoint was written'
            ' (perf.checkpoint_every_steps=0); rerunning starts from step 0.')
  return ('Interrupted before the first checkpoint; rerunning the same command'
          ' starts from step 0.')


def clear(workdir: str) -> list[str]:
  """Removes a previous run's files from ``workdir``; returns what it removed.

  Only what :func:`dpjax.train.train_and_evaluate` writes (summary, history,
  plot, checkpoints) is removed; other files in the workdir are left alone.
  """
  removed = []
  for name in RUN_FILES + RUN_DIRS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    else:
      continue
    removed.append(path)
  return removed
