"""Datasets: the embedded digits and tfds builders over local raw files."""

from __future__ import annotations

from dpjax.data.base import ArrayDataset
from dpjax.data.base import check_dataset
from dpjax.data.base import DataSplits
from dpjax.data.base import eval_subset
from dpjax.data.base import split_public
from dpjax.data.base import subsample_train
from dpjax.data import features as features_lib

DATASETS: tuple[str, ...] = ('digits', 'mnist', 'fashion_mnist', 'cifar10')


def _load_one(name: str, manual_dir: str | None,
              tfds_data_dir: str | None) -> DataSplits:
  # pylint: disable=g-import-not-at-top
  if name == 'digits':
    from dpjax.data import digits
    return digits.load()
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
         public_seed: int = 0, public_dataset: str | None = None,
         public_manual_dir: str | None = None, public_size: int | None = None,
         train_size: int | None = None,
         features: str | None = None) -> DataSplits:
  """Loads a dataset by name (see :data:`DATASETS`); never downloads.

  Public data, never trained on privately and never charged to the
  accountant, comes from one of two places: with ``public_fraction > 0`` a
  seeded slice of the training set (removed from the private set, see
  :func:`split_public`); with ``public_dataset`` the training split of
  another dataset with the same image shape (e.g. Fashion-MNIST for MNIST).
  ``public_size`` keeps that many public examples (seeded, from the indices
  alone). ``train_size`` keeps a seeded subset of the private training set
  (for small experiments; N is then ``train_size``).

  ``features='scatternet'`` replaces every split's images by their
  scattering transform, computed once per split and cached beside the tfds
  data (:mod:`dpjax.data.features`), before any public split or subset is
  taken, so every slice of a dataset shares one cache file.
  """
  features_lib.check_features(features)
  splits = features_lib.featurize(_load_one(name, manual_dir, tfds_data_dir),
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
    public = _load_one(public_dataset, public_manual_dir, tfds_data_dir)
    public = public.train if features is None else (
        features_lib.featurize_dataset(public.train, f'{public.name}-train',
                                       features, tfds_data_dir))
    if public.images.shape[1:] != splits.train.images.shape[1:]:
      raise ValueError(
          f'public dataset {public_dataset!r} has images of shape'
          f' {public.images.shape[1:]} but {name!r} has'
          f' {splits.train.images.shape[1:]}; they must match.')
    splits = splits._replace(public=public)
  else:
    splits = split_public(splits, public_fraction, public_seed)
  if public_size is not None:
    if splits.public is None:
      raise ValueError(
          'data.public_size is set but there is no public data; set'
          ' data.public_fraction or data.public_dataset.')
    splits = splits._replace(public=subsample_train(
        splits._replace(train=splits.public), public_size,
        public_seed).train)
  if train_size is not None:
    splits = subsample_train(splits, train_size, public_seed)
  return splits
