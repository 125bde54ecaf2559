"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) as a dpjax tfds builder.

The four IDX files of the official release, read from a local directory;
nothing is downloaded.
"""

from __future__ import annotations

from dpjax.data import base
from dpjax.data import idx_builder

# Published Fashion-MNIST pixel statistics (training set, pixels in [0, 1]);
# fixed constants, not recomputed from the private training split.
MEAN, STD = 0.2860, 0.3530


class FashionMnist(idx_builder.IdxImageBuilder, skip_registration=True):
  """Fashion-MNIST read from the four IDX files in ``manual_dir``."""

  name = 'dpjax_fashion_mnist'
  SUBDIR = 'fashion_mnist'
  FILES = {
      'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
      'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
  }
  IMAGE_SHAPE = (28, 28, 1)
  DESCRIPTION = ('Fashion-MNIST: 28x28 grayscale images of 10 kinds of'
                 ' clothing, 60000 train / 10000 test.')
  HOMEPAGE = 'https://github.com/zalandoresearch/fashion-mnist'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place train-images-idx3-ubyte, train-labels-idx1-ubyte,'
      ' t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz) in'
      ' the manual directory.')


def load(manual_dir: str | None = None,
         data_dir: str | None = None) -> base.DataSplits:
  """Fashion-MNIST standardized with the published mean and std."""
  splits = idx_builder.load_splits(FashionMnist, manual_dir, data_dir, MEAN,
                                   STD)
  return splits._replace(name='fashion_mnist')
