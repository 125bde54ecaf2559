"""In-memory datasets as the training loop consumes them, and where the
prepared copies of datasets read from files are kept."""

from __future__ import annotations

import hashlib
import os
from typing import Any, NamedTuple

import numpy as np

CACHE_DIR_ENV = 'DPJAX_CACHE_DIR'


class ArrayDataset(NamedTuple):
  """Inputs and integer labels, one per example.

  ``images``: float images [N, H, W, C], or integer token sequences [N, T]
  (:func:`input_field` names them ``'tokens'`` in the examples a step
  sees). ``labels``: [N], or [N, T] for a label per token (next tokens).
  """

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


class DataSplits(NamedTuple):
  """A private training split, a held-out test split, an optional public one.

  ``public`` holds examples that are NOT private: DP-SGD never trains on them
  and no accountant charges for them, so they may set data-dependent things
  (BatchNorm statistics, layerwise clip thresholds). ``train`` never contains
  them, so N = len(train) is the private dataset size.
  """

  name: str
  train: ArrayDataset
  test: ArrayDataset
  num_classes: int
  public: ArrayDataset | None = None
  # Where the data came from (files read, their SHA-256, the cache), for
  # summary.json; None for data built in memory.
  source: dict[str, Any] | None = None


def split_public(splits: DataSplits, public_fraction: float,
                 rng: np.random.Generator | None = None) -> DataSplits:
  """Moves a random ``public_fraction`` of ``train`` to ``public``.

  The held-out slice is chosen from the indices alone (never from the data)
  with ``rng`` (the run's public data stream, :mod:`dpjax.keys`), and
  removed from the private set, so the private N shrinks accordingly.
  """
  if public_fraction == 0:
    return splits
  if not 0 < public_fraction < 1:
    raise ValueError(
        f'public_fraction must lie in [0, 1), got {public_fraction!r}.')
  n = len(splits.train)
  num_public = int(round(public_fraction * n))
  if not 0 < num_public < n:
    raise ValueError(
        f'public_fraction={public_fraction} of {n} examples leaves an empty'
        ' public or private split.')
  order = require_rng(rng).permutation(n)
  public, private = np.sort(order[:num_public]), np.sort(order[num_public:])
  take = lambda ds, i: ArrayDataset(ds.images[i], ds.labels[i])
  return splits._replace(train=take(splits.train, private),
                         public=take(splits.train, public))


def require_rng(rng: np.random.Generator | None) -> np.random.Generator:
  if rng is None:
    raise ValueError(
        'a random split or subset needs rng= (e.g. keys.host_rng('
        'keys.public_root(seed, keys.DATA))): no module picks its own seed.')
  return rng


def random_subset(ds: ArrayDataset, size: int,
                  rng: np.random.Generator | None = None) -> ArrayDataset:
  """``size`` random examples of ``ds``, chosen by index with ``rng``, in
  their original order."""
  n = len(ds)
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
      not 0 < size <= n):
    raise ValueError(
        f'a subset size must be an integer in [1, {n}] (the examples'
        f' available), got {size!r}.')
  keep = np.sort(require_rng(rng).permutation(n)[:size])
  return ArrayDataset(ds.images[keep], ds.labels[keep])


def subsample_train(splits: DataSplits, size: int,
                    rng: np.random.Generator | None = None) -> DataSplits:
  """Keeps ``size`` random examples of ``train``, chosen by index with ``rng``."""
  return splits._replace(train=random_subset(splits.train, size, rng))


def eval_subset(ds: ArrayDataset, size: int | None,
                rng: np.random.Generator | None = None) -> ArrayDataset:
  """``size`` random examples of a test split (all of it for None or a size
  >= its length), chosen with ``rng`` (the run's evaluation stream,
  ``keys.EVAL``): public, as the test split is.

  Examples:
    >>> ds = ArrayDataset(np.zeros((10, 1, 1, 1)), np.arange(10))
    >>> from dpjax import keys
    >>> rng = keys.host_rng(keys.public_root(0, keys.EVAL))
    >>> len(eval_subset(ds, 4, rng)), len(eval_subset(ds, None))
    (4, 10)
  """
  if size is None or size >= len(ds):
    return ds
  return random_subset(ds, size, rng)


def input_field(inputs) -> str:
  """An example's input field: 'tokens' for integer sequences, else 'image'.

  The one place that names it; ``inputs`` is anything with a ``dtype``.
  """
  return 'tokens' if np.issubdtype(inputs.dtype, np.integer) else 'image'


def check_dataset(ds: ArrayDataset, where: str) -> None:
  """Refuses data of the wrong structure (never describing its values)."""
  if ds.images.shape[0] != ds.labels.shape[0]:
    raise ValueError(
        f'{where}: {ds.images.shape[0]} images but {ds.labels.shape[0]}'
        ' labels; they must match one to one.')
  if input_field(ds.images) == 'tokens':
    if ds.images.ndim != 2 or ds.labels.ndim not in (1, 2) or (
        ds.labels.ndim == 2 and ds.labels.shape != ds.images.shape):
      raise ValueError(
          f'{where}: integer data must be tokens [N, T] with labels [N] or'
          f' [N, T] (images must be floating [N, H, W, C]), got'
          f' {ds.images.shape} and {ds.labels.shape}.')
  elif ds.images.ndim != 4:
    raise ValueError(
        f'{where}: images must have shape [N, H, W, C], got'
        f' {ds.images.shape}.')


def out_of_domain(ds: ArrayDataset, num_classes: int, max_abs: float,
                  chunk: int = 1024) -> dict[str, int]:
  """How many records have a bad image or label: counts only, no values.

  An image is out of its domain if any value is non-finite or beyond
  ``max_abs``; a label if it lies outside ``[0, num_classes)``.
  """
  bad_images = 0
  # In row chunks: a memory-mapped feature cache is never copied whole; in
  # at least float32, where max_abs is finite (float16 tops out at 65504).
  dtype = np.promote_types(ds.images.dtype, np.float32)
  for start in range(0, len(ds.images), chunk):
    flat = np.asarray(ds.images[start:start + chunk], dtype).reshape(
        -1, int(np.prod(ds.images.shape[1:])))
    with np.errstate(invalid='ignore'):
      bad_images += int((~np.all(np.isfinite(flat) & (np.abs(flat) <= max_abs),
                                 axis=1)).sum())
  labels = np.asarray(ds.labels).reshape(len(ds.labels), -1)
  bad_label = ((labels < 0) | (labels >= num_classes)).any(1)
  return {'image': bad_images, 'label': int(bad_label.sum())}


def file_record(path: str) -> dict[str, Any]:
  """``{'path', 'bytes', 'sha256'}`` of one raw file."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return {'path': os.path.abspath(path), 'bytes': os.path.getsize(path),
          'sha256': h.hexdigest()}


def cache_root(data_dir: str | None = None,
               workdir: str | None = None) -> str:
  """Where prepared datasets are kept: the one place that decides.

  ``data_dir`` (config.data.tfds_data_dir) if given, else
  ``$DPJAX_CACHE_DIR``, else ``<workdir>/data_cache``, else
  ``~/.cache/dpjax``. Never tfds' default ``~/tensorflow_datasets``.
  """
  if data_dir:
    return os.path.expanduser(data_dir)
  if os.environ.get(CACHE_DIR_ENV):
    return os.path.expanduser(os.environ[CACHE_DIR_ENV])
  if workdir:
    return os.path.join(workdir, 'data_cache')
  return os.path.join(os.path.expanduser('~'), '.cache', 'dpjax')
