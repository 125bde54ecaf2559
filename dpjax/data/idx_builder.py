"""tfds builders for IDX image datasets read from a local directory.

The builders read the raw IDX files from tfds' ``manual_dir`` and write
ArrayRecord shards with ``tfds.features.Tensor`` features, which
``tfds.data_source`` reads back without TensorFlow. Nothing here downloads:
a missing directory or file is a clear error naming the files and where to
put them.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from dpjax.data import base
from dpjax.data import idx

DATA_DIR_ENV = 'DPJAX_DATA_DIR'


class IdxImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: subclasses name their files, image shape and classes."""

  VERSION = tfds.core.Version('1.0.0')
  FILES: ClassVar[dict[str, tuple[str, str]]]  # split -> (images, labels)
  IMAGE_SHAPE: ClassVar[tuple[int, int, int]]
  NUM_CLASSES: ClassVar[int] = 10
  DESCRIPTION: ClassVar[str] = ''
  HOMEPAGE: ClassVar[str] = ''

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(
                shape=self.IMAGE_SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    directory = os.fspath(dl_manager.manual_dir)
    return {
        split: self._generate_examples(
            find_file(directory, images), find_file(directory, labels))
        for split, (images, labels) in self.FILES.items()
    }

  def _generate_examples(self, images_path: str, labels_path: str):
    images = idx.read_idx(images_path)
    labels = idx.read_idx(labels_path)
    if images.shape[0] != labels.shape[0]:
      raise ValueError(
          f'{images_path} holds {images.shape[0]} images but {labels_path}'
          f' holds {labels.shape[0]} labels.')
    images = images.reshape((-1,) + self.IMAGE_SHAPE)
    for i in range(images.shape[0]):
      yield i, {'image': images[i], 'label': int(labels[i])}


def find_file(directory: str, name: str) -> str:
  """``name`` or ``name.gz`` inside ``directory``."""
  for candidate in (name, name + '.gz'):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f'{name}(.gz) not found in {directory}.')


def check_manual_dir(builder_cls: type[IdxImageBuilder],
                     manual_dir: str | None) -> str:
  """The directory holding the builder's raw files, or a clear error."""
  names = [n for pair in builder_cls.FILES.values() for n in pair]
  howto = (
      f'Put the files {names} (each may be gzipped, .gz) in one directory and'
      f' pass it as config.data.manual_dir, or set {DATA_DIR_ENV} to a folder'
      f' holding a "{builder_cls.SUBDIR}" subfolder with them.')
  if manual_dir is None:
    root = os.environ.get(DATA_DIR_ENV)
    if root is None:
      raise FileNotFoundError(
          f'No data directory given for {builder_cls.name}. {howto}')
    manual_dir = os.path.join(root, builder_cls.SUBDIR)
  manual_dir = os.path.expanduser(manual_dir)
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(
        f'Data directory {manual_dir!r} does not exist. {howto}')
  missing = []
  for name in names:
    try:
      find_file(manual_dir, name)
    except FileNotFoundError:
      missing.append(name)
  if missing:
    raise FileNotFoundError(
        f'Data directory {manual_dir!r} lacks {missing}. {howto}')
  return manual_dir


def load_arrays(
    builder_cls: type[IdxImageBuilder],
    manual_dir: str | None,
    data_dir: str | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Prepares the dataset once (offline) and returns split -> (images, labels).

  Args:
    builder_cls: the builder class (e.g. :class:`dpjax.data.mnist.Mnist`).
    manual_dir: directory with the raw files (None: ``$DPJAX_DATA_DIR/SUBDIR``).
    data_dir: where tfds keeps the prepared ArrayRecord files (None: tfds'
      default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
  """
  manual_dir = check_manual_dir(builder_cls, manual_dir)
  builder = builder_cls(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, try_download_gcs=False))
  sources = builder.as_data_source()
  out = {}
  for split in builder_cls.FILES:
    source = sources[split]
    records = source.__getitems__(range(len(source)))
    images = np.stack([r['image'] for r in records])
    labels = np.asarray([r['label'] for r in records], np.int32)
    out[split] = (images, labels)
  return out


def load_splits(
    builder_cls: type[IdxImageBuilder],
    manual_dir: str | None,
    data_dir: str | None,
    mean: float,
    std: float,
) -> base.DataSplits:
  """Train/test splits as float32 images standardized by public constants."""
  arrays = load_arrays(builder_cls, manual_dir, data_dir)

  def standardize(images):
    return ((images.astype(np.float32) / 255.0) - mean) / std

  return base.DataSplits(
      name=builder_cls.name,
      train=base.ArrayDataset(standardize(arrays['train'][0]),
                              arrays['train'][1]),
      test=base.ArrayDataset(standardize(arrays['test'][0]),
                             arrays['test'][1]),
      num_classes=builder_cls.NUM_CLASSES)
