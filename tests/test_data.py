"""Tests for dpjax/data: IDX files, the MNIST, Fashion-MNIST and CIFAR-10
builders on fixtures and on the real files, digits, public data."""

import os
import pickle

import jax
import numpy as np
import pytest

from dpjax import data
from dpjax.data import cifar10
from dpjax.data import digits
from dpjax.data import fashion_mnist
from dpjax.data import idx
from dpjax.data import idx_builder
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
    (np.zeros((3, 4, 4, 1), np.float32), np.zeros(2, int), '3 images but 2'),
    (np.zeros((2, 16), np.float32), np.zeros(2, int), 'shape'),
])
def test_check_dataset_refuses_bad_structure(images, labels, match):
  with pytest.raises(ValueError, match=match):
    data.check_dataset(data.ArrayDataset(images, labels), 'train split')


def test_out_of_domain_counts_records_not_values():
  images = np.zeros((5, 4, 4, 1), np.float32)
  images[0, 1, 1, 0] = np.nan
  images[1, 0, 0, 0] = 2e6
  images[1, 0, 1, 0] = np.inf  # one record, two bad values
  labels = np.array([0, 10, -1, 3, 9])
  counts = data.out_of_domain(data.ArrayDataset(images, labels), 10, 1e6)
  assert counts == {'image': 2, 'label': 2}


def test_out_of_domain_reads_float16_features_in_chunks(tmp_path):
  """A memory-mapped float16 cache, read 2 rows at a time: every chunk
  counted, and 1e6 compared without overflowing float16."""
  images = np.zeros((7, 2, 2, 3), np.float16)
  images[2, 0, 0, 0] = np.inf
  images[6, 1, 1, 2] = np.nan
  images[4] = 60000.0  # finite in float16, within 1e6
  np.save(tmp_path / 'f.npy', images)
  cached = np.load(tmp_path / 'f.npy', mmap_mode='r')
  with np.errstate(all='raise'):
    counts = data.out_of_domain(data.ArrayDataset(cached, np.zeros(7, int)),
                                10, 1e6, chunk=2)
  assert counts == {'image': 2, 'label': 0}


def test_public_split_is_disjoint_and_leaves_the_private_set():
  full = digits.load()
  splits = data.load('digits', public_fraction=0.1, key=jax.random.key(3))
  assert len(splits.public) == round(0.1 * len(full.train))
  assert len(splits.train) + len(splits.public) == len(full.train)
  private = _as_set(splits.train.images, splits.train.labels)
  public = _as_set(splits.public.images, splits.public.labels)
  assert len(private & public) < 5  # the raw data has a few duplicates
  again = data.load('digits', public_fraction=0.1, key=jax.random.key(3))
  other = data.load('digits', public_fraction=0.1, key=jax.random.key(4))
  assert not np.array_equal(other.public.labels, splits.public.labels)
  np.testing.assert_array_equal(again.public.labels, splits.public.labels)
  assert data.load('digits').public is None


@pytest.mark.parametrize('fraction', [-0.1, 1.0, 1e-6])
def test_public_split_rejects_bad_fraction(fraction):
  with pytest.raises(ValueError, match='public'):
    data.load('digits', public_fraction=fraction)


# FashionMNIST and CIFAR-10 builders, public data from another dataset.

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data')
SHARED_FASHION = os.path.join(SHARED, 'fashion_mnist')
SHARED_CIFAR = os.path.join(SHARED, 'cifar10', 'cifar-10-batches-py')


def test_fashion_mnist_builder_on_fixtures(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  fixture = _write_fixture(raw)
  splits = data.load('fashion_mnist', manual_dir=str(raw),
                     tfds_data_dir=str(tmp_path / 'tfds'))
  assert splits.name == 'fashion_mnist'
  raw_pixels = np.rint(
      (splits.train.images * fashion_mnist.STD + fashion_mnist.MEAN) * 255)
  assert _as_set(raw_pixels[..., 0].astype(np.uint8),
                 splits.train.labels) == _as_set(*fixture['train'])
  assert len(splits.test) == 8


@pytest.mark.skipif(not os.path.isdir(SHARED_FASHION),
                    reason='../shared/data/fashion_mnist is not present')
def test_real_fashion_mnist_from_shared_data(tmp_path):
  splits = data.load('fashion_mnist', manual_dir=SHARED_FASHION,
                     tfds_data_dir=str(tmp_path / 'tfds'))
  assert splits.train.images.shape == (60000, 28, 28, 1)
  assert splits.test.images.shape == (10000, 28, 28, 1)
  assert np.bincount(splits.test.labels).tolist() == [1000] * 10
  # The published constants standardize the real training set.
  x = splits.train.images.astype(np.float64)
  assert abs(x.mean()) < 1e-2 and abs(x.std() - 1) < 1e-2


def _write_cifar_fixture(directory, n=6):
  rng = np.random.default_rng(2)
  arrays = {}
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    images = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, n)
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    with open(directory / name, 'wb') as f:
      pickle.dump({b'batch_label': b'x', b'labels': labels.tolist(),
                   b'data': rows, b'filenames': [b'f'] * n}, f)
    arrays[name] = (images, labels)
  return arrays


def test_cifar10_builder_on_fixtures(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  fixture = _write_cifar_fixture(raw)
  arrays = idx_builder.load_arrays(cifar10.Cifar10, str(raw),
                                   str(tmp_path / 'tfds'))
  images, labels = arrays['train']
  assert images.shape == (30, 32, 32, 3) and images.dtype == np.uint8
  expected = {(im.tobytes(), int(l)) for name, (ims, ls) in fixture.items()
              if name != 'test_batch' for im, l in zip(ims, ls)}
  assert {(im.tobytes(), int(l)) for im, l in zip(images, labels)} == expected
  splits = data.load('cifar10', manual_dir=str(raw),
                     tfds_data_dir=str(tmp_path / 'tfds'))
  assert splits.name == 'cifar10' and len(splits.test) == 6
  restored = np.rint((splits.test.images * cifar10.STD + cifar10.MEAN) * 255)
  assert {im.astype(np.uint8).tobytes() for im in restored} == {
      im.tobytes() for im in fixture['test_batch'][0]}


def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path):
  path = tmp_path / 'data_batch_1'
  path.write_bytes(pickle.dumps({b'data': os.system}))
  with pytest.raises(pickle.UnpicklingError, match='refusing'):
    cifar10.read_batch(str(path))


def test_cifar10_missing_batch_is_named(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  _write_cifar_fixture(raw)
  os.remove(raw / 'data_batch_3')
  with pytest.raises(FileNotFoundError, match='data_batch_3'):
    data.load('cifar10', manual_dir=str(raw),
              tfds_data_dir=str(tmp_path / 'tfds'))


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR),
                    reason='../shared/data/cifar10 is not present')
def test_real_cifar10_batches_from_shared_data():
  """The real python batches, read as the builder reads them (the tfds
  preparation itself, ~1 minute for 60000 images, is tested on fixtures)."""
  parts = [cifar10.read_batch(idx_builder.find_file(SHARED_CIFAR, name))
           for names in cifar10.Cifar10.FILES.values() for name in names]
  images = np.concatenate([p[0] for p in parts[:5]])
  labels = np.concatenate([p[1] for p in parts[:5]])
  assert images.shape == (50000, 32, 32, 3) and parts[5][0].shape[0] == 10000
  assert np.bincount(labels).tolist() == [5000] * 10
  # The published per-channel constants standardize the real training set.
  x = (images[::5].astype(np.float64) / 255 - cifar10.MEAN) / cifar10.STD
  np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-2)
  np.testing.assert_allclose(x.std((0, 1, 2)), 1, atol=1e-2)
  # Channels are R, G, B planes: sky-blue airplanes are bluer than red.
  planes = images[labels == 0].astype(np.float64).mean((0, 1, 2))
  assert planes[2] > planes[0]


def test_another_dataset_as_public_data(tmp_path):
  for name in ('mnist', 'fashion'):
    (tmp_path / name).mkdir()
  fixture = _write_fixture(tmp_path / 'fashion', n_train=30)
  _write_fixture(tmp_path / 'mnist')
  splits = data.load('mnist', manual_dir=str(tmp_path / 'mnist'),
                     tfds_data_dir=str(tmp_path / 'tfds'),
                     public_dataset='fashion_mnist',
                     public_manual_dir=str(tmp_path / 'fashion'),
                     public_size=12, key=jax.random.key(0))
  assert len(splits.train) == 20  # the private set is untouched
  assert len(splits.public) == 12
  raw_pixels = np.rint(
      (splits.public.images * fashion_mnist.STD + fashion_mnist.MEAN) * 255)
  assert _as_set(raw_pixels[..., 0].astype(np.uint8), splits.public.labels) <= (
      _as_set(*fixture['train']))
  with pytest.raises(ValueError, match='not both'):
    data.load('digits', public_fraction=0.1, public_dataset='mnist')
  with pytest.raises(ValueError, match='must match'):
    data.load('digits', public_dataset='mnist',
              public_manual_dir=str(tmp_path / 'mnist'),
              tfds_data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(ValueError, match='no public data'):
    data.load('digits', public_size=5)


def test_train_subset():
  full = digits.load()
  splits = data.load('digits', public_fraction=0.1, train_size=100,
                     key=jax.random.key(0))
  assert len(splits.train) == 100
  assert _as_set(splits.train.images, splits.train.labels) <= _as_set(
      full.train.images, full.train.labels)
  with pytest.raises(ValueError, match='subset size'):
    data.load('digits', train_size=10**6)


# The cache: announced, keyed on the raw files' SHA-256, never in ~.


def test_builders_never_say_downloading(tmp_path, capfd):
  raw = tmp_path / 'raw'
  raw.mkdir()
  _write_fixture(raw)
  cache = tmp_path / 'cache'
  for _ in range(2):  # preparing, then reading the cache
    data.load('mnist', manual_dir=str(raw), tfds_data_dir=str(cache))
  out, err = capfd.readouterr()
  assert 'ownload' not in out + err
  assert 'preparing the cache' in err and f'4 files in {raw}' in err
  assert f'dpjax_mnist: the cache {cache}' in err  # the second load says so


def test_source_names_the_files_read(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  _write_fixture(raw)
  splits = data.load('mnist', manual_dir=str(raw),
                     tfds_data_dir=str(tmp_path / 'cache'))
  files = splits.source['files']
  assert [os.path.basename(f['path']) for f in files] == [
      'train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
      't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz']
  first = files[0]
  assert first['sha256'] == idx_builder.file_record(first['path'])['sha256']
  assert splits.source['manual_dir'] == str(raw)
  assert splits.source['cache_dir'].startswith(str(tmp_path / 'cache'))


def test_changed_file_is_read_again_and_corrupt_one_refused(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  _write_fixture(raw)
  cache = str(tmp_path / 'cache')
  before = data.load('mnist', manual_dir=str(raw), tfds_data_dir=cache)
  labels = np.full(8, 7, np.uint8)
  idx.write_idx(raw / 't10k-labels-idx1-ubyte.gz', labels)
  after = data.load('mnist', manual_dir=str(raw), tfds_data_dir=cache)
  assert sorted(after.test.labels) == [7] * 8 != sorted(before.test.labels)
  assert after.source['cache_dir'] != before.source['cache_dir']
  # A truncated file is refused by name, although a cache of the old one
  # exists.
  path = raw / 'train-images-idx3-ubyte.gz'
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(ValueError, match=f'{path} is truncated or corrupt'):
    data.load('mnist', manual_dir=str(raw), tfds_data_dir=cache)


def test_corrupt_cifar_batch_is_named(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  _write_cifar_fixture(raw)
  path = raw / 'data_batch_2'
  path.write_bytes(path.read_bytes()[:500])
  with pytest.raises(ValueError, match=f'{path} is not a readable CIFAR-10'):
    data.load('cifar10', manual_dir=str(raw),
              tfds_data_dir=str(tmp_path / 'cache'))


def test_cifar_release_folder_inside_the_given_one(tmp_path):
  inner = tmp_path / 'cifar10' / 'cifar-10-batches-py'
  inner.mkdir(parents=True)
  _write_cifar_fixture(inner)
  assert idx_builder.check_manual_dir(
      cifar10.Cifar10, str(tmp_path / 'cifar10')) == str(inner)


def test_cache_location(tmp_path, monkeypatch):
  monkeypatch.delenv('DPJAX_CACHE_DIR', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert data.cache_root('/x/c', workdir='/w') == '/x/c'
  assert data.cache_root(None, workdir='/w') == os.path.join('/w', 'data_cache')
  assert data.cache_root() == str(tmp_path / 'home' / '.cache' / 'dpjax')
  monkeypatch.setenv('DPJAX_CACHE_DIR', str(tmp_path / 'shared_cache'))
  assert data.cache_root(None, workdir='/w') == str(tmp_path / 'shared_cache')
  raw = tmp_path / 'raw'
  raw.mkdir()
  _write_fixture(raw)
  splits = data.load('mnist', manual_dir=str(raw))
  assert splits.source['cache_dir'].startswith(str(tmp_path / 'shared_cache'))
  assert not (tmp_path / 'home').exists()  # no ~/tensorflow_datasets


# Your own arrays (.npz).


def _npz(path, n=40, test=None, **extra):
  rng = np.random.default_rng(3)
  arrays = {'images': rng.integers(0, 256, (n, 6, 6), np.uint8),
            'labels': rng.integers(0, 4, n)}
  if test:
    arrays.update(test_images=rng.integers(0, 256, (test, 6, 6), np.uint8),
                  test_labels=rng.integers(0, 4, test))
  arrays.update(extra)
  np.savez(path, **arrays)
  return arrays


def test_arrays_with_a_test_split(tmp_path):
  path = tmp_path / 'd.npz'
  raw = _npz(path, test=10)
  splits = data.load('arrays', path=str(path))
  assert splits.name == 'arrays' and splits.num_classes == 4
  assert splits.train.images.shape == (40, 6, 6, 1)
  assert splits.train.images.dtype == np.float32
  np.testing.assert_allclose(splits.train.images[..., 0],
                             raw['images'] / 255.0, rtol=1e-6)
  assert splits.test.labels.tolist() == raw['test_labels'].tolist()
  assert splits.source['files'][0]['path'] == str(path)
  assert data.load('arrays', path=str(path), num_classes=10).num_classes == 10


def test_arrays_keras_names_and_held_out_test(tmp_path):
  path = tmp_path / 'k.npz'
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 4, 4, 3)).astype(np.float32)
  np.savez(path, x_train=x, y_train=np.arange(50) % 3)
  splits = data.load('arrays', path=str(path), test_fraction=0.2,
                     key=jax.random.key(1))
  assert len(splits.train) == 40 and len(splits.test) == 10
  together = np.concatenate([splits.train.images, splits.test.images])
  assert {r.tobytes() for r in together} == {r.tobytes() for r in x}
  assert data.load('arrays', path=str(path), test_fraction=0.2,
                   key=jax.random.key(1)).test.labels.tolist() == (
                       splits.test.labels.tolist())


@pytest.mark.parametrize('arrays,match', [
    ({'x': np.zeros(3)}, 'needs images and labels'),
    ({'images': np.zeros((4, 8)), 'labels': np.zeros(4, int)}, r'\[N, H, W\]'),
    ({'images': np.zeros((4, 2, 2), np.int64), 'labels': np.zeros(4, int)},
     'uint8'),
    ({'images': np.zeros((4, 2, 2), np.float32), 'labels': np.zeros(4)},
     'integer class ids'),
    ({'images': np.zeros((4, 2, 2), np.float32), 'labels': np.zeros(4, int),
      'test_images': np.zeros((2, 2, 2), np.float32)}, 'both test_images'),
    ({'images': np.array([{'a': 1}], object), 'labels': np.zeros(1, int)},
     'not a readable .npz'),
])
def test_arrays_refuses_bad_files(tmp_path, arrays, match):
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=match):
    data.load('arrays', path=str(path))


def test_arrays_needs_a_path(tmp_path):
  with pytest.raises(ValueError, match='set data.path'):
    data.load('arrays')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.load('arrays', path=str(tmp_path / 'missing.npz'))
