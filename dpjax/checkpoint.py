"""Checkpoint and resume: the whole training state and the privacy ledger.

A DP-SGD run that crashes and resumes must end with the guarantee of what
really ran. Opacus users resumed with the wrong epsilon (Opacus #117, #373)
because the accountant's history lived outside the checkpoint. Here one
orbax-checkpoint step holds, atomically:

* the whole ``TrainState`` pytree, saved generically (parameters, optimizer
  state including the noise PRNG key, parameter averages, and whatever other
  features add to the state), with a SHA-256 checksum of its leaves;
* the privacy ledger: every DP event composed so far, extra releases included,
  serialized field by field (:func:`event_to_json`);
* the step, which is the sampler's whole position (Poisson batches are a pure
  function of (key, step)), the evaluation history and the run's counters;
* the run's SECRET seed (:mod:`dpjax.keys`), from which the sampler, the
  noise and every other mechanism draw derive: a resumed run keeps it, so it
  ends bit-identical. A checkpoint is therefore as secret as a private key:
  whoever holds it can regenerate and subtract the noise. Never publish the
  checkpoints directory; summary.json never holds the secret;
* a fingerprint of the run's config: everything except performance and
  logging flags. Resuming under other privacy settings is refused.

A checkpoint that fails to restore or to verify is moved aside and the
previous good one is used; a partial one (killed while writing) was never
committed by orbax and is ignored. Since every step is a deterministic
function of (config, seeds, step), a run resumed from an older checkpoint
recomputes the same steps, bit for bit, with the same noise.

Privacy invariant owned here (DESIGN.md, 4 and 5): the epsilon of a resumed
run is computed from the ledger of every release since step 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import weakref
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dpjax import accounting

PyTree = Any

# Config fields that cannot change the guarantee: performance, logging and
# where the raw data lives. Everything else is in the fingerprint.
NON_PRIVACY_FIELDS: tuple[str, ...] = (
    'perf', 'progress_bar', 'log_every_steps', 'eval_every_steps',
    'eval_size', 'data.manual_dir', 'data.tfds_data_dir')

_EVENT_TYPES: dict[str, type[dp_accounting.DpEvent]] = {
    cls.__name__: cls for cls in vars(dp_accounting.dp_event).values()
    if isinstance(cls, type) and issubclass(cls, dp_accounting.DpEvent)}


def register_dp_event(cls: type[dp_accounting.DpEvent]) -> type:
  """Lets :func:`event_from_json` rebuild a DpEvent class defined elsewhere.

  Usable as a class decorator; the class must be an attrs class whose fields
  are all constructor arguments (as every dp-accounting event is).
  """
  _EVENT_TYPES[cls.__name__] = cls
  return cls


def event_to_json(event: dp_accounting.DpEvent) -> dict[str, Any]:
  """A JSON-ready dict of ``event``: its class name and its attrs fields.

  Examples:
    >>> import dp_accounting
    >>> from dpjax import checkpoint
    >>> event = dp_accounting.PoissonSampledDpEvent(
    ...     0.01, dp_accounting.GaussianDpEvent(1.1))
    >>> checkpoint.event_to_json(event)
    {'event_type': 'PoissonSampledDpEvent', 'sampling_probability': 0.01, \
'event': {'event_type': 'GaussianDpEvent', 'noise_multiplier': 1.1}}
    >>> checkpoint.event_from_json(checkpoint.event_to_json(event)) == event
    True
  """
  if type(event).__name__ not in _EVENT_TYPES:
    raise TypeError(
        f'cannot checkpoint the DP event {event!r}: register its class with'
        ' dpjax.checkpoint.register_dp_event.')

  def value(v):
    if isinstance(v, dp_accounting.DpEvent):
      return event_to_json(v)
    if isinstance(v, (list, tuple)):
      return [value(x) for x in v]
    if isinstance(v, (np.integer, np.floating)):
      return v.item()
    return v

  out = {'event_type': type(event).__name__}
  for field in event.__attrs_attrs__:
    out[field.name] = value(getattr(event, field.name))
  return out


def event_from_json(obj: dict[str, Any]) -> dp_accounting.DpEvent:
  """Inverse of :func:`event_to_json` (only known DpEvent classes)."""
  obj = dict(obj)
  name = obj.pop('event_type', None)
  if name not in _EVENT_TYPES:
    raise ValueError(f'unknown DP event type {name!r} in a checkpoint.')

  def value(v):
    if isinstance(v, dict) and 'event_type' in v:
      return event_from_json(v)
    if isinstance(v, list):
      return [value(x) for x in v]
    return v

  return _EVENT_TYPES[name](**{k: value(v) for k, v in obj.items()})


def ledger_to_json(ledger: accounting.PrivacyLedger) -> list[dict[str, Any]]:
  """The ledger's entries as ``[{'event': ..., 'count': n}, ...]``."""
  return [{'event': event_to_json(e), 'count': int(c)}
          for e, c in ledger.entries]


def ledger_from_json(entries: list[dict[str, Any]]
                     ) -> accounting.PrivacyLedger:
  """Inverse of :func:`ledger_to_json`."""
  return accounting.PrivacyLedger(
      [(event_from_json(e['event']), int(e['count'])) for e in entries])


def _flatten(config: ml_collections.ConfigDict | dict, prefix: str = ''
             ) -> dict[str, Any]:
  out = {}
  for key, v in (config.items() if hasattr(config, 'items') else []):
    name = f'{prefix}{key}'
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(_flatten(v, name + '.'))
    else:
      out[name] = v
  return out


def _jsonable(v):
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  return repr(v)


def privacy_fields(config: ml_collections.ConfigDict,
                   dataset_size: int) -> dict[str, Any]:
  """The config fields a resumed run must share, flattened, plus N.

  Every field except :data:`NON_PRIVACY_FIELDS` (performance, logging, data
  location): a new field another feature adds is covered without a change
  here.
  """
  flat = _flatten(config)
  keep = {
      k: _jsonable(v) for k, v in sorted(flat.items())
      if not any(k == f or k.startswith(f + '.') for f in NON_PRIVACY_FIELDS)}
  keep['dataset_size'] = int(dataset_size)
  return keep


def fingerprint(fields: dict[str, Any]) -> str:
  """SHA-256 of :func:`privacy_fields`' output."""
  return hashlib.sha256(
      json.dumps(fields, sort_keys=True).encode()).hexdigest()


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a run with other privacy settings."""


def check_same_run(stored: dict[str, Any], current: dict[str, Any],
                   directory: str) -> None:
  """Raises :class:`CheckpointMismatchError` naming the differing fields."""
  if fingerprint(stored) == fingerprint(current):
    return
  diffs = [f'{k}: checkpoint {stored.get(k, "<absent>")!r}, now'
           f' {current.get(k, "<absent>")!r}'
           for k in sorted(set(stored) | set(current))
           if stored.get(k, '<absent>') != current.get(k, '<absent>')]
  raise CheckpointMismatchError(
      f'{directory} holds checkpoints of a run with other settings ('
      + '; '.join(diffs) + '). Resuming would report one guarantee for steps'
      ' taken under different privacy settings. Use a new --workdir, or'
      ' restore those settings (performance flags under config.perf may'
      ' differ).')


def _host_value(x) -> np.ndarray:
  if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)  # replicated: any shard is the whole value
  x = np.asarray(x)
  # A Python 0 and a restored int32 0 are the same state.
  return x.astype(jax.dtypes.canonicalize_dtype(x.dtype))


def tree_checksum(tree: PyTree) -> str:
  """SHA-256 over the paths, dtypes, shapes and bytes of ``tree``'s leaves."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    value = _host_value(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f'{value.dtype}{value.shape}'.encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


# Checkpointers not closed yet: a run interrupted (Ctrl-C) between saves
# leaves one open, with a save possibly still being written by orbax's
# threads; close_open_checkpointers() lets it commit before the process exits.
_OPEN: weakref.WeakSet = weakref.WeakSet()


def close_open_checkpointers() -> None:
  """Waits for the pending saves of every open :class:`Checkpointer`, closes it."""
  for checkpointer in list(_OPEN):
    try:
      checkpointer.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('closing the checkpoints in %s failed (%s); the last'
                      ' committed one is intact.', checkpointer.directory, e)


class Checkpointer:
  """Saves and restores ``(state, meta)`` steps under ``directory``.

  ``meta`` is a JSON-ready dict (ledger, history, counters) saved beside the
  state pytree; the privacy fields and a checksum of the state are added to
  it and checked on restore.

  Args:
    directory: where the checkpoints live (created if missing).
    fields: :func:`privacy_fields` of the current run.
    max_to_keep: checkpoints kept; older ones are deleted (>= 2, so that a
      corrupted latest one has a predecessor).
  """

  def __init__(self, directory: str, fields: dict[str, Any], *,
               max_to_keep: int = 3):
    if max_to_keep < 2:
      raise ValueError(f'max_to_keep must be >= 2, got {max_to_keep!r}.')
    self.directory = os.path.abspath(directory)
    self.fields = fields
    self._max_to_keep = max_to_keep
    self._manager = self._open()
    _OPEN.add(self)

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._max_to_keep, cleanup_tmp_directories=True,
        create=True)
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_names=('state', 'meta'))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _set_aside(self, step: int, error: Exception) -> None:
    logging.warning('checkpoint %d in %s is unreadable or corrupted (%s);'
                    ' falling back to the previous one.', step,
                    self.directory, error)
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory),
                           'corrupt_checkpoints')
      os.makedirs(aside, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)),
                  os.path.join(aside, f'{step}-{int(time.time())}'))
    self._manager.reload()

  def stored_secret(self) -> int | None:
    """The secret seed the checkpointed run used (None: no checkpoint).

    Read before anything else is built, so that a resumed run samples and
    noises with the same keys. Checkpoints of other privacy settings are
    refused here already.
    """
    for step in reversed(self.all_steps()):
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        secret = int(meta['secret_seed'])
      except Exception:  # pylint: disable=broad-except
        continue  # restore() sets unreadable checkpoints aside
      check_same_run(meta['fields'], self.fields, self.directory)
      return secret
    return None

  def restore(self, template: PyTree) -> tuple[PyTree, dict[str, Any]] | None:
    """The newest good checkpoint as ``(state, meta)``, or None if there is none.

    Args:
      template: a state of the same structure, dtypes and shardings (the
        freshly initialized one).

    Raises:
      CheckpointMismatchError: the checkpoints come from a run with other
        privacy settings.
    """
    for step in reversed(self.all_steps()):
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or 'fields' not in meta:
          raise ValueError('no run metadata')
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      check_same_run(meta['fields'], self.fields, self.directory)
      try:
        state = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(
                jax.tree.map(jnp.asarray, template)))).state
        if tree_checksum(state) != meta.get('checksum'):
          raise ValueError('state checksum mismatch')
        if int(meta.get('step', -1)) != step:
          raise ValueError(f'metadata says step {meta.get("step")!r}')
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      return state, meta
    return None

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Saves checkpoint ``step`` (asynchronously; committed atomically)."""
    meta = dict(meta, step=int(step), fields=self.fields,
                checksum=tree_checksum(state))
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    _OPEN.discard(self)
    self._manager.wait_until_finished()
    self._manager.close()


def load_params(workdir: str, dataset: str) -> PyTree:
  """The parameters of the newest checkpoint of the run in ``workdir``.

  For ``config.init_from``: fine-tuning on ``dataset`` starts from another
  run's model, whose weights enter this run unprotected. So that run must
  have finished (its summary.json says what it trained on) and must not
  have trained non-privately on ``dataset`` itself: that would publish the
  private data through the starting point (privacy invariant 7: an error,
  not a default). A private run on it composes (its epsilon adds).
  """
  summary_path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(summary_path):
    raise ValueError(
        f'init_from={workdir!r} has no summary.json, so what its weights were'
        ' trained on is unknown: finish that run first.')
  with open(summary_path) as f:
    source = json.load(f)
  names = {source.get('dataset'),
           source.get('config', {}).get('data', {}).get('name')}
  if not source.get('private', False) and dataset in names:
    raise ValueError(
        f'init_from={workdir!r} trained non-privately on {dataset!r}, the'
        ' private data of this run: its weights would publish that data.'
        ' Pretrain on public data (e.g. a *_public dataset) instead.')
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  steps = sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(
      directory) else []
  if not steps:
    raise ValueError(
        f'init_from={workdir!r} holds no checkpoint under checkpoints/: run'
        ' the pretraining config with that workdir first.')
  manager = ocp.CheckpointManager(directory, item_names=('state', 'meta'))
  try:
    state = manager.restore(steps[-1], args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  finally:
    manager.close()
  return state['params']


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` all at once (temp file, rename)."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
