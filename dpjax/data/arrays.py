"""Your own data: images and labels in a NumPy ``.npz`` file.

``dpjax-train --config.data.name=arrays --config.data.path=my_data.npz``
trains on the arrays of ``np.savez('my_data.npz', images=..., labels=...)``:

* ``images`` [N, H, W] or [N, H, W, C] and integer ``labels`` [N]: the
  private training set (N is the dataset size of the guarantee);
* optionally ``test_images`` and ``test_labels``, the held-out test set;
  without them a random ``test_fraction`` of the rows (the run's public data stream) is held out, chosen
  from the indices alone (never from the data);
* Keras' names (``x_train``, ``y_train``, ``x_test``, ``y_test``) work too.

uint8 images are scaled to [0, 1]; floating-point images are used as they
are (normalize them first). The number of classes is ``num_classes`` if
given, else the largest label + 1. The file is opened without pickle, so a
file holding Python objects is refused rather than run.
"""

from __future__ import annotations

import os

import numpy as np

from dpjax.data import base

KEYS = {'images': ('images', 'x_train'), 'labels': ('labels', 'y_train'),
        'test_images': ('test_images', 'x_test'),
        'test_labels': ('test_labels', 'y_test')}


def _get(arrays, role: str) -> np.ndarray | None:
  for key in KEYS[role]:
    if key in arrays:
      return arrays[key]
  return None


def _images(x: np.ndarray, path: str, key: str) -> np.ndarray:
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(
        f'{path}: {key} must have shape [N, H, W] or [N, H, W, C], got'
        f' {x.shape}; reshape flat rows to images first.')
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(
        f'{path}: {key} must be uint8 (scaled to [0, 1] here) or floating'
        f' point (used as is), got {x.dtype}.')
  return x.astype(np.float32)


def _labels(y: np.ndarray, path: str, key: str) -> np.ndarray:
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(
        f'{path}: {key} must be integer class ids of shape [N], got'
        f' {y.dtype} {y.shape}.')
  return y.astype(np.int32)


def load(path: str, *, num_classes: int | None = None,
         test_fraction: float = 0.1,
         rng: np.random.Generator | None = None) -> base.DataSplits:
  """The splits of the ``.npz`` file ``path`` (see the module docstring)."""
  if not path:
    raise ValueError(
        "data.name='arrays' reads a .npz file: set data.path=/path/to/data.npz"
        ' (arrays images, labels, and optionally test_images, test_labels).')
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data.path {path!r} does not exist.')
  try:
    with np.load(path, allow_pickle=False) as arrays:
      names = sorted(arrays.files)
      found = {role: _get(arrays, role) for role in KEYS}
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f'{path} is not a readable .npz of arrays ({e}).') from None
  if found['images'] is None or found['labels'] is None:
    raise ValueError(
        f'{path} holds {names}; it needs images and labels (or x_train and'
        ' y_train), optionally test_images and test_labels (x_test, y_test).')
  if (found['test_images'] is None) != (found['test_labels'] is None):
    raise ValueError(f'{path}: give both test_images and test_labels, or'
                     ' neither (then a test_fraction is held out).')
  train = base.ArrayDataset(_images(found['images'], path, 'images'),
                            _labels(found['labels'], path, 'labels'))
  if found['test_images'] is not None:
    test = base.ArrayDataset(_images(found['test_images'], path, 'test_images'),
                             _labels(found['test_labels'], path,
                                     'test_labels'))
  else:
    train, test = _hold_out(train, test_fraction, rng, path)
  if num_classes is None:
    num_classes = int(max(train.labels.max(initial=0),
                          test.labels.max(initial=0))) + 1
  return base.DataSplits(
      name='arrays', train=train, test=test, num_classes=num_classes,
      source={'files': [base.file_record(path)]})


def _hold_out(train: base.ArrayDataset, test_fraction: float,
              rng: np.random.Generator | None, path: str) -> tuple[base.ArrayDataset, base.ArrayDataset]:
  n = len(train)
  num_test = int(round(test_fraction * n))
  if not 0 < test_fraction < 1 or not 0 < num_test < n:
    raise ValueError(
        f'{path} has no test split, and data.test_fraction={test_fraction!r}'
        f' of {n} rows holds out no test set or every row; use a fraction in'
        ' (0, 1), or add test_images and test_labels to the file.')
  order = base.require_rng(rng).permutation(n)
  test, rest = np.sort(order[:num_test]), np.sort(order[num_test:])
  take = lambda i: base.ArrayDataset(train.images[i], train.labels[i])
  return take(rest), take(test)
