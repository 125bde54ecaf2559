"""Tests for dpjax/data/features.py: ScatterNet features, cached by checksum
and settings, through data.load and the config checks."""

import os

import numpy as np
import pytest

from configs import default
from dpjax import config_validation
from dpjax import data
from dpjax import keys
from dpjax import scatternet
from dpjax.data import features
from dpjax.data import idx


def _mnist_fixture(directory, seed=1, n_train=24, n_test=8):
  rng = np.random.default_rng(seed)
  directory.mkdir(exist_ok=True)
  for split, n in (('train', n_train), ('t10k', n_test)):
    idx.write_idx(directory / f'{split}-images-idx3-ubyte',
                  rng.integers(0, 256, (n, 28, 28), np.uint8))
    idx.write_idx(directory / f'{split}-labels-idx1-ubyte',
                  rng.integers(0, 10, n).astype(np.uint8))
  return str(directory)


def _cache_files(tfds_dir):
  directory = os.path.join(tfds_dir, features.CACHE_SUBDIR)
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_load_with_scatternet_features_computes_then_reads_the_cache(
    tmp_path, monkeypatch):
  raw, tfds_dir = _mnist_fixture(tmp_path / 'raw'), str(tmp_path / 'tfds')
  pixels = data.load('mnist', manual_dir=raw, tfds_data_dir=tfds_dir)
  splits = data.load('mnist', manual_dir=raw, tfds_data_dir=tfds_dir,
                     features='scatternet')
  assert splits.train.images.shape == (24, 7, 7, 81)
  assert splits.train.images.dtype == np.float16
  np.testing.assert_array_equal(splits.train.labels, pixels.train.labels)
  want = np.asarray(scatternet.scattering(pixels.test.images))
  np.testing.assert_allclose(splits.test.images, want, rtol=2e-3, atol=2e-3)
  files = _cache_files(tfds_dir)
  assert len(files) == 2 and all('scatternet-J2-L8-o2' in f for f in files)
  assert splits.source['features'] == {
      'transform': features.ScatterSettings().tag(),
      'cache_dir': os.path.join(tfds_dir, features.CACHE_SUBDIR)}
  assert splits.source['files'] == pixels.source['files']

  # The second load never runs the transform.
  def refuse(*args, **kwargs):
    raise AssertionError('features recomputed despite the cache')

  monkeypatch.setattr(features, 'compute', refuse)
  again = data.load('mnist', manual_dir=raw, tfds_data_dir=tfds_dir,
                    features='scatternet')
  np.testing.assert_array_equal(again.train.images, splits.train.images)
  assert _cache_files(tfds_dir) == files


def test_cache_is_keyed_on_the_data_and_the_settings(tmp_path):
  directory = str(tmp_path / 'cache')
  rng = np.random.default_rng(0)
  images = rng.random((5, 16, 16, 1)).astype(np.float32)
  settings = features.ScatterSettings()
  first = features.cached(images, 'x', settings, directory, progress=False)
  assert len(os.listdir(directory)) == 1
  np.testing.assert_array_equal(
      features.cached(images.copy(), 'x', settings, directory), first)
  assert len(os.listdir(directory)) == 1
  # Other images under the same name: a new entry, never the stale one.
  other = images.copy()
  other[0, 0, 0, 0] += 1.0
  changed = features.cached(other, 'x', settings, directory, progress=False)
  assert len(os.listdir(directory)) == 2
  assert not np.array_equal(changed, first)
  # Other settings: a new entry with their shape.
  coarse = features.ScatterSettings(J=1, L=4, order=1)
  out = features.cached(images, 'x', coarse, directory, progress=False)
  assert len(os.listdir(directory)) == 3
  assert out.shape == (5, 8, 8, scatternet.num_channels(1, 4, 1))


def test_public_slices_and_subsets_share_the_full_split_features(tmp_path):
  raw, tfds_dir = _mnist_fixture(tmp_path / 'raw'), str(tmp_path / 'tfds')
  full = data.load('mnist', manual_dir=raw, tfds_data_dir=tfds_dir,
                   features='scatternet')
  split = data.load('mnist', manual_dir=raw, tfds_data_dir=tfds_dir,
                    features='scatternet', public_fraction=0.25,
                    train_size=10, key=keys.public_root(0, keys.DATA))
  assert len(_cache_files(tfds_dir)) == 2
  rows = {im.tobytes() for im in full.train.images}
  assert len(split.public) == 6 and len(split.train) == 10
  assert all(im.tobytes() in rows for im in split.public.images)
  assert all(im.tobytes() in rows for im in split.train.images)


def test_cache_dir_is_under_the_prepared_data_cache(monkeypatch):
  assert features.cache_dir('/data/cache') == '/data/cache/dpjax_features'
  monkeypatch.setenv('DPJAX_CACHE_DIR', '/env/cache')
  assert features.cache_dir(None) == '/env/cache/dpjax_features'
  monkeypatch.delenv('DPJAX_CACHE_DIR')
  assert features.cache_dir(None) == os.path.expanduser(
      '~/.cache/dpjax/dpjax_features')


def test_feature_settings_are_checked():
  with pytest.raises(ValueError, match="one of \\['scatternet'\\]"):
    data.load('digits', features='sift')
  config = default.get_config()
  config.model.name = 'scatter_cnn'
  with pytest.raises(config_validation.ConfigError,
                     match="set data.features='scatternet'"):
    config_validation.validate_config(config)
  config.data.features = 'scatternet'
  config_validation.validate_config(config)
  config.eval_size = 0
  with pytest.raises(config_validation.ConfigError, match='eval_size'):
    config_validation.validate_config(config)
