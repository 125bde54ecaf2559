"""CIFAR-10 (Krizhevsky 2009) as a dpjax tfds builder over the python batches.

Reads ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` of the official
``cifar-10-batches-py`` release from a local directory (nothing is
downloaded). The batches are pickles; they are read with an unpickler that
only rebuilds plain containers and numpy arrays, so a tampered file cannot
run code.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np

from dpjax.data import base
from dpjax.data import idx
from dpjax.data import idx_builder

# Published CIFAR-10 per-channel statistics (training set, pixels in [0, 1]);
# fixed constants, not recomputed from the private training split.
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


class UnsafePickleError(pickle.UnpicklingError):
  """A batch file asked to rebuild something other than arrays."""


class _ArraysOnly(pickle.Unpickler):
  """Rebuilds numpy arrays and builtin containers; refuses anything else."""

  _ALLOWED = {
      ('numpy.core.multiarray', '_reconstruct'),
      ('numpy._core.multiarray', '_reconstruct'),
      ('numpy', 'ndarray'),
      ('numpy', 'dtype'),
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise UnsafePickleError(
        f'refusing to load {module}.{name} from a CIFAR-10 batch file.')


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Images [N, 32, 32, 3] uint8 and labels [N] of one python batch file."""
  try:
    batch = _ArraysOnly(io.BytesIO(idx.read_bytes(path)),
                        encoding='bytes').load()
  except UnsafePickleError:
    raise
  except (EOFError, ValueError, pickle.UnpicklingError) as e:
    raise ValueError(f'{path} is not a readable CIFAR-10 python batch ({e});'
                     ' it is truncated or corrupt: replace it with a complete'
                     ' copy.') from None
  if not isinstance(batch, dict) or b'data' not in batch or (
      b'labels' not in batch):
    raise ValueError(f'{path} is not a CIFAR-10 python batch (no data/labels).')
  data = np.asarray(batch[b'data'], np.uint8)
  labels = np.asarray(batch[b'labels'], np.int64)
  if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
    raise ValueError(
        f'{path}: expected data [N, 3072] and N labels, got data'
        f' {data.shape} and {len(labels)} labels.')
  # Rows hold the R, G and B planes of a 32x32 image one after the other.
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class Cifar10(idx_builder.IdxImageBuilder, skip_registration=True):
  """CIFAR-10 read from the python batches in ``manual_dir``."""

  name = 'dpjax_cifar10'
  SUBDIR = os.path.join('cifar10', 'cifar-10-batches-py')
  FILES = {
      'train': tuple(f'data_batch_{i}' for i in range(1, 6)),
      'test': ('test_batch',),
  }
  IMAGE_SHAPE = (32, 32, 3)
  DESCRIPTION = 'CIFAR-10: 32x32 colour images, 10 classes, 50000 / 10000.'
  HOMEPAGE = 'https://www.cs.toronto.edu/~kriz/cifar.html'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place data_batch_1 ... data_batch_5 and test_batch of'
      ' cifar-10-python.tar.gz (the cifar-10-batches-py folder) in the manual'
      ' directory.')

  @classmethod
  def read_raw_file(cls, path: str) -> None:
    read_batch(path)

  def _split_generators(self, dl_manager):
    directory = os.fspath(dl_manager.manual_dir)
    return {
        split: self._generate_examples(
            [idx_builder.find_file(directory, name) for name in names])
        for split, names in self.FILES.items()
    }

  def _generate_examples(self, paths: list[str]):
    for path in paths:
      images, labels = read_batch(path)
      key = os.path.basename(path)
      for i in range(len(labels)):
        yield f'{key}_{i}', {'image': images[i], 'label': int(labels[i])}


def load(manual_dir: str | None = None,
         data_dir: str | None = None) -> base.DataSplits:
  """CIFAR-10 standardized per channel with the published means and stds."""
  splits = idx_builder.load_splits(Cifar10, manual_dir, data_dir, MEAN, STD)
  return splits._replace(name='cifar10')
