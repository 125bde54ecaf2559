"""Tests for dpjax/data: IDX files, the MNIST builder on fixtures, digits."""

import os

import numpy as np
import pytest

from dpjax import data
from dpjax.data import digits
from dpjax.data import idx
from dpjax.data import mnist

SHARED_MNIST = os.path.join(os.path.dirname(__file__), '..', '..', 'shared',
                            'data', 'mnist')


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_idx_round_trip(tmp_path, suffix):
  array = np.random.default_rng(0).integers(0, 255, (5, 3, 2), np.uint8)
  path = tmp_path / f'x-idx3-ubyte{suffix}'
  idx.write_idx(path, array)
  np.testing.assert_array_equal(idx.read_idx(path), array)


def test_idx_rejects_truncated_file(tmp_path):
  path = tmp_path / 'x'
  idx.write_idx(path, np.zeros((4, 4), np.uint8))
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(ValueError, match='truncated'):
    idx.read_idx(path)


def _write_fixture(directory, n_train=20, n_test=8, gz=True):
  rng = np.random.default_rng(1)
  arrays = {}
  for split, n in (('train', n_train), ('t10k', n_test)):
    images = rng.integers(0, 256, (n, 28, 28), np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    suffix = '.gz' if gz else ''
    idx.write_idx(directory / f'{split}-images-idx3-ubyte{suffix}', images)
    idx.write_idx(directory / f'{split}-labels-idx1-ubyte{suffix}', labels)
    arrays[split] = (images, labels)
  return arrays


def _as_set(images, labels):
  return {(im.tobytes(), int(l)) for im, l in zip(images, labels)}


@pytest.mark.parametrize('gz', [True, False])
def test_mnist_builder_on_fixtures(tmp_path, gz):
  raw = tmp_path / 'raw'
  raw.mkdir()
  fixture = _write_fixture(raw, gz=gz)
  arrays = mnist.idx_builder.load_arrays(mnist.Mnist, str(raw),
                                         str(tmp_path / 'tfds'))
  for split, key in (('train', 'train'), ('test', 't10k')):
    images, labels = arrays[split]
    assert images.shape == (len(fixture[key][0]), 28, 28, 1)
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert _as_set(images[..., 0], labels) == _as_set(*fixture[key])


def test_mnist_splits_are_standardized(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  _write_fixture(raw)
  splits = data.load('mnist', manual_dir=str(raw),
                     tfds_data_dir=str(tmp_path / 'tfds'))
  assert splits.train.images.dtype == np.float32
  assert splits.train.images.min() >= (0 - mnist.MEAN) / mnist.STD - 1e-6
  assert len(splits.train) == 20 and len(splits.test) == 8


def test_missing_directory_names_files_and_fix(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    data.load('mnist', manual_dir=str(tmp_path / 'nowhere'),
              tfds_data_dir=str(tmp_path / 'tfds'))
  message = str(err.value)
  assert 'does not exist' in message
  assert 'train-images-idx3-ubyte' in message
  assert 'DPJAX_DATA_DIR' in message


def test_missing_file_is_listed(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  _write_fixture(raw)
  os.remove(raw / 't10k-labels-idx1-ubyte.gz')
  with pytest.raises(FileNotFoundError, match='t10k-labels-idx1-ubyte'):
    data.load('mnist', manual_dir=str(raw),
              tfds_data_dir=str(tmp_path / 'tfds'))


def test_no_directory_and_no_env(monkeypatch, tmp_path):
  monkeypatch.delenv('DPJAX_DATA_DIR', raising=False)
  with pytest.raises(FileNotFoundError, match='No data directory'):
    data.load('mnist', tfds_data_dir=str(tmp_path / 'tfds'))


def test_env_variable_locates_data(monkeypatch, tmp_path):
  (tmp_path / 'mnist').mkdir()
  _write_fixture(tmp_path / 'mnist')
  monkeypatch.setenv('DPJAX_DATA_DIR', str(tmp_path))
  splits = data.load('mnist', tfds_data_dir=str(tmp_path / 'tfds'))
  assert len(splits.train) == 20


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST),
                    reason='../shared/data/mnist is not present')
def test_real_mnist_from_shared_data(tmp_path):
  splits = data.load('mnist', manual_dir=SHARED_MNIST,
                     tfds_data_dir=str(tmp_path / 'tfds'))
  assert splits.train.images.shape == (60000, 28, 28, 1)
  assert splits.test.images.shape == (10000, 28, 28, 1)
  assert np.bincount(splits.test.labels).tolist()[:3] == [980, 1135, 1032]
  assert abs(float(splits.train.images.mean())) < 1e-2


def test_digits_split():
  splits = digits.load()
  assert splits.train.images.shape[1:] == (8, 8, 1)
  assert len(splits.train) + len(splits.test) == 1797
  assert len(splits.test) == 359
  assert 0.0 <= splits.train.images.min() and splits.train.images.max() <= 1.0
  train = _as_set(splits.train.images, splits.train.labels)
  test = _as_set(splits.test.images, splits.test.labels)
  assert len(train & test) < 5  # the raw data has a few duplicate images


def test_unknown_dataset():
  with pytest.raises(ValueError, match='Unknown dataset'):
    data.load('imagenet')


@pytest.mark.parametrize('images,labels,match', [
    (np.full((2, 4, 4, 1), np.nan, np.float32), np.zeros(2, int), 'NaN'),
    (np.zeros((2, 4, 4, 1), np.float32), np.array([0, 10]), 'labels must'),
    (np.zeros((2, 4, 4, 1), np.float32), np.array([0, -1]), 'labels must'),
    (np.zeros((3, 4, 4, 1), np.float32), np.zeros(2, int), '3 images but 2'),
    (np.zeros((2, 16), np.float32), np.zeros(2, int), 'shape'),
])
def test_check_dataset_refuses_bad_data(images, labels, match):
  with pytest.raises(ValueError, match=match):
    data.check_dataset(data.ArrayDataset(images, labels), 10, 'train split')


def test_public_split_is_disjoint_and_leaves_the_private_set():
  full = digits.load()
  splits = data.load('digits', public_fraction=0.1, public_seed=3)
  assert len(splits.public) == round(0.1 * len(full.train))
  assert len(splits.train) + len(splits.public) == len(full.train)
  private = _as_set(splits.train.images, splits.train.labels)
  public = _as_set(splits.public.images, splits.public.labels)
  assert len(private & public) < 5  # the raw data has a few duplicates
  again = data.load('digits', public_fraction=0.1, public_seed=3)
  np.testing.assert_array_equal(again.public.labels, splits.public.labels)
  assert data.load('digits').public is None


@pytest.mark.parametrize('fraction', [-0.1, 1.0, 1e-6])
def test_public_split_rejects_bad_fraction(fraction):
  with pytest.raises(ValueError, match='public'):
    data.load('digits', public_fraction=fraction)
