"""In-memory datasets as the training loop consumes them."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ArrayDataset(NamedTuple):
  """Images [N, H, W, C] float32 and integer labels [N]."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


class DataSplits(NamedTuple):
  """A private training split, a held-out test split, an optional public one.

  ``public`` holds examples that are NOT private: DP-SGD never trains on them
  and no accountant charges for them, so they may set data-dependent things
  (BatchNorm statistics, layerwise clip thresholds). ``train`` never contains
  them, so N = len(train) is the private dataset size.
  """

  name: str
  train: ArrayDataset
  test: ArrayDataset
  num_classes: int
  public: ArrayDataset | None = None


def split_public(splits: DataSplits, public_fraction: float,
                 seed: int = 0) -> DataSplits:
  """Moves a seeded random ``public_fraction`` of ``train`` to ``public``.

  The held-out slice is chosen from the indices alone (never from the data),
  and removed from the private set, so the private N shrinks accordingly.
  """
  if public_fraction == 0:
    return splits
  if not 0 < public_fraction < 1:
    raise ValueError(
        f'public_fraction must lie in [0, 1), got {public_fraction!r}.')
  n = len(splits.train)
  num_public = int(round(public_fraction * n))
  if not 0 < num_public < n:
    raise ValueError(
        f'public_fraction={public_fraction} of {n} examples leaves an empty'
        ' public or private split.')
  order = np.random.default_rng(seed).permutation(n)
  public, private = np.sort(order[:num_public]), np.sort(order[num_public:])
  take = lambda ds, i: ArrayDataset(ds.images[i], ds.labels[i])
  return splits._replace(train=take(splits.train, private),
                         public=take(splits.train, public))


def subsample_train(splits: DataSplits, size: int,
                    seed: int = 0) -> DataSplits:
  """Keeps a seeded random ``size`` examples of ``train`` (chosen by index)."""
  n = len(splits.train)
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
      not 0 < size <= n):
    raise ValueError(
        f'a subset size must be an integer in [1, {n}] (the examples'
        f' available), got {size!r}.')
  keep = np.sort(np.random.default_rng(seed).permutation(n)[:size])
  return splits._replace(train=ArrayDataset(splits.train.images[keep],
                                            splits.train.labels[keep]))


def eval_subset(ds: ArrayDataset, size: int | None,
                seed: int = 0) -> ArrayDataset:
  """A seeded random ``size`` examples of ``ds`` (all of it for None or a
  size >= its length), in their original order.

  Examples:
    >>> ds = ArrayDataset(np.zeros((10, 1, 1, 1)), np.arange(10))
    >>> len(eval_subset(ds, 4)), len(eval_subset(ds, None))
    (4, 10)
  """
  if size is None or size >= len(ds):
    return ds
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
      size < 1):
    raise ValueError(
        f'eval_size must be a positive integer (or None: the whole test'
        f' set), got {size!r}.')
  keep = np.sort(np.random.default_rng(seed).permutation(len(ds))[:size])
  return ArrayDataset(ds.images[keep], ds.labels[keep])


def check_dataset(ds: ArrayDataset, num_classes: int, where: str) -> None:
  """Refuses data a training run would silently mishandle."""
  if ds.images.shape[0] != ds.labels.shape[0]:
    raise ValueError(
        f'{where}: {ds.images.shape[0]} images but {ds.labels.shape[0]}'
        ' labels; they must match one to one.')
  if ds.images.ndim != 4:
    raise ValueError(
        f'{where}: images must have shape [N, H, W, C], got'
        f' {ds.images.shape}.')
  if not np.all(np.isfinite(ds.images)):
    raise ValueError(f'{where}: images contain NaN or Inf values.')
  if ds.labels.size and (ds.labels.min() < 0
                         or ds.labels.max() >= num_classes):
    raise ValueError(
        f'{where}: labels must lie in [0, {num_classes}), got range'
        f' [{ds.labels.min()}, {ds.labels.max()}].')
