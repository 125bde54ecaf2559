"""Datasets: the embedded digits, generated token sequences (Markov chains),
tfds builders over local raw files, and your own arrays (a .npz file)."""

from __future__ import annotations

from dpjax import keys as keys_lib
from dpjax.data.base import ArrayDataset
from dpjax.data.base import cache_root
from dpjax.data.base import check_dataset
from dpjax.data.base import DataSplits
from dpjax.data.base import eval_subset
from dpjax.data.base import input_field
from dpjax.data.base import out_of_domain
from dpjax.data.base import random_subset
from dpjax.data.base import split_public
from dpjax.data.base import subsample_train
from dpjax.data import features as features_lib

DATASETS: tuple[str, ...] = ('digits', 'mnist', 'fashion_mnist', 'cifar10',
                             'arrays', 'markov', 'markov_lm', 'markov_public')


def _load_one(name: str, manual_dir: str | None, tfds_data_dir: str | None,
              **arrays_options) -> DataSplits:
  # pylint: disable=g-import-not-at-top
  if name == 'arrays':
    from dpjax.data import arrays
    return arrays.load(**arrays_options)
  if name == 'digits':
    from dpjax.data import digits
    return digits.load()
  if name.startswith('markov'):
    from dpjax.data import markov
    return markov.load(name)
  if name == 'mnist':
    from dpjax.data import mnist
    return mnist.load(manual_dir, tfds_data_dir)
  if name == 'fashion_mnist':
    from dpjax.data import fashion_mnist
    return fashion_mnist.load(manual_dir, tfds_data_dir)
  if name == 'cifar10':
    from dpjax.data import cifar10
    return cifar10.load(manual_dir, tfds_data_dir)
  known = ', '.join(repr(d) for d in DATASETS)
  raise ValueError(f'Unknown dataset {name!r}; known: {known}.')


def load(name: str, *, manual_dir: str | None = None,
         tfds_data_dir: str | None = None, public_fraction: float = 0.0,
         key=None, public_dataset: str | None = None,
         public_manual_dir: str | None = None, public_size: int | None = None,
         train_size: int | None = None, path: str | None = None,
         num_classes: int | None = None, test_fraction: float = 0.1,
         features: str | None = None) -> DataSplits:
  """Loads a dataset by name (see :data:`DATASETS`); never downloads.

  Public data, never trained on privately and never charged to the
  accountant, comes from one of two places: with ``public_fraction > 0`` a
  random slice of the training set (removed from the private set, see
  :func:`split_public`); with ``public_dataset`` the training split of
  another dataset with the same image shape (e.g. Fashion-MNIST for MNIST).
  ``public_size`` keeps that many public examples (random, from the indices
  alone). ``train_size`` keeps a random subset of the private training set
  (for small experiments; N is then ``train_size``). The random choices
  come from ``key``, the run's public data stream
  (``keys.public_root(config.seed, keys.DATA)``).

  ``name='arrays'`` reads the ``.npz`` file ``path`` (images, labels and
  optionally a test split; :mod:`dpjax.data.arrays`), with ``num_classes``
  (None: largest label + 1) and ``test_fraction`` (held out, by ``key``,
  when the file has no test split). ``tfds_data_dir`` is the cache of
  prepared datasets (:func:`cache_root` decides the default).

  ``features='scatternet'`` replaces every split's images by their
  scattering transform, computed once per split and cached under
  ``tfds_data_dir`` (:mod:`dpjax.data.features`), before any public split or
  subset is taken, so every slice of a dataset shares one cache file.
  """
  rng = None if key is None else keys_lib.host_rng(key)
  splits = features_lib.featurize(
      _load_one(name, manual_dir, tfds_data_dir, path=path,
                num_classes=num_classes, test_fraction=test_fraction, rng=rng),
      features, tfds_data_dir)
  if public_dataset is not None:
    if public_fraction:
      raise ValueError(
          f'set either data.public_fraction ({public_fraction}) or'
          f' data.public_dataset ({public_dataset!r}), not both.')
    if public_dataset == name:
      raise ValueError(
          f'data.public_dataset={public_dataset!r} is the private dataset'
          ' itself; hold out a slice with data.public_fraction instead.')
    public_splits = _load_one(public_dataset, public_manual_dir,
                              tfds_data_dir)
    public = features_lib.featurize_dataset(
        public_splits.train, f'{public_splits.name}-train', features,
        tfds_data_dir)
    if public.images.shape[1:] != splits.train.images.shape[1:]:
      raise ValueError(
          f'public dataset {public_dataset!r} has images of shape'
          f' {public.images.shape[1:]} but {name!r} has'
          f' {splits.train.images.shape[1:]}; they must match.')
    splits = splits._replace(public=public, source=dict(
        splits.source or {}, public=public_splits.source))
  else:
    splits = split_public(splits, public_fraction, rng)
  if public_size is not None:
    if splits.public is None:
      raise ValueError(
          'data.public_size is set but there is no public data; set'
          ' data.public_fraction or data.public_dataset.')
    splits = splits._replace(public=random_subset(splits.public, public_size,
                                                  rng))
  if train_size is not None:
    splits = subsample_train(splits, train_size, rng)
  return splits
