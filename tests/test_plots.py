"""Training plots and the privacy-utility curve (dpjax/plots.py)."""

import json
import os
import subprocess
import sys

import matplotlib.image
import pytest

from dpjax import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(path):
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert image.std() > 0.01  # not blank
  return image


@pytest.mark.parametrize('epsilon', [[0.5, 1.0], [float('inf')] * 2])
def test_plot_training_writes_a_png(tmp_path, epsilon):
  history = {'step': [10, 20], 'test_accuracy': [0.5, 0.7],
             'test_loss': [1.0, 0.8], 'epsilon': epsilon,
             'test_accuracy_ema': [0.55, 0.75]}
  path = str(tmp_path / 'training.png')
  plots.plot_training(history, path, title='t')
  _image(path)
  assert os.listdir(tmp_path) == ['training.png']  # no temporary left


def test_privacy_utility_points_group_series_and_seeds(tmp_path):
  runs = [{'series': 'a', 'epsilon': 2.0, 'test_accuracy': 0.9},
          {'series': 'a', 'epsilon': 1.0, 'test_accuracy': 0.7},
          {'series': 'a', 'epsilon': 1.0, 'test_accuracy': 0.8},
          {'series': 'b', 'epsilon': 1.0, 'test_accuracy': 0.6}]
  points = plots.privacy_utility_points(runs)
  assert points == {'a': [(1.0, 75.0, 70.0, 80.0), (2.0, 90.0, 90.0, 90.0)],
                    'b': [(1.0, 60.0, 60.0, 60.0)]}
  path = str(tmp_path / 'pu.png')
  plots.plot_privacy_utility(runs, path)
  _image(path)


def test_privacy_utility_script_trains_and_plots(tmp_path):
  """Two target epsilons, one short run each: calibrated, trained, plotted."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'privacy_utility.py'),
       '--workdir', str(tmp_path), '--epsilons', '1', '8',
       '--set', 'privacy.epochs=1'],
      capture_output=True, text=True, check=True, cwd=ROOT)
  with open(tmp_path / 'privacy_utility.json') as f:
    rows = json.load(f)
  assert [r['target_epsilon'] for r in rows] == [1.0, 8.0]
  for row in rows:  # each run's guarantee is the target, within calibration
    assert row['epsilon'] <= row['target_epsilon'] * 1.001
    assert row['epsilon'] >= row['target_epsilon'] * 0.9
  assert rows[0]['noise_multiplier'] > rows[1]['noise_multiplier']
  _image(tmp_path / 'privacy_utility.png')
  assert '| default | 8 | 1 |' in out.stdout


def test_writing_a_plot_keeps_the_callers_backend(tmp_path):
  # A notebook's inline backend must survive dpjax-train writing its plots
  # (pyplot's global backend switched to Agg hid every later plt.show()).
  code = (
      'import matplotlib; matplotlib.use("svg")\n'
      'from dpjax import plots\n'
      'plots.plot_training({"step": [1, 2], "test_accuracy": [0.1, 0.2],'
      ' "epsilon": [0.5, 1.0]}, %r)\n'
      'print(matplotlib.get_backend())\n' % str(tmp_path / 'training.png'))
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True, env=dict(
                           os.environ, PYTHONPATH=ROOT))
  assert out.stdout.strip() == 'svg'
  _image(str(tmp_path / 'training.png'))
