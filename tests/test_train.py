"""End-to-end tests of dpjax/train.py and the dpjax-train command."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from configs import default
from dpjax import models
from dpjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def default_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('default'))
  config = default.get_config()
  config.progress_bar = False
  return workdir, train.train_and_evaluate(config, workdir)


def test_default_config_meets_targets(default_run):
  _, summary = default_run
  assert summary['epsilon'] <= 3.0
  assert summary['delta'] == 1e-5
  assert summary['test_accuracy'] >= 0.85
  assert summary[train.DIAGNOSTICS]['train_time_s'] < 120


def test_default_run_writes_summary_and_plot(default_run):
  workdir, summary = default_run
  with open(os.path.join(workdir, 'summary.json')) as f:
    written = json.load(f)
  for key in ('epsilon', 'delta', 'noise_multiplier', 'accountant', 'steps',
              'sampling_rate', 'clip_norm', 'test_accuracy', 'noise_key'):
    assert key in written, key
  # What was computed from private data without noise is labelled so.
  assert set(written[train.DIAGNOSTICS]) == {
      'train_time_s', 'num_nonfinite_gradients', 'compiled_batch_sizes'}
  for key in written[train.DIAGNOSTICS]:
    assert key not in written
  assert written['epsilon'] == pytest.approx(summary['epsilon'])
  assert os.path.getsize(os.path.join(workdir, 'training.png')) > 1000
  with open(os.path.join(workdir, 'history.json')) as f:
    history = json.load(f)
  assert history['epsilon'] == sorted(history['epsilon'])
  assert history['step'][-1] == summary['steps']


def test_ledger_epsilon_equals_plan_epsilon(default_run):
  _, summary = default_run
  plan = dpjax.make_plan(train.privacy_config(default.get_config()),
                         summary['dataset_size'])
  assert summary['epsilon'] == pytest.approx(plan.epsilon(), rel=1e-9)
  assert summary['noise_multiplier'] == pytest.approx(plan.noise_multiplier)


def test_non_private_baseline(tmp_path):
  config = default.get_config()
  config.progress_bar = False
  config.privacy.enabled = False
  config.privacy.steps = 20
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['epsilon'] == float('inf')
  assert not summary['private']


def _step_params(padded_size, noise_multiplier=0.0):
  model = models.SmallCNN()
  config = dpjax.PrivacyConfig(clip_norm=1.0, noise_multiplier=noise_multiplier,
                               expected_batch_size=4, steps=1)
  plan = dpjax.make_plan(config, 100, keys=dpjax.KeySchedule(0, 0))
  tx = optax.chain(plan.noise(), optax.sgd(1.0))
  state = train.create_train_state(model, jax.random.key(0), (8, 8, 1), tx)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(100, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 100))
  indices = np.zeros(padded_size, np.int32)
  indices[:3] = [5, 17, 42]
  indices[3:] = 7  # padding rows point at a real example: must not count
  mask = np.arange(padded_size) < 3
  step = train.make_train_step(model, plan)
  state, _ = step(state, images, labels, indices, mask)
  return state.params


@pytest.mark.parametrize('noise_multiplier', [0.0, 1.0])
def test_update_does_not_depend_on_padding(noise_multiplier):
  """Same 3 real examples, 3 or 8 or 16 rows: the same update.

  The divisor is the public expected batch size, so neither the realized nor
  the padded batch size can change the update.
  """
  ref = _step_params(3, noise_multiplier)
  for padded in (8, 16):
    out = _step_params(padded, noise_multiplier)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_model_with_batch_stats_is_refused():
  class BNModel(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=False)(x)
      return nn.Dense(10)(x.reshape(x.shape[0], -1))

  with pytest.raises(ValueError, match='batch_stats'):
    train.create_train_state(BNModel(), jax.random.key(0), (8, 8, 1),
                             optax.sgd(0.1))


@pytest.mark.parametrize('field,value,match', [
    ('optimizer.name', 'rmsprop', 'optimizer.name'),
    ('optimizer.schedule', 'linear', 'optimizer.schedule'),
])
def test_bad_optimizer_settings(tmp_path, field, value, match):
  config = default.get_config()
  config.progress_bar = False
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path))


def test_dpjax_train_command(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'dpjax.main', '--workdir', str(workdir),
       '--config.privacy.steps=5', '--config.progress_bar=False'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['steps'] == 5
  assert summary['dataset'] == 'digits'
  assert 'test accuracy' in proc.stdout


def test_mnist_config_loads_from_any_directory(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-c',
       'import sys; from dpjax import main; '
       f'sys.argv = ["dpjax-train", "--config", '
       f'"{REPO}/configs/mnist.py"]; main._config_root_on_path(sys.argv); '
       'from configs import mnist; c = mnist.get_config(); '
       'print(c.data.name, c.privacy.expected_batch_size)'],
      cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ['mnist', '512']


# Every clipping mode through config fields; summary.json names the guarantee.
CLIPPING_RUNS = {
    'per_layer': dict(mode='per_layer', layers='alc', layer_noise='per_layer'),
    'automatic': dict(mode='automatic', gamma=0.0),
    'adaptive': dict(mode='adaptive', layers='equal',
                     adaptive_accounting='compose'),
}


@pytest.mark.parametrize('name', sorted(CLIPPING_RUNS))
def test_clipping_modes_run_from_config(tmp_path, name):
  config = default.get_config()
  config.progress_bar = False
  config.privacy.steps = 3
  config.privacy.noise_multiplier = 1.0
  config.privacy.target_epsilon = None
  config.privacy.expected_batch_size = 64
  config.data.public_fraction = 0.1
  for key, value in CLIPPING_RUNS[name].items():
    config.privacy.clipping[key] = value
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['clipping_mode'] == name
  assert summary['sampler'] == 'poisson'
  assert summary['neighbouring_relation'] == 'add_or_remove_one'
  assert summary['accountant'] == 'rdp'
  assert np.isfinite(summary['sensitivity'])
  assert summary['epsilon'] > 0
  if name == 'per_layer':
    assert summary['sensitivity'] == pytest.approx(
        np.sqrt(np.sum(np.square(summary['layer_clip_norms']))), rel=1e-5)
    assert max(summary['layer_clip_norms']) == pytest.approx(1.0)
    assert summary['per_layer_noise_multiplier'] == pytest.approx(
        np.sqrt(summary['num_clip_groups']))
  if name == 'adaptive':
    assert summary['noise_multiplier'] < summary['gradient_noise_multiplier']
    assert summary['num_counts'] == summary['num_clip_groups'] == 6


def test_batch_clipping_runs_from_the_command_line(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'dpjax.main', '--workdir', str(workdir),
       '--config', os.path.join(REPO, 'configs', 'default.py'),
       '--config.privacy.steps=6', '--config.progress_bar=False',
       '--config.privacy.expected_batch_size=64',
       '--config.privacy.accountant=gdp', '--config.data.public_fraction=0.1',
       '--config.privacy.clipping.mode=batch',
       '--config.privacy.clipping.group_size=16',
       '--config.privacy.clipping.layers=alc',
       '--config.privacy.clipping.alc_every_epoch=True',
       '--config.privacy.clipping.alc_decay=0.5'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['clipping_mode'] == 'batch'
  assert summary['sampler'] == 'shuffle'
  assert summary['neighbouring_relation'] == 'replace_one'
  assert summary['accountant'] == 'gdp'
  assert summary['groups_per_batch'] == 4
  # 1294 private digits / 64 = 20 steps per epoch: 6 steps are 1 epoch.
  assert summary['epochs_accounted'] == 1
  assert summary['gdp_mu'] == pytest.approx(1 / summary['noise_multiplier'])
  # Rescaled ALC thresholds: sum C_i^2 = C^2, so the replace-one bound is 2C.
  assert summary['sensitivity'] == pytest.approx(2.0, rel=1e-5)


def test_scale_features_from_config_fields(tmp_path):
  """Averages, augmentation multiplicity and physical batches via config."""
  config = default.get_config()
  config.progress_bar = False
  config.privacy.steps = 4
  config.privacy.noise_multiplier = 1.0
  config.privacy.target_epsilon = None
  config.eval_every_steps = 2
  config.averaging.ema_decay = 0.9
  config.averaging.polyak = True
  config.augmult.num_views = 2
  config.perf.physical_batch_size = 96
  summary = train.train_and_evaluate(config, str(tmp_path))
  for key in ('test_accuracy', 'test_accuracy_ema', 'test_accuracy_polyak'):
    assert 0 <= summary[key] <= 1, key
  assert summary['augmult_views'] == 2
  assert all(size % 96 == 0
             for size in summary[train.DIAGNOSTICS]['compiled_batch_sizes'])
  plan = dpjax.make_plan(train.privacy_config(config), summary['dataset_size'])
  assert summary['epsilon'] == pytest.approx(plan.epsilon(), rel=1e-9)
  history = json.loads((tmp_path / 'history.json').read_text())
  assert len(history['test_accuracy_ema']) == len(history['step']) == 2
  assert os.path.getsize(tmp_path / 'training.png') > 1000
  assert not [f for f in os.listdir(tmp_path) if 'tmp' in f]


def test_adaptive_clipping_counts_add_up_over_physical_batches():
  """Physical batches change nothing, also for a clipping with state.

  Adaptive clipping counts examples under its threshold during the step; the
  counts of the physical batches must add up before the (once-per-step)
  noised threshold update, so the two runs end in the same state.
  """
  config = dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=64, steps=2,
      clipping=dpjax.plan.ClippingConfig(mode='adaptive'))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(200, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 200))
  model = models.SmallCNN()
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 8, 8, 1)))['params']
  indices = np.arange(96, dtype=np.int32)
  mask = np.arange(96) < 70

  def run(physical):
    plan = dpjax.make_plan(config, 200, params=shapes,
                           keys=dpjax.KeySchedule(0, 4))
    tx = optax.chain(plan.noise(), optax.sgd(0.5))
    state = train.create_train_state(model, jax.random.key(0), (8, 8, 1), tx)
    state = state.replace(clip_state=plan.clipping.init(state.params))
    step = train.make_train_step(model, plan, physical_batch_size=physical)
    for _ in range(2):
      state, _ = step(state, images, labels, indices, mask)
    return state

  whole, pieces = run(None), run(32)
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(pieces.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(whole.clip_state.clip_norms,
                             pieces.clip_state.clip_norms, rtol=1e-6)
  assert float(whole.clip_state.clip_norms) != 1.0  # the threshold moved


def _short_config(**privacy):
  config = default.get_config()
  config.progress_bar = False
  config.privacy.steps = 4
  config.privacy.noise_multiplier = 1.0
  config.privacy.target_epsilon = None
  config.privacy.update(privacy)
  return config


def _final_meta(workdir):
  ckpt = os.path.join(workdir, 'checkpoints')
  last = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  with open(os.path.join(ckpt, str(last), 'meta', 'metadata')) as f:
    return json.load(f)


def test_noise_is_secret_unless_a_noise_seed_is_given(tmp_path):
  """Two runs without noise_seed differ; with the same one, bit-identical.

  The secret lives in the checkpoint only: summary.json, history.json and
  the console never carry it.
  """
  runs = {}
  for name, seed in (('a', None), ('b', None), ('c', 11), ('d', 11)):
    workdir = str(tmp_path / name)
    runs[name] = (workdir, train.train_and_evaluate(
        _short_config(noise_seed=seed), workdir))
  meta = {name: _final_meta(w) for name, (w, _) in runs.items()}
  assert meta['a']['checksum'] != meta['b']['checksum']
  assert meta['a']['secret_seed'] != meta['b']['secret_seed']
  assert meta['c']['checksum'] == meta['d']['checksum']
  assert meta['c']['secret_seed'] == '11'
  for name in 'ab':
    workdir, summary = runs[name]
    secret = meta[name]['secret_seed']
    for file in ('summary.json', 'history.json'):
      with open(os.path.join(workdir, file)) as f:
        assert secret not in f.read()
    assert summary['config']['privacy']['noise_seed'] is None
    assert 'OS entropy' in summary['noise_key']
  _, seeded = runs['c']
  assert seeded['config']['privacy']['noise_seed'] == 11
  assert 'assumes that seed stays secret' in seeded['noise_key']


def test_public_seed_still_reproduces_what_may_be_public(tmp_path):
  """config.seed drives init and the data split, not the noise."""
  config = _short_config()
  keys = train.key_schedule(config)
  other = train.key_schedule(config)
  same = lambda a, b: np.array_equal(jax.random.key_data(a),
                                     jax.random.key_data(b))
  assert same(keys.key(dpjax.keys.INIT), other.key(dpjax.keys.INIT))
  assert not same(keys.root(dpjax.keys.NOISE), other.root(dpjax.keys.NOISE))
  del tmp_path


def test_out_of_domain_records_train_and_no_value_is_shown(
    tmp_path, monkeypatch, caplog, capfd):
  """One NaN image and one pixel at 2e6: the run trains, counts only."""
  from dpjax import data as data_lib  # pylint: disable=g-import-not-at-top
  load = data_lib.load

  def poisoned(*args, **kwargs):
    splits = load(*args, **kwargs)
    images = splits.train.images.copy()
    images[3, 2, 2, 0] = np.nan
    images[7, 1, 1, 0] = 2e6
    labels = splits.train.labels.copy()
    labels[11] = 10  # outside the classes
    return splits._replace(train=data_lib.ArrayDataset(images, labels))

  monkeypatch.setattr(data_lib, 'load', poisoned)
  summary = train.train_and_evaluate(_short_config(noise_seed=1),
                                     str(tmp_path))
  assert np.isfinite(summary['test_loss'])
  out = capfd.readouterr()
  text = caplog.text + out.out + out.err
  assert '2 records with an image outside the domain' in text
  assert '1 with a label outside [0, 10)' in text
  for private_value in ('2e+06', '2000000', 'nan', 'NaN'):
    assert private_value not in text, private_value


def _tiny_mnist(directory, n_train=64, n_test=16):
  from dpjax.data import idx  # pylint: disable=g-import-not-at-top
  directory.mkdir()
  rng = np.random.default_rng(0)
  for split, n in (('train', n_train), ('t10k', n_test)):
    idx.write_idx(directory / f'{split}-images-idx3-ubyte.gz',
                  rng.integers(0, 256, (n, 28, 28), np.uint8))
    idx.write_idx(directory / f'{split}-labels-idx1-ubyte.gz',
                  rng.integers(0, 10, n).astype(np.uint8))


def _fast(config):
  config.progress_bar = False
  config.privacy.steps = 2
  config.privacy.expected_batch_size = 16
  config.perf.pad_to_multiple_of = 64
  return config


def test_summary_names_the_data_files_and_cache(tmp_path, monkeypatch):
  monkeypatch.delenv('DPJAX_CACHE_DIR', raising=False)
  _tiny_mnist(tmp_path / 'raw')
  config = _fast(default.get_config())
  config.data.name = 'mnist'
  config.data.manual_dir = str(tmp_path / 'raw')
  workdir = tmp_path / 'run'
  summary = train.train_and_evaluate(config, str(workdir))
  source = summary['data_source']
  assert sorted(os.path.basename(f['path']) for f in source['files']) == [
      't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz',
      'train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz']
  assert all(len(f['sha256']) == 64 for f in source['files'])
  # No cache given: it goes under the workdir, not the user's home.
  assert source['cache_dir'].startswith(str(workdir / 'data_cache'))
  written = json.loads((workdir / 'summary.json').read_text())
  assert written['data_source'] == source


def test_trains_on_user_arrays(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / 'mine.npz'
  np.savez(path, images=rng.integers(0, 256, (300, 8, 8), np.uint8),
           labels=rng.integers(0, 3, 300))
  config = _fast(default.get_config())
  config.data.name = 'arrays'
  config.data.path = str(path)
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['dataset'] == 'arrays'
  assert summary['dataset_size'] == 270  # 10% held out as the test split
  assert summary['data_source']['files'][0]['path'] == str(path)
  assert 0 <= summary['test_accuracy'] <= 1 and summary['epsilon'] > 0


def test_scatternet_features_and_eval_size(tmp_path, monkeypatch):
  """ScatterNet+linear on the digits' features (cached under the cache
  root); evaluations during training on 100 test digits, the last on all
  359."""
  monkeypatch.setenv('DPJAX_CACHE_DIR', str(tmp_path / 'cache'))
  config = default.get_config()
  config.progress_bar = False
  config.data.features = 'scatternet'
  config.model.name = 'scatter_linear'
  config.model.affine = False
  config.privacy.steps = 30
  config.eval_every_steps = 10
  config.eval_size = 100
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['epsilon'] <= 3.0 and summary['test_accuracy'] >= 0.7
  with open(tmp_path / 'run' / 'history.json') as f:
    accuracies = json.load(f)['test_accuracy']
  counts = [a * 100 for a in accuracies[:-1]] + [accuracies[-1] * 359]
  assert all(abs(c - round(c)) < 1e-6 for c in counts)
  assert os.listdir(tmp_path / 'cache' / 'dpjax_features')


def test_batch_clipping_with_per_example_dropout(tmp_path):
  """Groups of examples clipped together, each member with its own dropout
  key (from its dataset index), on the transformer: the masks are applied,
  and are the same on the vmap and book-keeping routes."""
  from configs import transformer_markov  # pylint: disable=g-import-not-at-top

  def run(grad_route, dropout_rate):
    config = transformer_markov.get_config()
    config.progress_bar = False
    config.model.dim, config.model.depth, config.model.mlp_dim = 16, 1, 16
    config.model.dropout_rate = dropout_rate
    config.privacy.steps = 2
    config.privacy.noise_multiplier = 1.0
    config.privacy.noise_seed = 0
    config.privacy.target_epsilon = None
    config.privacy.expected_batch_size = 32
    config.privacy.accountant = 'gdp'
    config.privacy.clipping.mode = 'batch'
    config.privacy.clipping.group_size = 4
    config.perf.grad_route = grad_route
    config.eval_size = 256
    workdir = tmp_path / f'{grad_route}_{dropout_rate}'
    return train.train_and_evaluate(config, str(workdir))

  summary = run('bookkeeping', 0.2)
  assert summary['clipping_mode'] == 'batch'
  assert summary['groups_per_batch'] == 8
  assert summary['sampler'] == 'shuffle'
  assert summary['epsilon'] > 0
  assert summary['test_loss'] == pytest.approx(run('vmap', 0.2)['test_loss'],
                                               rel=1e-4)
  assert summary['test_loss'] != pytest.approx(
      run('bookkeeping', 0.0)['test_loss'], rel=1e-4)


def test_scatternet_features_normalized_by_privatized_once_statistics(
    tmp_path, monkeypatch):
  """ScatterNet+linear with the features' statistics released once over the
  private digits: the release is in the summary and in epsilon, which the
  calibration keeps at the target, and the model learns."""
  monkeypatch.setenv('DPJAX_CACHE_DIR', str(tmp_path / 'cache'))
  config = default.get_config()
  config.progress_bar = False
  config.data.features = 'scatternet'
  config.model.name = 'scatter_linear'
  config.model.norm = 'batch'
  config.model.affine = False
  config.normalization.policy = 'privatized_once'
  config.normalization.stats_clip_norm = 1.0
  config.privacy.steps = 30
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['normalization']['policies'] == {
      'batch_stats': 'privatized_once'}
  assert 0 < summary['initial_release_epsilon'] < summary['epsilon']
  assert summary['epsilon'] == pytest.approx(3.0, abs=1e-3)
  assert summary['test_accuracy'] >= 0.7
