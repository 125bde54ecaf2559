"""Fixed feature maps of a dataset's images, computed once and cached.

``config.data.features = 'scatternet'`` replaces every split's images by their
scattering transform (:func:`dpjax.scatternet.scattering`, J = 2, L = 8,
order 2: 81 channels per input channel at 1/4 resolution), the input of
Tramer & Boneh 2021's ScatterNet models (``scatter_linear``,
``scatter_cnn``). The map is fixed and acts on one image at a time, so it
costs no privacy (see :mod:`dpjax.scatternet`).

Features are computed once per split, with a progress bar, and cached beside
the prepared datasets: ``<cache root>/dpjax_features/``, where
:func:`dpjax.data.base.cache_root` decides the root (``config.data.
tfds_data_dir``, else ``$DPJAX_CACHE_DIR``, else ``<workdir>/data_cache``). A
cache file is keyed on the SHA-256 of the split's images (after dpjax's
standardization) and on the transform's settings, so new data or settings
never read stale features. Features are stored as float16 (half the memory of
float32: CIFAR-10's training set is 1.6 GB instead of 3.1 GB; relative
rounding 5e-4) and read memory-mapped; the models compute in float32.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import NamedTuple

import jax
import numpy as np
import tqdm

from dpjax import scatternet
from dpjax.data import base

CACHE_SUBDIR = 'dpjax_features'
# Bump when the transform's numerics change: old cache files stop matching.
CACHE_VERSION = 1
DTYPE = np.float16


class ScatterSettings(NamedTuple):
  """The transform's settings; part of every cache key."""

  J: int = 2
  L: int = 8
  order: int = 2

  def tag(self) -> str:
    return f'scatternet-J{self.J}-L{self.L}-o{self.order}-v{CACHE_VERSION}'


FEATURES: dict[str, ScatterSettings] = {'scatternet': ScatterSettings()}


def check_features(features: str | None) -> None:
  """Refuses an unknown ``config.data.features`` value, naming the known ones."""
  if features is not None and features not in FEATURES:
    raise ValueError(
        f'data.features must be None (raw images) or one of'
        f' {sorted(FEATURES)}, got {features!r}.')


def cache_dir(tfds_data_dir: str | None = None) -> str:
  """Where features are cached: ``dpjax_features`` under the cache root."""
  return os.path.join(base.cache_root(tfds_data_dir), CACHE_SUBDIR)


def checksum(images: np.ndarray) -> str:
  """SHA-256 of an image array's shape, dtype and bytes."""
  digest = hashlib.sha256(f'{images.shape}{images.dtype}'.encode())
  flat = np.ascontiguousarray(images).reshape(-1).view(np.uint8)
  step = 1 << 26
  for start in range(0, flat.size, step):
    digest.update(flat[start:start + step])
  return digest.hexdigest()


def compute(images: np.ndarray, settings: ScatterSettings = ScatterSettings(),
            *, batch_size: int = 256, desc: str = 'ScatterNet',
            progress: bool = True) -> np.ndarray:
  """Scattering features [N, H', W', K C] (float16) of images [N, H, W, C].

  One compiled transform for every chunk (the last is zero-padded).
  """
  n = len(images)
  transform = jax.jit(lambda x: scatternet.scattering(x, *settings))
  size = max(1, min(batch_size, n))
  h, w, c = images.shape[1:]
  shape = (scatternet.output_size(h, settings.J),
           scatternet.output_size(w, settings.J),
           c * scatternet.num_channels(*settings))
  out = np.empty((n,) + shape, DTYPE)
  with tqdm.tqdm(total=n, desc=desc, unit='img', disable=not progress,
                 leave=False) as bar:
    for start in range(0, n, size):
      chunk = images[start:start + size]
      real = len(chunk)
      if real < size:
        chunk = np.concatenate(
            [chunk, np.zeros((size - real,) + chunk.shape[1:], chunk.dtype)])
      out[start:start + real] = np.asarray(transform(chunk))[:real]
      bar.update(real)
  return out


def cached(images: np.ndarray, name: str, settings: ScatterSettings,
           directory: str, progress: bool = True) -> np.ndarray:
  """The features of ``images``, read from ``directory`` or computed there.

  The file name carries ``name`` (for people), the settings and the images'
  checksum (for correctness); it is written atomically.
  """
  path = os.path.join(directory,
                      f'{name}-{settings.tag()}-{checksum(images)[:20]}.npy')
  if os.path.exists(path):
    return np.load(path, mmap_mode='r')
  features = compute(images, settings, desc=f'ScatterNet {name}',
                     progress=progress)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.npy.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.save(f, features)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide it from others
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return np.load(path, mmap_mode='r')


def featurize_dataset(ds: base.ArrayDataset, name: str, features: str | None,
                      tfds_data_dir: str | None = None,
                      progress: bool = True) -> base.ArrayDataset:
  """``ds`` with its images replaced by ``features`` (cached as ``name``);
  None leaves it as it is."""
  check_features(features)
  if features is None:
    return ds
  return base.ArrayDataset(
      cached(ds.images, name, FEATURES[features], cache_dir(tfds_data_dir),
             progress), ds.labels)


def featurize(splits: base.DataSplits, features: str | None,
              tfds_data_dir: str | None = None,
              progress: bool = True) -> base.DataSplits:
  """``splits`` with every split's images replaced by ``features`` (cached).

  None leaves the images as they are.
  """
  check_features(features)
  if features is None:
    return splits

  def convert(ds: base.ArrayDataset | None, split: str):
    if ds is None:
      return None
    return featurize_dataset(ds, f'{splits.name}-{split}', features,
                             tfds_data_dir, progress)

  source = dict(splits.source or {}, features={
      'transform': FEATURES[features].tag(),
      'cache_dir': cache_dir(tfds_data_dir)})
  return splits._replace(train=convert(splits.train, 'train'),
                         test=convert(splits.test, 'test'),
                         public=convert(splits.public, 'public'),
                         source=source)
