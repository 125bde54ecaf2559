"""Reading IDX files (the MNIST / Fashion-MNIST container), gzipped or not.

Format (LeCun et al.): two zero bytes, a type code, the number of dimensions,
then each dimension as a big-endian int32, then the data in C order.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

_DTYPES = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}


def read_bytes(path: str) -> bytes:
  """The bytes of ``path``, gunzipped if it ends in .gz; a damaged gzip
  stream is a ValueError naming the file."""
  if not path.endswith('.gz'):
    with open(path, 'rb') as f:
      return f.read()
  try:
    with gzip.open(path, 'rb') as f:
      return f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(
        f'{path} is truncated or corrupt ({e}); replace it with a complete'
        ' copy of the file.') from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """The array stored in an IDX file (``.gz`` files are decompressed)."""
  path = os.fspath(path)
  data = read_bytes(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
    raise ValueError(f'{path} is not an IDX file (bad magic number).')
  dtype, ndim = _DTYPES[data[2]], data[3]
  header = 4 + 4 * ndim
  dims = tuple(int(d) for d in np.frombuffer(data[4:header], '>i4'))
  expected = int(np.prod(dims)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(
        f'{path}: header announces shape {dims} ({expected} bytes of data) but'
        f' the file holds {len(data) - header} bytes; it is truncated or'
        ' corrupt.')
  return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(
      dtype.newbyteorder('='))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes ``array`` as an IDX file (gzipped when ``path`` ends in .gz)."""
  path = os.fspath(path)
  codes = {v.newbyteorder('='): k for k, v in _DTYPES.items()}
  dtype = np.dtype(array.dtype).newbyteorder('=')
  if dtype not in codes:
    raise ValueError(f'IDX cannot store dtype {array.dtype}.')
  code = codes[dtype]
  header = bytes([0, 0, code, array.ndim]) + np.asarray(
      array.shape, '>i4').tobytes()
  body = np.ascontiguousarray(array).astype(_DTYPES[code]).tobytes()
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + body)
