"""scikit-learn's bundled 8x8 handwritten digits: a dataset with no download.

1797 images (Alpaydin & Kaynak 1998, UCI "Optical Recognition of Handwritten
Digits", test part), pixel values 0..16. A fixed seeded split keeps 20% aside
as the held-out test set.
"""

from __future__ import annotations

import numpy as np
from sklearn import datasets as sk_datasets

from dpjax.data import base


def load(test_fraction: float = 0.2, split_seed: int = 0) -> base.DataSplits:
  """Digits as [N, 8, 8, 1] float32 images in [0, 1] and int32 labels.

  The train/test split is part of the dataset's definition (like MNIST's
  fixed test set), the same in every run: ``split_seed`` is not a run's
  randomness and never touches the key schedule.
  """
  if not 0 < test_fraction < 1:
    raise ValueError(
        f'test_fraction must lie in (0, 1), got {test_fraction!r}.')
  digits = sk_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(split_seed).permutation(len(labels))
  num_test = int(round(test_fraction * len(labels)))
  test, train = order[:num_test], order[num_test:]
  return base.DataSplits(
      name='digits',
      train=base.ArrayDataset(images[train], labels[train]),
      test=base.ArrayDataset(images[test], labels[test]),
      num_classes=10)
