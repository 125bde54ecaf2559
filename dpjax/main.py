"""``dpjax-train``: flags and a call to :func:`dpjax.train.train_and_evaluate`.

    dpjax-train --config configs/mnist.py --workdir runs/mnist \
        --config.privacy.target_epsilon=3
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
    'default.py')


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


def _check_overrides(argv: list[str]) -> None:
  """Exits naming an unknown ``--config.a.b`` field and its section's fields.

  ml_collections would die on it with ``AttributeError: "'b'"``.
  """
  _config_root_on_path(argv)
  from dpjax import config_validation  # pylint: disable=g-import-not-at-top
  try:
    config = config_validation.load_config(_config_path(argv))
    config_validation.check_overrides(config, argv[1:])
  except config_validation.ConfigError as e:
    sys.stderr.write(f'FATAL Flags parsing error: {e}\n')
    sys.exit(1)
  except Exception:  # pylint: disable=broad-except
    return  # absl reports a config file that fails to load.


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


def _run(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # JAX's INFO lines drown the bar.
  config = _CONFIG.value
  if config is None:
    raise app.UsageError(
        'No --config given and configs/default.py is not next to the package;'
        ' pass --config path/to/config.py.')
  workdir = _WORKDIR.value or os.path.join(
      'runs', os.path.splitext(os.path.basename(
          config_flags.get_config_filename(flags.FLAGS['config'])))[0])
  from dpjax import train  # pylint: disable=g-import-not-at-top
  summary = train.train_and_evaluate(config, workdir)
  print(f"test accuracy {summary['test_accuracy']:.4f}, epsilon"
        f" {summary['epsilon']:.3f} (delta={summary['delta']}),"
        f" {summary[train.DIAGNOSTICS]['train_time_s']:.0f} s; wrote"
        f' {workdir}/summary.json')
  if 'epsilon_modelmix' in summary:
    eps_mm = summary['epsilon_modelmix']
    print('ModelMix epsilon ' + ('withheld: the analysis assumes ' + '; '.join(
        summary['modelmix']['withheld_because']) if eps_mm is None
                                 else f'{eps_mm:.3f}'))


def main():
  _check_overrides(sys.argv)
  app.run(_run)


if __name__ == '__main__':
  main()
