"""``dpjax-train``: flags, help and errors around :func:`train.train_and_evaluate`.

    dpjax-train --config configs/mnist.py --workdir runs/mnist \\
        --config.privacy.target_epsilon=3

Errors are one line naming the bad value and the fix (``--verbose`` shows the
traceback); Ctrl-C says where the last checkpoint is; rerunning the same
command resumes an interrupted run and leaves a finished one alone
(:mod:`dpjax.workdir`); ``--config.a.b=None`` unsets a field.
"""

import os
import signal
import sys
import textwrap
import threading

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
    'default.py')
_PROG = 'dpjax-train'
_HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '-?')


def _config_path(argv: list[str]) -> str:
  path = _DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith('--config='):
      path = arg.split('=', 1)[1]
  return path


def _config_root_on_path(argv: list[str]) -> None:
  """Lets configs ``from configs import default`` like the flax examples.

  Configs are loaded by path before ``_run``; their sibling imports resolve
  against the parent of the config's folder, which is put on ``sys.path``.
  """
  path = _config_path(argv)
  root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(':')[0])))
  if root not in sys.path:
    sys.path.insert(0, root)


def _fail(message: str, code: int = 1):
  sys.stderr.write(f'{_PROG}: error: {message}\n')
  sys.exit(code)


def _verbose(argv: list[str]) -> bool:
  return '--verbose' in argv or '--verbose=true' in [a.lower() for a in argv]


def _load_config(argv: list[str]):
  """The config file of ``argv`` loaded once, or a one-line error and exit."""
  _config_root_on_path(argv)
  from dpjax import config_validation  # pylint: disable=g-import-not-at-top
  path = _config_path(argv)
  file = path.split(':', 1)[0]
  if not os.path.isfile(file):
    _fail(f'config file {file!r} not found; pass --config path/to/config.py'
          ' (e.g. configs/mnist.py).')
  try:
    return config_validation.load_config(path)
  except Exception as e:  # pylint: disable=broad-except
    if _verbose(argv):
      raise
    _fail(f'cannot load the config file {file!r}: {type(e).__name__}: {e}'
          ' (--verbose shows the traceback).')


def _check_overrides(argv: list[str]) -> None:
  """Exits naming an unknown ``--config.a.b`` field and its section's fields.

  ml_collections would die on it with ``AttributeError: "'b'"``.
  """
  from dpjax import config_validation  # pylint: disable=g-import-not-at-top
  config = _load_config(argv)
  try:
    config_validation.check_overrides(config, argv[1:])
  except config_validation.ConfigError as e:
    _fail(str(e))


# --help: what most runs change, with the values of the config in use.
_COMMON_FIELDS = (
    ('privacy.target_epsilon', 'epsilon at the end of the run; calibrates the'
     ' noise (None to give noise_multiplier instead)'),
    ('privacy.noise_multiplier', 'a fixed noise std / clip norm (then set'
     ' target_epsilon=None)'),
    ('privacy.delta', 'delta of the (epsilon, delta) guarantee'),
    ('privacy.clip_norm', 'per-example clipping norm C'),
    ('privacy.expected_batch_size', 'Poisson sampling: q = B / N'),
    ('privacy.epochs', 'length of the run (a set steps replaces it)'),
    ('privacy.steps', 'length of the run in steps'),
    ('privacy.accountant', "'rdp' | 'pld' ('gdp' for batch clipping)"),
    ('privacy.clipping.mode', "'flat' | 'per_layer' | 'automatic' |"
     " 'adaptive' | 'batch'"),
    ('privacy.enabled', 'False: the non-private baseline'),
    ('data.name', "'digits' | 'mnist' | 'fashion_mnist' | 'cifar10' |"
     " 'arrays' (your .npz: data.path)"),
    ('data.path', "the .npz file of data.name='arrays'"),
    ('data.manual_dir', 'the raw dataset files (default'
     ' $DPJAX_DATA_DIR/<dataset>)'),
    ('data.tfds_data_dir', 'the prepared-dataset cache (default'
     ' $DPJAX_CACHE_DIR, else <workdir>/data_cache)'),
    ('data.features', "'scatternet': fixed scattering features (Tramer &"
     " Boneh 2021), for model.name='scatter_linear' | 'scatter_cnn'"),
    ('model.name', 'e.g. small_cnn, tanh_cnn, resnet8, resnet20, nnx_cnn'),
    ('optimizer.name', "'sgd' | 'adam' | 'nadam'"),
    ('optimizer.learning_rate', ''),
    ('seed', 'one key schedule for every random stream'),
    ('perf.microbatch_size', 'performance only (never changes the'
     ' guarantee), like every perf field'),
    ('progress_bar', ''),
)


def _field(config, path: str):
  node = config
  for part in path.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      raise KeyError(path)
    node = node[part]
  return node


def _as_typed(value) -> str:
  """A field's value as one would type it after ``--config.a.b=``."""
  return value if isinstance(value, str) else repr(value)


def help_text(argv: list[str]) -> str:
  """``dpjax-train --help``: usage, flags and the common config fields."""
  config = _load_config(argv)
  config_name = os.path.relpath(_config_path(argv))
  rows = []
  for path, what in _COMMON_FIELDS:
    try:
      value = _field(config, path)
    except KeyError:
      continue
    rows.append((f'--config.{path}={_as_typed(value)}', what))
  width = max(len(r[0]) for r in rows) + 2
  fields = '\n'.join(
      textwrap.fill(f'  {flag:<{width}}{what}', 100,
                    subsequent_indent=' ' * (width + 2)).rstrip()
      for flag, what in rows)
  sections = textwrap.fill(
      'Sections: ' + ', '.join(
          k for k in config.keys() if hasattr(config[k], 'keys')) + '.', 79)
  return f'''usage: {_PROG} [--config FILE] [--workdir DIR] [--config.FIELD=VALUE ...]
                   [--overwrite] [--verbose]

Trains a model with DP-SGD as an ml_collections config says; writes
summary.json (epsilon, delta, test accuracy, ...), history.json and
training.png to the workdir, with checkpoints. Rerunning the same command
resumes an interrupted run and leaves a finished one alone.

  --config FILE    the config (default: configs/default.py, the embedded
                   digits, offline); configs/*.py hold one per experiment
  --workdir DIR    output directory (default: runs/<config name>)
  --overwrite      discard the previous run in --workdir (checkpoints,
                   summary.json, history.json, training.png) and start over
  --verbose        full tracebacks on errors

Common fields, with their values in {config_name}:
{fields}

Any field of the config is set with --config.SECTION.FIELD=VALUE (strings
bare, tuples quoted: --config.augmult.augmentations="('crop_flip',)"), and
unset with --config.SECTION.FIELD=None. Unknown fields are refused, naming
the section's fields. {sections}
Every field and its value: {_PROG} --helpfields [--config FILE].

Examples:
  {_PROG}
  {_PROG} --config configs/mnist.py --workdir runs/mnist
  {_PROG} --config.privacy.target_epsilon=1 --config.privacy.epochs=10
  {_PROG} --config.privacy.target_epsilon=None --config.privacy.noise_multiplier=1.1
'''


def fields_text(argv: list[str]) -> str:
  """``dpjax-train --helpfields``: every field of the config and its value."""
  from dpjax import checkpoint  # pylint: disable=g-import-not-at-top
  config = _load_config(argv)
  flat = checkpoint._flatten(config)  # pylint: disable=protected-access
  return '\n'.join(f'--config.{k}={_as_typed(v)}' for k, v in flat.items())


try:
  _CONFIG = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG if os.path.exists(_DEFAULT_CONFIG) else None,
      'Training configuration file (configs/*.py); default:'
      ' configs/default.py (embedded digits).', lock_config=True)
except (AttributeError, KeyError):
  # ml_collections applies the --config.a.b overrides here, to the default.
  _check_overrides(sys.argv)
  raise
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory for summary.json and plots'
    ' (default: runs/<config name>).')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Discard the previous run in --workdir (checkpoints,'
    ' summary.json, history.json, training.png) and train from step 0.')
_VERBOSE = flags.DEFINE_bool(
    'verbose', False, 'Show the full traceback of an error.')


def _report(summary: dict, workdir: str) -> None:
  from dpjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  print(f'{workdir_lib.describe(summary)}; wrote {workdir}/summary.json')
  if 'epsilon_modelmix' in summary:
    eps_mm = summary['epsilon_modelmix']
    print('ModelMix epsilon ' + ('withheld: the analysis assumes ' + '; '.join(
        summary['modelmix']['withheld_because']) if eps_mm is None
                                 else f'{eps_mm:.3f}'))


def _interrupt_outside_saves(signum, frame) -> None:
  """SIGINT handler: a KeyboardInterrupt, but never inside an orbax save.

  Ctrl-C landing in the middle of orbax's save leaves its writer threads
  half set up: they fail at exit with tracebacks, or hang. While the main
  thread is in orbax's code the interrupt is sent again 50 ms later, so it
  lands between library calls; then the pending save commits
  (:func:`_finish_pending_saves`) and the run stops.
  """
  del signum
  while frame is not None:
    if f'{os.sep}orbax{os.sep}' in frame.f_code.co_filename:
      timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
      timer.daemon = True
      timer.start()
      return
    frame = frame.f_back
  raise KeyboardInterrupt


def _finish_pending_saves() -> None:
  """Lets a checkpoint being written when Ctrl-C came commit (or be dropped).

  A second Ctrl-C stops waiting; orbax then discards the uncommitted save.
  """
  from dpjax import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    checkpoint.close_open_checkpointers()
  except KeyboardInterrupt:
    pass


def _train(config, workdir: str) -> None:
  # pylint: disable=g-import-not-at-top
  from dpjax import train
  from dpjax import workdir as workdir_lib
  if _OVERWRITE.value:
    for path in workdir_lib.clear(workdir):
      print(f'--overwrite: removed {path}')
  else:
    finished = workdir_lib.check_finished(workdir, config)
    if finished is not None:
      print(finished)
      return
  try:
    summary = train.train_and_evaluate(config, workdir)
  except KeyboardInterrupt:
    # From here a Ctrl-C (or a deferred one) only cuts the wait short.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _finish_pending_saves()
    every = config.get('perf', {}).get('checkpoint_every_steps')
    sys.stderr.write('\n' + workdir_lib.interrupted_message(
        workdir, checkpoints_enabled=every != 0) + '\n')
    sys.exit(130)
  _report(summary, workdir)


def _one_line(error: Exception) -> str:
  from dpjax import checkpoint  # pylint: disable=g-import-not-at-top
  message = ' '.join(str(error).split()) or type(error).__name__
  if isinstance(error, checkpoint.CheckpointMismatchError):
    return message + ' (--overwrite discards those checkpoints.)'
  if isinstance(error, (ValueError, OSError)):
    return message
  return (f'{type(error).__name__}: {message} (an unexpected error:'
          ' --verbose shows the traceback).')


def _run(argv, unset=()):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # JAX's INFO lines drown the bar.
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupt_outside_saves)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError(
        'No --config given and configs/default.py is not next to the package;'
        ' pass --config path/to/config.py.')
  workdir = _WORKDIR.value or os.path.join(
      'runs', os.path.splitext(os.path.basename(
          config_flags.get_config_filename(flags.FLAGS['config'])))[0])
  try:
    from dpjax import config_validation  # pylint: disable=g-import-not-at-top
    config_validation.unset_fields(config, unset)
    _train(config, workdir)
  except KeyboardInterrupt:
    sys.stderr.write('\nInterrupted before training started.\n')
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if _VERBOSE.value:
      raise
    _fail(_one_line(e))


def main():
  argv = list(sys.argv)
  if any(a in _HELP_FLAGS for a in argv[1:]):
    print(help_text(argv))
    return
  if '--helpfields' in argv[1:]:
    print(fields_text(argv))
    return
  _check_overrides(argv)
  from dpjax import config_validation  # pylint: disable=g-import-not-at-top
  sys.argv, unset = config_validation.split_unset_overrides(argv)
  app.run(lambda args: _run(args, unset))


if __name__ == '__main__':
  main()
