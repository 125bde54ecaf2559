"""Tests for dpjax/workdir.py: finished, interrupted and cleared workdirs."""

import json
import os

import pytest

from configs import default
from dpjax import workdir as workdir_lib


def _finish(path, config, **summary):
  os.makedirs(path, exist_ok=True)
  summary = dict({'test_accuracy': 0.9443, 'epsilon': 2.9996, 'delta': 1e-5,
                  'steps': 112, workdir_lib.DIAGNOSTICS: {'train_time_s': 7.2},
                  'private': True,
                  'config': json.loads(json.dumps(config.to_dict(),
                                                  default=str))}, **summary)
  with open(os.path.join(path, 'summary.json'), 'w') as f:
    json.dump(summary, f)


def test_no_summary_is_not_finished(tmp_path):
  assert workdir_lib.check_finished(str(tmp_path), default.get_config()) is None


def test_finished_run_of_the_same_config(tmp_path):
  config = default.get_config()
  _finish(tmp_path, config)
  config.progress_bar = False  # logging and perf flags do not make a run
  config.perf.microbatch_size = 32
  message = workdir_lib.check_finished(str(tmp_path), config)
  assert 'already holds this finished run' in message
  assert 'test accuracy 0.9443, epsilon 3.000 (delta=1e-05), 112 steps' in (
      message)
  assert '--overwrite' in message


def test_finished_run_of_other_settings_is_refused(tmp_path):
  config = default.get_config()
  _finish(tmp_path, config)
  config.privacy.target_epsilon = 1.0
  config.model.name = 'tanh_cnn'
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.check_finished(str(tmp_path), config)
  message = str(e.value)
  assert "privacy.target_epsilon: 3.0 there, 1.0 now" in message
  assert "model.name: 'small_cnn' there, 'tanh_cnn' now" in message
  assert '--overwrite' in message


def test_describe_non_private():
  line = workdir_lib.describe({'test_accuracy': 0.5, 'private': False,
                               'epsilon': float('inf'), 'steps': 3})
  assert line.startswith('test accuracy 0.5000, not private, 3 steps')


def test_interrupted_message(tmp_path):
  workdir = str(tmp_path)
  assert 'before the first checkpoint' in workdir_lib.interrupted_message(
      workdir)
  assert 'checkpoint_every_steps=0' in workdir_lib.interrupted_message(
      workdir, checkpoints_enabled=False)
  for name in ('4', '8', '12.orbax-checkpoint-tmp-1'):
    os.makedirs(os.path.join(workdir, 'checkpoints', name))
  assert workdir_lib.checkpoint_steps(workdir) == [4, 8]
  message = workdir_lib.interrupted_message(workdir)
  assert 'step 8 in ' + os.path.join(workdir, 'checkpoints') in message
  assert 'rerun the same command' in message


def test_clear_removes_only_what_a_run_wrote(tmp_path):
  workdir = str(tmp_path)
  _finish(workdir, default.get_config())
  os.makedirs(os.path.join(workdir, 'checkpoints', '4'))
  for name in ('history.json', 'training.png', 'notes.txt'):
    (tmp_path / name).write_text('x')
  removed = workdir_lib.clear(workdir)
  assert sorted(os.path.basename(p) for p in removed) == [
      'checkpoints', 'history.json', 'summary.json', 'training.png']
  assert sorted(os.listdir(workdir)) == ['notes.txt']
  assert workdir_lib.clear(workdir) == []
