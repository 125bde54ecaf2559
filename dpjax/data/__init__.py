"""Datasets: the embedded digits and tfds builders over local raw files."""

from __future__ import annotations

from dpjax.data.base import ArrayDataset
from dpjax.data.base import check_dataset
from dpjax.data.base import DataSplits


def load(name: str, *, manual_dir: str | None = None,
         tfds_data_dir: str | None = None, **kwargs) -> DataSplits:
  """Loads a dataset by name ('digits' or 'mnist'); never downloads."""
  if name == 'digits':
    from dpjax.data import digits  # pylint: disable=g-import-not-at-top
    return digits.load(**kwargs)
  if name == 'mnist':
    from dpjax.data import mnist  # pylint: disable=g-import-not-at-top
    return mnist.load(manual_dir, tfds_data_dir, **kwargs)
  raise ValueError(f"Unknown dataset {name!r}; known: 'digits', 'mnist'.")
