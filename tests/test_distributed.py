"""Tests for dpjax/distributed.py on 1, 2 and 8 fake CPU devices.

The device count is fixed when jax starts, so the multi-device checks run in
one subprocess (tests/multidevice_worker.py) and are asserted here.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from dpjax import distributed

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def worker(tmp_path_factory):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(
      [sys.executable, os.path.join(HERE, 'multidevice_worker.py'),
       str(tmp_path_factory.mktemp('multidevice'))],
      capture_output=True, text=True, timeout=600, env=env, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('devices', [1, 2, 8])
def test_per_example_gradients_identical_to_single_device(worker, devices):
  assert worker[f'per_example_max_abs_{devices}'] > 1e-3
  assert worker[f'per_example_max_diff_{devices}'] <= 1e-6


@pytest.mark.parametrize('devices', [1, 2, 8])
def test_clipped_sum_norms_and_counts_match(worker, devices):
  assert worker[f'sum_max_diff_{devices}'] < 1e-5
  assert worker[f'norms_max_diff_{devices}'] < 1e-5
  assert worker[f'num_clipped_{devices}'] == worker['num_clipped_ref'] > 0


@pytest.mark.parametrize('name', ['2', '8_physical'])
def test_same_key_same_noisy_update(worker, name):
  """One draw for the whole mesh: the noisy update (norm ~ 3.6) is the same."""
  assert worker['update_norm'] > 1.0
  assert worker[f'update_max_diff_{name}'] < 1e-5


@pytest.mark.parametrize('name', ['dp', 'nonprivate'])
def test_augmentation_views_do_not_depend_on_devices(worker, name):
  assert worker[f'augmult_{name}_update_norm'] > 1e-3
  assert worker[f'augmult_{name}_max_diff_2'] < 1e-5


def test_batch_rows_split_without_loss_or_duplicates(worker):
  assert worker['shards'] == [[2 * i, 2 * i + 1] for i in range(8)]
  assert 'does not split into 8 equal device shards' in (
      worker['indivisible_error'])


def test_dpjax_train_on_two_devices_matches_one(worker):
  one, two = worker['e2e']['1'], worker['e2e']['2']
  assert two['num_devices'] == 2
  assert two['compiled_batch_sizes'] == one['compiled_batch_sizes']
  assert all(size % 128 == 0 for size in two['compiled_batch_sizes'])
  assert two['epsilon'] == one['epsilon']
  assert two['test_loss'] == pytest.approx(one['test_loss'], rel=1e-4)


@pytest.mark.parametrize('kind', [
    'bookkeeping', 'adaptive', 'batch_clipping', 'pruning', 'bn_public',
    'bn_frozen', 'bn_privatized', 'bn_batch', 'per_layer_ghost',
    'pruning_bookkeeping', 'bn_privatized_bookkeeping'])
def test_every_engine_and_policy_on_a_mesh_matches_one_device(worker, kind):
  """Formerly refused on a mesh: the fast route, batch clipping, every
  BatchNorm policy, pruning; and formerly refused on the fast routes:
  per-layer clipping, pruning, the privatized statistics. The same noisy
  update on 2 and 8 devices (and, with a vmap twin, on the vmap route)."""
  result = worker['composed'][kind]
  assert result['update_norm'] > 1e-2
  for setting, diff in result.items():
    if setting != 'update_norm':
      assert diff < 1e-5, (setting, diff)


def test_mesh_errors_name_the_fix():
  with pytest.raises(ValueError, match='xla_force_host_platform_device_count'):
    distributed.make_mesh(jax.device_count() + 1)
  with pytest.raises(ValueError, match='num_devices'):
    distributed.make_mesh(-1)


def test_batch_multiple():
  assert distributed.batch_multiple(4, None, 6) == 12
  assert distributed.batch_multiple(1, None, 6) == 6
  assert distributed.batch_multiple(4, 64, 6) == 64
  with pytest.raises(ValueError, match='multiple of 4'):
    distributed.batch_multiple(4, 30, 6)
