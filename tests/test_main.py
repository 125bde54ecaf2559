"""Tests for dpjax/main.py: the dpjax-train command's help, errors, reruns."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--config.progress_bar=False', '--config.privacy.steps=2',
        '--config.perf.pad_to_multiple_of=512']


def _train(*args, cwd=REPO, timeout=300):
  return subprocess.run([sys.executable, '-m', 'dpjax.main', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def _one_line_error(proc, *fragments):
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('dpjax-train: error: ')]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


def test_help_lists_common_fields_and_how_to_override():
  proc = _train('--help', '--config', 'configs/mnist.py')
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert 'Try --helpfull' not in out
  for fragment in ('--config FILE', '--workdir DIR', '--overwrite',
                   '--verbose', 'values in configs/mnist.py',
                   '--config.privacy.target_epsilon=3.0',
                   '--config.privacy.noise_multiplier=None',
                   '--config.privacy.clip_norm=0.1',
                   '--config.privacy.expected_batch_size=512',
                   '--config.privacy.delta=1e-05', '--config.data.name=mnist',
                   '--config.SECTION.FIELD=VALUE', '--config.SECTION.FIELD=None',
                   '--helpfields'):
    assert fragment in out, fragment


def test_helpfields_lists_every_field():
  proc = _train('--helpfields')
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert '--config.privacy.clipping.mode=flat' in lines
  assert '--config.augmult.num_views=0' in lines
  assert len(lines) > 60


@pytest.mark.parametrize('args,fragments', [
    (['--config.optimizer.name=rmsprop'], ["optimizer.name must be",
                                           "'rmsprop'"]),
    (['--config', 'configs/nope.py'], ["'configs/nope.py' not found"]),
    (['--config.privacy.noise_multiplier=1.1'],
     ['noise_multiplier=1.1 and privacy.target_epsilon=3.0 are both set',
      '--config.privacy.target_epsilon=None']),
])
def test_config_errors_are_one_line(tmp_path, args, fragments):
  workdir = tmp_path / 'run'
  proc = _train('--workdir', str(workdir), *FAST, *args)
  _one_line_error(proc, *fragments)
  assert not (workdir / 'summary.json').exists()


def test_verbose_shows_the_traceback(tmp_path):
  proc = _train('--workdir', str(tmp_path / 'run'), *FAST,
                '--config.optimizer.name=rmsprop', '--verbose')
  assert proc.returncode != 0
  assert 'Traceback' in proc.stderr and 'rmsprop' in proc.stderr


def test_noise_multiplier_with_unset_target_then_rerun(tmp_path):
  """Fixed sigma via =None; a rerun of a finished run changes nothing."""
  workdir = tmp_path / 'run'
  args = ['--workdir', str(workdir), *FAST,
          '--config.privacy.noise_multiplier=1.1',
          '--config.privacy.target_epsilon', 'None']
  proc = _train(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary_path = workdir / 'summary.json'
  summary = json.loads(summary_path.read_text())
  assert summary['noise_multiplier'] == 1.1
  assert summary['config']['privacy']['target_epsilon'] is None
  assert 'test accuracy' in proc.stdout and 'epsilon' in proc.stdout
  written = summary_path.read_bytes()
  mtime = summary_path.stat().st_mtime_ns

  again = _train(*args)
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'already holds this finished run' in again.stdout
  assert f"epsilon {summary['epsilon']:.3f}" in again.stdout
  assert summary_path.read_bytes() == written
  assert summary_path.stat().st_mtime_ns == mtime

  other = _train(*args, '--config.privacy.clip_norm=2.0')
  _one_line_error(other, 'finished run with other settings',
                  'privacy.clip_norm: 1.0 there, 2.0 now', '--overwrite')
  assert summary_path.read_bytes() == written

  fresh = _train(*args, '--config.privacy.clip_norm=2.0', '--overwrite')
  assert fresh.returncode == 0, fresh.stderr[-2000:]
  summary = json.loads(summary_path.read_text())
  assert summary['clip_norm'] == 2.0 and summary['resumed_from_steps'] == []


def test_ctrl_c_names_the_checkpoint_and_rerun_resumes(tmp_path):
  workdir = tmp_path / 'run'
  args = ['--workdir', str(workdir), '--config.progress_bar=False',
          '--config.privacy.steps=400', '--config.perf.checkpoint_every_steps=3',
          '--config.perf.pad_to_multiple_of=512']
  proc = subprocess.Popen([sys.executable, '-m', 'dpjax.main', *args],
                          cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  checkpoints = workdir / 'checkpoints'
  deadline = time.time() + 300
  while proc.poll() is None and not (
      checkpoints.is_dir() and any(p.name.isdigit()
                                   for p in checkpoints.iterdir())):
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err
  steps = sorted(int(p.name) for p in checkpoints.iterdir()
                 if p.name.isdigit())
  assert f'The last checkpoint is step {steps[-1]} in {checkpoints}' in err
  assert 'rerun the same command to resume' in err
  assert not (workdir / 'summary.json').exists()

  resumed = _train(*args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['resumed_from_steps'] == [steps[-1]]
  assert summary['steps'] == 400


def test_truncated_data_file_is_one_line_naming_it(tmp_path):
  from dpjax.data import idx  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  raw = tmp_path / 'mnist'
  raw.mkdir()
  for split in ('train', 't10k'):
    idx.write_idx(raw / f'{split}-images-idx3-ubyte.gz',
                  np.zeros((4, 28, 28), np.uint8))
    idx.write_idx(raw / f'{split}-labels-idx1-ubyte.gz', np.zeros(4, np.uint8))
  path = raw / 'train-images-idx3-ubyte.gz'
  path.write_bytes(path.read_bytes()[:40])
  proc = _train('--workdir', str(tmp_path / 'run'), *FAST,
                '--config.data.name=mnist', f'--config.data.manual_dir={raw}')
  _one_line_error(proc, f'{path} is truncated or corrupt')


def test_interrupt_is_deferred_out_of_orbax_saves():
  """Ctrl-C inside orbax's code is re-sent until it lands outside it."""
  from dpjax import main  # pylint: disable=g-import-not-at-top
  received = []
  previous = signal.signal(signal.SIGINT,
                           lambda *_: received.append(time.time()))
  try:
    namespace = {'handler': main._interrupt_outside_saves,  # pylint: disable=protected-access
                 'sys': sys}
    code = compile('handler(signal.SIGINT, sys._getframe())',
                   os.path.join(os.sep, 'x', 'orbax', 'checkpoint', 'save.py'),
                   'exec')
    exec(code, dict(namespace, signal=signal))  # pylint: disable=exec-used
    deadline = time.time() + 10
    while not received and time.time() < deadline:
      time.sleep(0.01)
    assert received, 'the deferred interrupt was not sent again'
  finally:
    signal.signal(signal.SIGINT, previous)
  with pytest.raises(KeyboardInterrupt):
    main._interrupt_outside_saves(signal.SIGINT, sys._getframe())  # pylint: disable=protected-access
