"""The normalization comparison: one config, six normalizations, several seeds.

Trains ``--config`` once per variant and seed (the same private set, privacy
budget and recipe for all: only the normalization changes), then prints the
markdown table and writes the plot of scripts/compare_normalization.py.
Variants: no normalization, GroupNorm, GroupNorm + ScaleNorm (Klause et al.
2022), and BatchNorm with public, frozen (public, fixed at initialization)
and privatized statistics (dpjax/normalization.py). Every variant holds out the
same public slice (``--public-fraction``), so N is the same for all, and one
prepared-data cache (``$DPJAX_CACHE_DIR``, else ``<workdir>/data_cache``), so
features are computed once. Finished runs (a summary.json in their directory)
are read, not retrained: an interrupted study resumes.

    python scripts/normalization_study.py --config configs/scatternet_cifar10.py:cnn \
        --workdir runs/norm_c10 --seeds 0 1 --out docs/normalization_scatternet.png
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
from dpjax import data as data_lib  # pylint: disable=g-import-not-at-top
from dpjax import train  # pylint: disable=g-import-not-at-top
from scripts import compare_normalization  # pylint: disable=g-import-not-at-top

VARIANTS: dict[str, dict[str, object]] = {
    'none': {'model.norm': 'none'},
    'groupnorm': {'model.norm': 'group'},
    'groupnorm_scalenorm': {'model.norm': 'group', 'model.scale_norm': True},
    'bn_public': {'model.norm': 'batch', 'normalization.policy': 'public'},
    'bn_frozen': {'model.norm': 'batch', 'normalization.policy': 'frozen'},
    'bn_privatized': {'model.norm': 'batch',
                      'normalization.policy': 'privatized'},
}


def parse_assignment(assignment: str) -> tuple[str, object]:
  """``'a.b=value'`` -> ``('a.b', value)`` (a Python literal, else a string)."""
  if '=' not in assignment:
    raise SystemExit(f'--set {assignment!r}: expected field=value')
  field, raw = assignment.split('=', 1)
  try:
    return field, ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return field, raw


def run(config_path: str, variant: str, seed: int, workdir: str,
        overrides: dict[str, object]) -> str:
  """Trains (or finds) one run; returns its directory."""
  rundir = os.path.join(workdir, f'{variant}_seed{seed}')
  if os.path.exists(os.path.join(rundir, 'summary.json')):
    return rundir
  config = config_validation.load_config(config_path)
  for field in list(overrides) + list(VARIANTS[variant]):
    config_validation.check_field_path(config, field)
  config.update_from_flattened_dict({**overrides, **VARIANTS[variant]})
  config.seed = seed
  config.progress_bar = False
  train.train_and_evaluate(config, rundir)
  return rundir


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', required=True, help='config file[:argument]')
  p.add_argument('--workdir', required=True)
  p.add_argument('--seeds', nargs='+', type=int, default=[0, 1])
  p.add_argument('--variants', nargs='+', default=list(VARIANTS),
                 choices=list(VARIANTS))
  p.add_argument('--public-fraction', type=float, default=0.01,
                 help='held-out public slice, in every variant')
  p.add_argument('--set', action='append', default=[], dest='overrides',
                 help='field=value for every run (repeatable)')
  p.add_argument('--out', default=None, help='PNG path for the plot')
  p.add_argument('--title', default='')
  args = p.parse_args(argv)
  overrides = dict(parse_assignment(a) for a in args.overrides)
  overrides.setdefault('data.public_fraction', args.public_fraction)
  # One prepared-data cache for every run: features are computed once.
  overrides.setdefault('data.tfds_data_dir',
                       data_lib.cache_root(None, args.workdir))
  jobs = [(v, s) for v in args.variants for s in args.seeds]
  dirs: dict[str, list[str]] = {v: [] for v in args.variants}
  for variant, seed in tqdm.tqdm(jobs, desc='runs'):
    dirs[variant].append(run(args.config, variant, seed, args.workdir,
                             overrides))
  table = compare_normalization.compare(list(dirs.items()), args.out,
                                        args.title)
  with open(os.path.join(args.workdir, 'normalization_study.json'), 'w') as f:
    json.dump({'config': args.config, 'overrides': overrides,
               'runs': dirs}, f, indent=1)
  print(table)


if __name__ == '__main__':
  main()
