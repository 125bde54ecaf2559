"""MNIST (LeCun, Cortes, Burges) as a dpjax tfds builder over local IDX files."""

from __future__ import annotations

from dpjax.data import base
from dpjax.data import idx_builder

# Published MNIST pixel statistics; fixed constants, not recomputed from the
# private training split.
MEAN, STD = 0.1307, 0.3081


class Mnist(idx_builder.IdxImageBuilder, skip_registration=True):
  """MNIST read from the four IDX files in ``manual_dir``."""

  name = 'dpjax_mnist'
  SUBDIR = 'mnist'
  FILES = {
      'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
      'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
  }
  IMAGE_SHAPE = (28, 28, 1)
  DESCRIPTION = 'MNIST handwritten digits, 60000 train / 10000 test.'
  HOMEPAGE = 'http://yann.lecun.com/exdb/mnist/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place train-images-idx3-ubyte, train-labels-idx1-ubyte,'
      ' t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz) in'
      ' the manual directory.')


def load(manual_dir: str | None = None,
         data_dir: str | None = None) -> base.DataSplits:
  """MNIST standardized with the published mean and std."""
  return idx_builder.load_splits(Mnist, manual_dir, data_dir, MEAN, STD)
