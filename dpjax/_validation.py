"""Input checks shared by dpjax's public constructors.

Each error names the argument, the bad value and what is expected, so a user
can fix a config without reading the source.
"""

from __future__ import annotations

import math
import numbers


def as_real(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f'{name} must be a real number, got {value!r}.')
  value = float(value)
  if math.isnan(value):
    raise ValueError(f'{name} must not be NaN.')
  return value


def positive(name: str, value, hint: str = '') -> float:
  """A finite number > 0."""
  value = as_real(name, value)
  if not (value > 0 and math.isfinite(value)):
    raise ValueError(f'{name} must be a finite number > 0, got {value!r}.{hint}')
  return value


def non_negative(name: str, value, hint: str = '') -> float:
  """A finite number >= 0."""
  value = as_real(name, value)
  if not (value >= 0 and math.isfinite(value)):
    raise ValueError(
        f'{name} must be a finite number >= 0, got {value!r}.{hint}'
    )
  return value


def positive_int(name: str, value, hint: str = '') -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f'{name} must be an integer, got {value!r}.{hint}')
  if value <= 0:
    raise ValueError(f'{name} must be an integer > 0, got {value!r}.{hint}')
  return int(value)


def open_unit(name: str, value, hint: str = '') -> float:
  """A number in the open interval (0, 1)."""
  value = as_real(name, value)
  if not 0 < value < 1:
    raise ValueError(f'{name} must lie in (0, 1), got {value!r}.{hint}')
  return value
