"""tfds builders for IDX image datasets read from a local directory.

The builders read the raw IDX files from tfds' ``manual_dir`` and write
ArrayRecord shards with ``tfds.features.Tensor`` features, which
``tfds.data_source`` reads back without TensorFlow. Nothing here downloads:
a missing directory or file is a clear error naming the files and where to
put them.

The prepared copy (the cache) is keyed on the SHA-256 of the raw files: a
changed file is read again instead of a stale copy being used, and a
truncated or corrupt one is refused, naming it. The cache lives in the
directory given, else ``$DPJAX_CACHE_DIR``, else the run's workdir
(``<workdir>/data_cache``), else ``~/.cache/dpjax``; every load says where,
and the run's summary names the files it was made from (:class:`DataSource`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any, ClassVar, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from dpjax.data import base
from dpjax.data import idx

DATA_DIR_ENV = 'DPJAX_DATA_DIR'
CACHE_DIR_ENV = base.CACHE_DIR_ENV
cache_root = base.cache_root
file_record = base.file_record


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

  @classmethod
  def read_raw_file(cls, path: str) -> None:
    """Reads one raw file; a truncated or corrupt one is a ValueError."""
    idx.read_idx(path)

  # tfds announces "Downloading and preparing dataset ..." and "downloaded
  # and prepared to ..."; nothing is downloaded here, and load_splits says
  # what it reads and where the cache is.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

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


def _has(directory: str, name: str) -> bool:
  try:
    find_file(directory, name)
  except FileNotFoundError:
    return False
  return True


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
  # The release's own folder (cifar-10-batches-py) inside the one given.
  inner = os.path.join(manual_dir, os.path.basename(builder_cls.SUBDIR))
  if inner != manual_dir and os.path.isdir(inner) and not _has(
      manual_dir, names[0]):
    manual_dir = inner
  missing = [name for name in names if not _has(manual_dir, name)]
  if missing:
    raise FileNotFoundError(
        f'Data directory {manual_dir!r} lacks {missing}. {howto}')
  return manual_dir


def manual_files(builder_cls: type[IdxImageBuilder],
                 manual_dir: str) -> list[str]:
  """The paths of the builder's raw files in ``manual_dir``, in FILES order."""
  return [find_file(manual_dir, name)
          for names in builder_cls.FILES.values() for name in names]


class DataSource(NamedTuple):
  """Where a dataset came from: the raw files read and the prepared cache."""

  manual_dir: str
  files: tuple[dict[str, Any], ...]
  cache_dir: str

  def to_json(self) -> dict[str, Any]:
    return {'manual_dir': self.manual_dir, 'files': list(self.files),
            'cache_dir': self.cache_dir}


def _say(message: str) -> None:
  print(f'dpjax: {message}', file=sys.stderr, flush=True)


def prepare(builder_cls: type[IdxImageBuilder], manual_dir: str | None,
            data_dir: str | None = None):
  """``(builder, DataSource)``: the dataset prepared from its raw files.

  The cache directory is ``cache_root(data_dir)/<name>-<digest>``, the digest
  covering the builder's version and every raw file's name and SHA-256, so
  a cache is only ever used with the files it was made from.
  """
  manual_dir = check_manual_dir(builder_cls, manual_dir)
  records = tuple(file_record(p) for p in manual_files(builder_cls,
                                                       manual_dir))
  digest = hashlib.sha256(str(builder_cls.VERSION).encode())
  for record in records:
    digest.update(os.path.basename(record['path']).encode())
    digest.update(record['sha256'].encode())
  directory = os.path.join(cache_root(data_dir),
                           f'{builder_cls.name}-{digest.hexdigest()[:16]}')
  builder = builder_cls(data_dir=directory, file_format='array_record')
  what = (f'{len(records)} files in {manual_dir} (sha256'
          f' {digest.hexdigest()[:16]})')
  if os.path.isfile(os.path.join(builder.data_dir, 'dataset_info.json')):
    _say(f'{builder_cls.name}: the cache {directory}, made from {what}.')
  else:
    _say(f'{builder_cls.name}: preparing the cache {directory} from {what};'
         ' runs with the same files reuse it.')
    for record in records:  # a damaged file is refused before tfds starts
      builder_cls.read_raw_file(record['path'])
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=False))
  return builder, DataSource(os.path.abspath(manual_dir), records, directory)


def read_prepared(builder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """split -> (images uint8, labels int32) of a prepared builder."""
  sources = builder.as_data_source()
  out = {}
  for split in type(builder).FILES:
    source = sources[split]
    records = source.__getitems__(range(len(source)))
    images = np.stack([r['image'] for r in records])
    labels = np.asarray([r['label'] for r in records], np.int32)
    out[split] = (images, labels)
  return out


def load_arrays(
    builder_cls: type[IdxImageBuilder],
    manual_dir: str | None,
    data_dir: str | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Prepares the dataset once (offline) and returns split -> (images, labels).

  Args:
    builder_cls: the builder class (e.g. :class:`dpjax.data.mnist.Mnist`).
    manual_dir: directory with the raw files (None: ``$DPJAX_DATA_DIR/SUBDIR``).
    data_dir: the cache root (see :func:`cache_root`).
  """
  return read_prepared(prepare(builder_cls, manual_dir, data_dir)[0])


def load_splits(
    builder_cls: type[IdxImageBuilder],
    manual_dir: str | None,
    data_dir: str | None,
    mean: float,
    std: float,
) -> base.DataSplits:
  """Train/test splits as float32 images standardized by public constants."""
  builder, source = prepare(builder_cls, manual_dir, data_dir)
  arrays = read_prepared(builder)

  def standardize(images):
    return ((images.astype(np.float32) / 255.0) - mean) / std

  return base.DataSplits(
      name=builder_cls.name,
      train=base.ArrayDataset(standardize(arrays['train'][0]),
                              arrays['train'][1]),
      test=base.ArrayDataset(standardize(arrays['test'][0]),
                             arrays['test'][1]),
      num_classes=builder_cls.NUM_CLASSES, source=source.to_json())
