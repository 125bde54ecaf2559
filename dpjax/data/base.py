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
  """A private training split and a held-out test split."""

  name: str
  train: ArrayDataset
  test: ArrayDataset
  num_classes: int


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
