"""Clear errors for bad input at the boundary: config fields and datasets.

A DP run with a silently ignored setting is a run with another guarantee than
the one its user asked for. This module refuses, before anything is written:

* command-line overrides of fields that do not exist (``--config.privacy.foo``
  used to die with ``AttributeError: "'foo'"``): the error names the field and
  lists the fields its section has;
* out-of-range settings of the scale features (devices, physical batches,
  checkpoints, parameter averaging, augmentation multiplicity);
* datasets a run would mishandle: NaN/Inf or absurdly large pixel values,
  labels outside the class range, shapes that disagree between splits.

(A workdir that holds checkpoints of a run with other privacy settings is
refused by :mod:`dpjax.checkpoint`.)

Privacy invariant supported (DESIGN.md, 1): huge inputs are clipped safely
anyway; refusing them at the boundary keeps such a run from training on zeroed
gradients without the user knowing.
"""

from __future__ import annotations

import difflib
import importlib.util
import numbers
from typing import Any, Sequence

import ml_collections
import numpy as np

from dpjax import augmult as augmult_lib
from dpjax import data as data_lib
from dpjax import scatternet

# Inputs beyond this magnitude are not normalized images: their gradients
# overflow float32 norms, and clipping would silently zero them.
MAX_ABS_INPUT = 1e6


class ConfigError(ValueError):
  """A config field is unknown or holds a bad value."""


def _override_paths(argv: Sequence[str], flag: str = 'config') -> list[str]:
  """The dotted field paths of ``--config.a.b=v`` style arguments."""
  paths = []
  for arg in argv:
    for prefix in (f'--{flag}.', f'-{flag}.', f'--no{flag}.'):
      if arg.startswith(prefix):
        paths.append(arg[len(prefix):].split('=', 1)[0])
        break
  return paths


def check_field_path(config: ml_collections.ConfigDict, path: str) -> None:
  """Raises :class:`ConfigError` unless ``config`` has the field ``path``.

  Examples:
    >>> import ml_collections
    >>> from dpjax import config_validation
    >>> config = ml_collections.ConfigDict(
    ...     {'privacy': {'clip_norm': 1.0, 'delta': 1e-5}})
    >>> config_validation.check_field_path(config, 'privacy.clipnorm')
    Traceback (most recent call last):
      ...
    dpjax.config_validation.ConfigError: unknown config field \
'privacy.clipnorm': config.privacy has no field 'clipnorm' (did you mean \
'clip_norm'?). Fields of config.privacy: clip_norm, delta.
  """
  node: Any = config
  parts = path.split('.')
  for i, part in enumerate(parts):
    section = '.'.join(['config'] + parts[:i])
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(
          f'unknown config field {path!r}: {section} is a value, not a'
          ' section.')
    if part not in node:
      known = sorted(node.keys())
      close = difflib.get_close_matches(part, known, n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      raise ConfigError(
          f'unknown config field {path!r}: {section} has no field'
          f' {part!r}{hint}. Fields of {section}: {", ".join(known)}.')
    node = node[part]


def check_overrides(config: ml_collections.ConfigDict,
                    argv: Sequence[str]) -> None:
  """Checks every ``--config.<path>=...`` in ``argv`` names a field."""
  for path in _override_paths(argv):
    check_field_path(config, path)


def load_config(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of the config file ``path`` (``file.py[:argument]``)."""
  file, *arg = path.split(':', 1)
  spec = importlib.util.spec_from_file_location('dpjax_checked_config', file)
  if spec is None or spec.loader is None:
    raise ConfigError(f'cannot load the config file {file!r}.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)


def _int(name: str, value, minimum: int, hint: str = '') -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < minimum):
    raise ConfigError(
        f'{name} must be an integer >= {minimum}, got {value!r}.{hint}')
  return int(value)


def _section(config: ml_collections.ConfigDict, name: str):
  return config[name] if name in config else ml_collections.ConfigDict()


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the scale features' settings; a :class:`ConfigError` names any bad one.

  Sections: ``perf`` (num_devices, physical_batch_size,
  checkpoint_every_steps), ``averaging`` (ema_decay, polyak,
  polyak_start_step), ``augmult`` (num_views, augmentations), ``eval_size``,
  and ``data.features`` (known, and set for the scattering models).
  """
  perf = _section(config, 'perf')
  if perf.get('num_devices') is not None:
    _int('perf.num_devices', perf.num_devices, 0, ' 0 uses every device.')
  if perf.get('physical_batch_size') is not None:
    _int('perf.physical_batch_size', perf.physical_batch_size, 1)
    if perf.get('microbatch_size') is not None and (
        perf.microbatch_size > perf.physical_batch_size):
      raise ConfigError(
          f'perf.microbatch_size={perf.microbatch_size} exceeds'
          f' perf.physical_batch_size={perf.physical_batch_size}; a'
          ' microbatch is a piece of a physical batch.')
  if perf.get('checkpoint_every_steps') is not None:
    _int('perf.checkpoint_every_steps', perf.checkpoint_every_steps, 0,
         ' 0 disables checkpoints; None checkpoints at every evaluation.')

  avg = _section(config, 'averaging')
  decay = avg.get('ema_decay')
  if decay is not None and (isinstance(decay, bool) or not isinstance(
      decay, numbers.Real) or not 0 <= decay < 1):
    raise ConfigError(
        f'averaging.ema_decay must lie in [0, 1) or be None (no EMA), got'
        f' {decay!r}. Typical: 0.999.')
  if avg.get('polyak_start_step') is not None:
    _int('averaging.polyak_start_step', avg.polyak_start_step, 0)

  if config.get('eval_size') is not None:
    _int('eval_size', config.eval_size, 1,
         ' None evaluates on the whole test set every time.')
  _check_features(config)

  aug = _section(config, 'augmult')
  if aug.get('num_views') is not None:
    views = _int('augmult.num_views', aug.num_views, 0,
                 ' 0 turns augmentation off; K >= 1 averages K views.')
    if views:
      try:
        augmult_lib.get_augmentation(tuple(aug.augmentations))
      except ValueError as e:
        raise ConfigError(f'augmult.augmentations: {e}') from None


def _check_features(config: ml_collections.ConfigDict) -> None:
  """``data.features`` is known, and the scattering models get features."""
  features = _section(config, 'data').get('features')
  try:
    data_lib.features_lib.check_features(features)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  model = _section(config, 'model').get('name')
  if model in scatternet.MODELS and features != 'scatternet':
    raise ConfigError(
        f'model.name={model!r} takes scattering features, not pixels: set'
        " data.features='scatternet' (computed once and cached beside the"
        ' tfds data).')


def check_splits(splits: data_lib.DataSplits) -> None:
  """Refuses datasets a run would mishandle, naming the split and the fix.

  Each split (train, test, public) must have float images [N, H, W, C] with
  finite values of magnitude <= :data:`MAX_ABS_INPUT` and integer labels in
  ``[0, num_classes)``, one per image; all splits share the image shape.
  """
  parts = [('train split', splits.train), ('test split', splits.test)]
  if splits.public is not None:
    parts.append(('public split', splits.public))
  shape = splits.train.images.shape[1:]
  for where, ds in parts:
    data_lib.check_dataset(ds, splits.num_classes, where)
    if not np.issubdtype(ds.images.dtype, np.floating):
      raise ValueError(
          f'{where}: images must be floating point (e.g. float32 scaled to'
          f' [0, 1]), got {ds.images.dtype}.')
    if not np.issubdtype(ds.labels.dtype, np.integer):
      raise ValueError(
          f'{where}: labels must be integers in [0, {splits.num_classes}),'
          f' got dtype {ds.labels.dtype}.')
    if ds.images.shape[1:] != shape:
      raise ValueError(
          f'{where}: images have shape {ds.images.shape[1:]} but the train'
          f' split\'s are {shape}; every split must share one image shape.')
    # Extremes as Python floats: no |images| copy, no float16 overflow.
    peak = max(float(ds.images.max()), -float(ds.images.min())) if (
        ds.images.size) else 0.0
    if peak > MAX_ABS_INPUT:
      raise ValueError(
          f'{where}: image values reach {peak:.3g}, beyond'
          f' {MAX_ABS_INPUT:g}: normalize the inputs (e.g. scale pixels to'
          ' [0, 1]).')
