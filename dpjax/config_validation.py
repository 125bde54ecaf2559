"""Clear errors for bad input at the boundary: config fields and datasets.

A DP run with a silently ignored setting is a run with another guarantee than
the one its user asked for. This module refuses, before anything is written:

* command-line overrides of fields that do not exist (``--config.privacy.foo``
  used to die with ``AttributeError: "'foo'"``): the error names the field and
  lists the fields its section has (and ``--config.a.b=None``, which
  ml_collections cannot parse for a typed field, unsets it);
* a run given both a noise multiplier and a target epsilon: one of them
  would silently win;
* out-of-range settings of the scale features (devices, physical batches,
  checkpoints, parameter averaging, augmentation multiplicity, evaluation
  size), and a scattering model without its features;
* datasets of the wrong structure: dtypes, shapes that disagree between
  splits, images and labels that do not pair up.

Records outside the declared domain (a NaN or absurdly large pixel, a label
outside the class range) are not refused: one such record must not abort a
whole run, and the message that refuses it would describe private data. They
train as any record does: a non-finite gradient contributes zero, a large one
is clipped to the bound, an invalid label contributes zero
(:mod:`dpjax.losses`), so the sensitivity holds (invariant 1). The data
owner's console gets counts and field names only, never a value.

(A workdir that holds checkpoints of a run with other privacy settings is
refused by :mod:`dpjax.checkpoint`.)
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import numbers
from typing import Any, Sequence

import ml_collections
import numpy as np

from dpjax import augmult as augmult_lib
from dpjax import data as data_lib
from dpjax import scatternet

# Inputs beyond this magnitude are not normalized images: their gradients
# overflow float32 norms, and the clipping zeroes them (counted, not refused).
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


UNSET = 'None'


def split_unset_overrides(argv: Sequence[str],
                          flag: str = 'config') -> tuple[list[str], list[str]]:
  """Takes ``--config.a.b=None`` out of ``argv``: ``(argv, paths to unset)``.

  ml_collections parses an override by its field's type, so ``None`` cannot be
  given for a float, int or str field. The last override of a path wins, as
  for any flag; ``--config.a.b None`` (two arguments) works too. Only the
  exact spelling ``None`` unsets (``none`` is a legitimate string value).

  Examples:
    >>> from dpjax import config_validation
    >>> config_validation.split_unset_overrides(
    ...     ['prog', '--config.privacy.target_epsilon=None',
    ...      '--config.privacy.noise_multiplier=1.1'])
    (['prog', '--config.privacy.noise_multiplier=1.1'], ['privacy.target_epsilon'])
  """
  items = []  # (first arg index, arg count, path or None, value)
  i = 0
  while i < len(argv):
    arg, path, value, count = argv[i], None, None, 1
    paths = _override_paths([arg], flag)
    if paths and arg.startswith(f'--{flag}.'):
      path = paths[0]
      if '=' in arg:
        value = arg.split('=', 1)[1]
      elif i + 1 < len(argv) and argv[i + 1] == UNSET:
        value, count = UNSET, 2
    items.append((i, count, path, value))
    i += count
  last = {path: value for _, _, path, value in items if path is not None}
  kept, unset = [], []
  for i, count, path, value in items:
    if path is not None and value == UNSET:
      if last[path] == UNSET and path not in unset:
        unset.append(path)
      continue
    if path is not None and last[path] == UNSET:
      continue  # an earlier value, overridden by a later None
    kept.extend(argv[i:i + count])
  return kept, unset


def unset_fields(config: ml_collections.ConfigDict,
                 paths: Sequence[str]) -> None:
  """Sets each dotted field path of ``config`` to None (unknown: an error)."""
  for path in paths:
    check_field_path(config, path)
    *sections, name = path.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[name] = None


def check_noise_choice(config: ml_collections.ConfigDict) -> None:
  """Refuses a private run with both or neither of sigma and target epsilon.

  A fixed noise multiplier and a target epsilon each determine the noise; a
  run given both would have to ignore one of them, and the one ignored used
  to be the target (the default epsilon of 3 became 15 without a word).
  """
  privacy = _section(config, 'privacy')
  if not privacy.get('enabled', True):
    return
  sigma, eps = privacy.get('noise_multiplier'), privacy.get('target_epsilon')
  if sigma is not None and eps is not None:
    raise ConfigError(
        f'privacy.noise_multiplier={sigma!r} and privacy.target_epsilon='
        f'{eps!r} are both set; a run takes one of them. To train with noise'
        f' multiplier {sigma!r} (its epsilon is then reported), also pass'
        ' --config.privacy.target_epsilon=None; to calibrate the noise to'
        f' epsilon {eps!r}, pass --config.privacy.noise_multiplier=None (in'
        ' Python: set the other one to None).')
  if sigma is None and eps is None:
    raise ConfigError(
        'neither privacy.noise_multiplier nor privacy.target_epsilon is set;'
        ' set one, e.g. --config.privacy.target_epsilon=3 (or'
        ' --config.privacy.enabled=False for a non-private baseline).')


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

  Sections: ``privacy`` (noise multiplier or target epsilon: exactly one),
  ``perf`` (num_devices, physical_batch_size, checkpoint_every_steps),
  ``averaging`` (ema_decay, polyak, polyak_start_step), ``augmult``
  (num_views, augmentations), ``eval_size``, and ``data.features`` (known,
  and set for the scattering models).
  """
  check_noise_choice(config)
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
        ' prepared data).')


def check_splits(splits: data_lib.DataSplits) -> dict[str, dict[str, int]]:
  """Refuses datasets of the wrong structure; counts out-of-domain records.

  Each split (train, test, public) must have float images [N, H, W, C] (or
  integer tokens [N, T]) and integer labels, one per image (or per token);
  all splits share the input shape. Records
  with a non-finite or huge (> :data:`MAX_ABS_INPUT`) value or a label
  outside ``[0, num_classes)`` are counted per split and reported as counts
  (a warning on the console); they train per record (module docstring). The
  public split, which feeds statistics and thresholds without clipping,
  must have finite images in range.

  Returns:
    Split name -> field -> number of out-of-domain records.
  """
  parts = [('train split', splits.train), ('test split', splits.test)]
  if splits.public is not None:
    parts.append(('public split', splits.public))
  shape = splits.train.images.shape[1:]
  for where, ds in parts:
    data_lib.check_dataset(ds, where)
    if data_lib.input_field(ds.images) != 'tokens' and not np.issubdtype(
        ds.images.dtype, np.floating):
      raise ValueError(
          f'{where}: images must be floating point (e.g. float32 scaled to'
          f' [0, 1]) or integer token ids [N, T], got {ds.images.dtype}.')
    if not np.issubdtype(ds.labels.dtype, np.integer):
      raise ValueError(
          f'{where}: labels must be integers in [0, {splits.num_classes}),'
          f' got dtype {ds.labels.dtype}.')
    if ds.images.shape[1:] != shape:
      raise ValueError(
          f'{where}: images have shape {ds.images.shape[1:]} but the train'
          f' split\'s are {shape}; every split must share one image shape.')
  counts = {where: data_lib.out_of_domain(ds, splits.num_classes,
                                         MAX_ABS_INPUT)
            for where, ds in parts}
  for where, count in counts.items():
    if where == 'public split' and count['image']:
      raise ValueError(
          f'public split: {count["image"]} records hold non-finite values or'
          f' values beyond {MAX_ABS_INPUT:g}; public data feeds statistics and'
          ' thresholds without clipping: clean or normalize it.')
    if count['image'] or count['label']:
      logging.warning(
          '%s: %d records with an image outside the domain (non-finite or'
          ' |x| > %g) and %d with a label outside [0, %d); they train per'
          ' record: a non-finite gradient contributes zero, a large one is'
          ' clipped, an invalid label contributes zero.', where,
          count['image'], MAX_ABS_INPUT, count['label'], splits.num_classes)
  return counts
