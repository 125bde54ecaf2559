"""Privacy-utility curve: test accuracy against epsilon over several runs.

Trains each config at each target epsilon (the noise multiplier calibrated to
it) and seed, then writes ``privacy_utility.json`` (one row per run) and
``privacy_utility.png`` (mean over seeds, min-max bars) into ``--workdir``.
Finished runs (a ``summary.json`` in their directory) are read, not retrained,
so an interrupted sweep resumes.

    python scripts/privacy_utility.py --workdir runs/pu \
        --epsilons 0.5 1 2 4 8 --seeds 0 1 2
    python scripts/privacy_utility.py --workdir runs/pu_clip \
        --config configs/default.py configs/default.py --labels flat automatic \
        --set privacy.epochs=10 --set-1 privacy.clipping.mode=automatic
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys

import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpjax import config_validation  # pylint: disable=g-import-not-at-top
from dpjax import plots  # pylint: disable=g-import-not-at-top
from dpjax import train  # pylint: disable=g-import-not-at-top

_DEFAULT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
    'default.py')


def _override(config, assignment: str) -> None:
  """Applies ``a.b.c=value`` (value a Python literal, else a string)."""
  if '=' not in assignment:
    raise SystemExit(f'--set {assignment!r}: expected field=value, for example'
                     ' privacy.epochs=5')
  field, raw = assignment.split('=', 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  *parents, leaf = field.split('.')
  section = config
  for name in parents:
    section = section[name]
  if leaf not in section:
    raise SystemExit(f'--set {assignment!r}: the config has no field {field!r}')
  section[leaf] = value


def sweep(configs: list[str], labels: list[str], epsilons: list[float],
          seeds: list[int], workdir: str, overrides: list[str],
          series_overrides: list[list[str]]) -> list[dict]:
  """Runs (or reads) every (config, epsilon, seed); returns one row per run."""
  runs = [(c, label, extra, e, s)
          for c, label, extra in zip(configs, labels, series_overrides)
          for e in epsilons for s in seeds]
  rows = []
  for path, label, extra, eps, seed in tqdm.tqdm(runs, desc='runs'):
    rundir = os.path.join(workdir, label, f'eps{eps:g}_seed{seed}')
    summary_path = os.path.join(rundir, 'summary.json')
    if os.path.exists(summary_path):
      with open(summary_path) as f:
        summary = json.load(f)
    else:
      config = config_validation.load_config(path)
      for assignment in overrides + extra:
        _override(config, assignment)
      # A seed here names a reproducible run: init and noise alike.
      config.seed = seed
      config.privacy.noise_seed = seed
      config.privacy.target_epsilon = eps
      config.privacy.noise_multiplier = None
      config.progress_bar = False
      summary = train.train_and_evaluate(config, rundir)
    rows.append({'series': label, 'target_epsilon': eps, 'seed': seed,
                 'epsilon': summary['epsilon'],
                 'noise_multiplier': summary.get('noise_multiplier'),
                 'test_accuracy': summary['test_accuracy'], 'run': rundir})
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--config', nargs='+', default=[_DEFAULT],
                 help='config files (one series each)')
  p.add_argument('--labels', nargs='+', help='one label per config')
  p.add_argument('--epsilons', nargs='+', type=float, default=[1, 2, 4, 8])
  p.add_argument('--seeds', nargs='+', type=int, default=[0])
  p.add_argument('--set', action='append', default=[], dest='overrides',
                 help='field=value for every config (repeatable)')
  for i in range(1, 5):
    p.add_argument(f'--set-{i}', action='append', default=[],
                   help=f'field=value for config number {i} only')
  p.add_argument('--title', default='')
  args = p.parse_args(argv)
  labels = args.labels or [
      os.path.splitext(os.path.basename(c))[0] for c in args.config]
  if len(labels) != len(args.config) or len(set(labels)) != len(labels):
    p.error('give one distinct label per config (--labels)')
  if any(e <= 0 for e in args.epsilons):
    p.error(f'--epsilons must be positive, got {args.epsilons}')
  series_overrides = [getattr(args, f'set_{i + 1}', None) or []
                      for i in range(len(args.config))]
  rows = sweep(args.config, labels, args.epsilons, args.seeds, args.workdir,
               args.overrides, series_overrides)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, 'privacy_utility.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  png = os.path.join(args.workdir, 'privacy_utility.png')
  plots.plot_privacy_utility(rows, png, title=args.title)
  print('| series | epsilon | seeds | accuracy mean (min-max) |')
  print('|---|---|---|---|')
  for label, points in plots.privacy_utility_points(rows).items():
    for eps, mean, lo, hi in points:
      n = sum(1 for r in rows if r['series'] == label and r['epsilon'] == eps)
      print(f'| {label} | {eps:.3g} | {n} | {mean:.2f}% ({lo:.2f}-{hi:.2f}) |')
  print(f'wrote {png}')


if __name__ == '__main__':
  main()
