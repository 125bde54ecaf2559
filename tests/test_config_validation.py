"""Tests for dpjax/config_validation.py: clear errors at the boundary."""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from dpjax import config_validation
from dpjax import data as data_lib
from dpjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_override_names_field_and_section():
  config = default.get_config()
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.check_overrides(
        config, ['--workdir', 'x', '--config.privacy.clip_norm=2',
                 '--config.privacy.foo=1'])
  message = str(e.value)
  assert "'privacy.foo'" in message
  for field in ('clip_norm', 'noise_multiplier', 'target_epsilon', 'delta'):
    assert field in message


@pytest.mark.parametrize('arg,match', [
    ('--config.privacyy.delta=1', "did you mean 'privacy'"),
    ('--config.privacy.clipnorm=1', "did you mean 'clip_norm'"),
    ('--config.seed.x=1', 'config.seed is a value, not a section'),
    ('--noconfig.perf.foo', "'perf.foo'"),
])
def test_unknown_override_variants(arg, match):
  with pytest.raises(config_validation.ConfigError, match=match):
    config_validation.check_overrides(default.get_config(), [arg])


def test_known_overrides_pass():
  config_validation.check_overrides(default.get_config(), [
      '--config.privacy.clip_norm=2', '--config.perf.num_devices', '2',
      '--noconfig.progress_bar', '--config=configs/mnist.py'])


def test_dpjax_train_reports_unknown_field(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'dpjax.main', '--workdir', str(workdir),
       '--config.privacy.foo=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode != 0
  assert "unknown config field 'privacy.foo'" in proc.stderr
  assert 'Fields of config.privacy: accountant, clip_norm' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not workdir.exists()


@pytest.mark.parametrize('field,value,match', [
    ('perf.num_devices', -1, 'perf.num_devices'),
    ('perf.physical_batch_size', 0, 'perf.physical_batch_size'),
    ('perf.checkpoint_every_steps', -5, 'perf.checkpoint_every_steps'),
    ('averaging.ema_decay', 1.0, 'averaging.ema_decay'),
    ('averaging.polyak_start_step', -1, 'averaging.polyak_start_step'),
    ('augmult.num_views', -2, 'augmult.num_views'),
    ('augmult.augmentations', ('rotate',), "augmult.augmentations.*'rotate'"),
])
def test_bad_values_refused_before_anything_is_written(tmp_path, field, value,
                                                       match):
  config = default.get_config()
  section, key = field.split('.')
  if key == 'augmentations':
    config.augmult.num_views = 2
  config[section][key] = value
  workdir = tmp_path / 'run'
  with pytest.raises(config_validation.ConfigError, match=match):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_microbatch_larger_than_physical_batch():
  config = default.get_config()
  config.perf.physical_batch_size = 32
  config.perf.microbatch_size = 64
  with pytest.raises(config_validation.ConfigError, match='microbatch'):
    config_validation.validate_config(config)


def _splits(**changes):
  rng = np.random.default_rng(0)
  parts = {
      'train': data_lib.ArrayDataset(
          rng.uniform(size=(20, 4, 4, 1)).astype(np.float32),
          rng.integers(0, 3, 20).astype(np.int32)),
      'test': data_lib.ArrayDataset(
          rng.uniform(size=(8, 4, 4, 1)).astype(np.float32),
          rng.integers(0, 3, 8).astype(np.int32)),
  }
  for name, (images, labels) in changes.items():
    ds = parts[name]
    parts[name] = data_lib.ArrayDataset(
        ds.images if images is None else images(ds.images),
        ds.labels if labels is None else labels(ds.labels))
  return data_lib.DataSplits('toy', parts['train'], parts['test'], 3)


def _set(index, value):
  def fn(x):
    x = x.copy()
    x[index] = value
    return x
  return fn


@pytest.mark.parametrize('changes,match', [
    ({'train': (None, lambda y: y.astype(np.float32) + 0.5)}, 'integers'),
    ({'train': (lambda x: (x * 255).astype(np.uint8), None)}, 'floating'),
    ({'train': (None, lambda y: y[:-1])}, '20 images but 19 labels'),
    ({'test': (lambda x: x[:, :3], None)}, "share one image shape"),
    ({'test': (lambda x: x[..., 0], None)}, r'\[N, H, W, C\]'),
])
def test_data_of_the_wrong_structure_is_refused(changes, match):
  config_validation.check_splits(_splits())
  with pytest.raises(ValueError, match=match):
    config_validation.check_splits(_splits(**changes))


@pytest.mark.parametrize('changes,where,field', [
    ({'train': (_set((3, 0, 0, 0), np.nan), None)}, 'train split', 'image'),
    ({'test': (_set((1, 2, 2, 0), np.inf), None)}, 'test split', 'image'),
    ({'train': (_set((0, 0, 0, 0), 3e7), None)}, 'train split', 'image'),
    ({'train': (None, _set(5, 3))}, 'train split', 'label'),
    ({'test': (None, _set(0, -1))}, 'test split', 'label'),
])
def test_out_of_domain_records_are_counted_not_refused(changes, where, field,
                                                       caplog):
  """One bad record must not abort a run, and no message shows its value."""
  counts = config_validation.check_splits(_splits(**changes))
  assert counts[where][field] == 1
  assert sum(c[f] for c in counts.values() for f in c) == 1
  assert where in caplog.text and 'train per record' in caplog.text
  for value in ('nan', 'inf', '3e+07', '30000000', '-1,', ' 3 '):
    assert value not in caplog.text.lower().replace('[0, 3)', '')


def test_public_split_with_non_finite_images_is_refused():
  splits = _splits()
  images = splits.train.images.copy()
  images[0, 0, 0, 0] = np.nan
  bad = splits._replace(public=data_lib.ArrayDataset(images,
                                                     splits.train.labels))
  with pytest.raises(ValueError, match='public split: 1 records'):
    config_validation.check_splits(bad)


def test_bad_structure_stops_training_before_writing(tmp_path, monkeypatch):
  bad = _splits(train=(None, lambda y: y[:-1]))
  monkeypatch.setattr(data_lib, 'load', lambda *a, **k: bad)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match='20 images but 19 labels'):
    train.train_and_evaluate(default.get_config(), str(workdir))
  assert not workdir.exists()


def test_load_config_with_argument(tmp_path):
  path = tmp_path / 'c.py'
  path.write_text('import ml_collections\n'
                  'def get_config(arg="a"):\n'
                  '  return ml_collections.ConfigDict({"name": arg})\n')
  assert config_validation.load_config(str(path)).name == 'a'
  assert config_validation.load_config(f'{path}:b').name == 'b'


@pytest.mark.parametrize('argv,kept,unset', [
    (['p', '--config.privacy.target_epsilon=None'], ['p'],
     ['privacy.target_epsilon']),
    (['p', '--config.privacy.target_epsilon', 'None', '--workdir', 'w'],
     ['p', '--workdir', 'w'], ['privacy.target_epsilon']),
    # The last override of a path wins, as for any flag.
    (['p', '--config.privacy.steps=None', '--config.privacy.steps=5'],
     ['p', '--config.privacy.steps=5'], []),
    (['p', '--config.privacy.steps=5', '--config.privacy.steps=None'],
     ['p'], ['privacy.steps']),
    # 'none' is a string value (model.norm='none'), not an unset.
    (['p', '--config.model.norm=none'], ['p', '--config.model.norm=none'], []),
    (['p', '--workdir', 'None'], ['p', '--workdir', 'None'], []),
])
def test_split_unset_overrides(argv, kept, unset):
  assert config_validation.split_unset_overrides(argv) == (kept, unset)


def test_unset_fields():
  config = default.get_config()
  config.lock()
  config_validation.unset_fields(config, ['privacy.target_epsilon',
                                          'privacy.epochs'])
  assert config.privacy.target_epsilon is None
  assert config.privacy.epochs is None
  with pytest.raises(config_validation.ConfigError, match='did you mean'):
    config_validation.unset_fields(config, ['privacy.target_epsilonn'])


def test_noise_multiplier_and_target_epsilon_are_exclusive(tmp_path):
  config = default.get_config()
  config.privacy.noise_multiplier = 1.1
  with pytest.raises(config_validation.ConfigError,
                     match='both set.*--config.privacy.target_epsilon=None'):
    config_validation.validate_config(config)
  with pytest.raises(config_validation.ConfigError, match='both set'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  config.privacy.target_epsilon = None
  config_validation.validate_config(config)
  assert train.privacy_config(config).noise_multiplier == 1.1
  config.privacy.noise_multiplier = None
  with pytest.raises(config_validation.ConfigError, match='neither'):
    config_validation.validate_config(config)
  config.privacy.enabled = False  # the non-private baseline needs neither
  config_validation.validate_config(config)


def test_default_config_sets_only_the_target():
  privacy = default.get_config().privacy
  assert privacy.target_epsilon == 3.0 and privacy.noise_multiplier is None
