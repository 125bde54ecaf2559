"""Datasets: the embedded digits and tfds builders over local raw files."""

from __future__ import annotations

from dpjax.data.base import ArrayDataset
from dpjax.data.base import check_dataset
from dpjax.data.base import DataSplits
from dpjax.data.base import split_public


def load(name: str, *, manual_dir: str | None = None,
         tfds_data_dir: str | None = None, public_fraction: float = 0.0,
         public_seed: int = 0) -> DataSplits:
  """Loads a dataset by name ('digits' or 'mnist'); never downloads.

  With ``public_fraction > 0`` a seeded slice of the training set becomes the
  public split and leaves the private one (see :func:`split_public`).
  """
  if name == 'digits':
    from dpjax.data import digits  # pylint: disable=g-import-not-at-top
    splits = digits.load()
  elif name == 'mnist':
    from dpjax.data import mnist  # pylint: disable=g-import-not-at-top
    splits = mnist.load(manual_dir, tfds_data_dir)
  else:
    raise ValueError(f"Unknown dataset {name!r}; known: 'digits', 'mnist'.")
  return split_public(splits, public_fraction, public_seed)
