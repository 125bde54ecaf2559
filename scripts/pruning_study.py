"""Runs the MNIST freezing/selection study and writes its table and plot.

Keep fractions 100/50/20/5%, freezing vs per-step selection, random vs
magnitude masks (plus the public-data sources), all at epsilon = 3 on
configs/mnist_pruning.py. Each run's summary.json lands in
``WORKDIR/<run>/``; finished runs are skipped, so an interrupted study
resumes. The accuracy table replaces the block between the markers in
docs/EXPERIMENTS_pruning.md and the plot is docs/pruning_study.png.

    python scripts/pruning_study.py --workdir runs/pruning_study --seeds 0
    python scripts/pruning_study.py --seeds 1 2 --sources random \
        magnitude_init magnitude_current public_gradient --report-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import matplotlib  # pylint: disable=g-import-not-at-top

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from configs import mnist_pruning  # pylint: disable=g-import-not-at-top

DOC = os.path.join(REPO, 'docs', 'EXPERIMENTS_pruning.md')
PLOT = os.path.join(REPO, 'docs', 'pruning_study.png')
BEGIN, END = '<!-- study table: begin -->', '<!-- study table: end -->'
KEEPS = (0.5, 0.2, 0.05)
# (label, mode, source): the required grid first, then the public sources.
METHODS = (
    ('freeze / random', 'freeze', 'random'),
    ('freeze / magnitude at init', 'freeze', 'magnitude_init'),
    ('select / random', 'select', 'random'),
    ('select / current magnitude', 'select', 'magnitude_current'),
    ('freeze / public magnitude (public pre-training)', 'freeze',
     'public_magnitude'),
    ('select / public gradient', 'select', 'public_gradient'),
)
PUBLIC_PRETRAIN_STEPS = 100


def runs(seeds, methods):
  """(name, overrides) of every run of the study."""
  out = []
  for seed in seeds:
    # A seed names a reproducible run: init and noise alike.
    seeded = {'seed': seed, 'privacy.noise_seed': seed}
    out.append((f'full_s{seed}', {**seeded, 'pruning.mode': 'none'}))
    for _, mode, source in methods:
      # After public pre-training the 100% reference is its own run.
      pretrained = source == 'public_magnitude'
      for keep in ((1.0,) if pretrained else ()) + KEEPS:
        overrides = {**seeded, 'pruning.mode': mode,
                     'pruning.source': source, 'pruning.keep_fraction': keep}
        if source == 'public_magnitude':
          overrides['pruning.public_pretrain_steps'] = PUBLIC_PRETRAIN_STEPS
        out.append((f'{mode}_{source}_{int(keep * 100)}_s{seed}', overrides))
  return out


def run_one(workdir, overrides):
  from dpjax import train  # pylint: disable=g-import-not-at-top
  config = mnist_pruning.get_config()
  config.progress_bar = False
  for field, value in overrides.items():
    *sections, key = field.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[key] = value
  return train.train_and_evaluate(config, workdir)


def load(workdir, name):
  path = os.path.join(workdir, name, 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _cell(accs, num_seeds):
  if not accs:
    return 'n/a'
  mean = 100 * statistics.mean(accs)
  text = f'{mean:.2f}'
  if len(accs) > 1:
    text += f' +- {100 * statistics.stdev(accs):.2f}'
  if len(accs) < num_seeds:
    text += ' (1 seed)' if len(accs) == 1 else f' ({len(accs)} seeds)'
  return text


def table(workdir, seeds, methods):
  """Markdown: test accuracy (%) per method and keep fraction."""
  full = [s['test_accuracy'] for s in
          (load(workdir, f'full_s{seed}') for seed in seeds) if s]
  header = ('| mode / mask source | 100% kept (no pruning) | '
            + ' | '.join(f'{int(k * 100)}% kept' for k in KEEPS)
            + ' |\n|---|---|' + '---|' * len(KEEPS) + '\n')
  rows = []
  results = {'full': full}
  for label, mode, source in methods:
    own = source == 'public_magnitude'
    cells = [] if own else [_cell(full, len(seeds))]
    for keep in ((1.0,) if own else ()) + KEEPS:
      accs = [s['test_accuracy'] for s in (
          load(workdir, f'{mode}_{source}_{int(keep * 100)}_s{seed}')
          for seed in seeds) if s]
      results[(label, keep)] = accs
      cells.append(_cell(accs, len(seeds)))
    rows.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  some = next((load(workdir, n) for n, _ in runs(seeds, methods)
               if load(workdir, n)), None)
  note = ''
  if some:
    note = (f"\n\nepsilon = {some['epsilon']:.3f}, delta = {some['delta']},"
            f" sigma = {some['noise_multiplier']:.3f}, {some['steps']} steps,"
            f" q = {some['sampling_rate']:.5f}, N = {some['dataset_size']};"
            f' seeds {list(seeds)} (mean +- std over seeds).')
  return header + '\n'.join(rows) + note, results


def plot(results, seeds, path):
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  styles = {'freeze': '--', 'select': '-'}
  for label, mode, _ in METHODS:
    if (label, 1.0) not in results:
      results[(label, 1.0)] = results['full']
    points = [(k, statistics.mean(results[(label, k)]))
              for k in (1.0,) + KEEPS if results.get((label, k))]
    if points:
      ks, accs = zip(*points)
      ax.plot([100 * k for k in ks], [100 * a for a in accs],
              styles[mode], marker='o', label=label)
  ax.set_xscale('log')
  ax.set_xticks([5, 20, 50, 100])
  ax.set_xticklabels(['5%', '20%', '50%', '100%'])
  ax.set_xlabel('coordinates updated (keep fraction)')
  ax.set_ylabel('MNIST test accuracy (%)')
  ax.set_title(f'DP-SGD at epsilon = 3, tanh CNN, seeds {list(seeds)}')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_doc(text):
  with open(DOC) as f:
    doc = f.read()
  pattern = re.escape(BEGIN) + '.*?' + re.escape(END)
  doc = re.sub(pattern, lambda _: f'{BEGIN}\n{text}\n{END}', doc, flags=re.S)
  with open(DOC, 'w') as f:
    f.write(doc)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=os.path.join('runs',
                                                        'pruning_study'))
  parser.add_argument('--seeds', type=int, nargs='+', default=[0])
  parser.add_argument('--report-only', action='store_true',
                      help='write the table and plot from finished runs')
  parser.add_argument('--sources', nargs='+',
                      default=sorted({m[2] for m in METHODS}),
                      help='run only the methods with these mask sources')
  parser.add_argument('--report-seeds', type=int, nargs='+',
                      help='seeds of the table and plot (default: --seeds)')
  args = parser.parse_args()
  if not args.report_only:
    methods = [m for m in METHODS if m[2] in args.sources]
    todo = [(n, o) for n, o in runs(args.seeds, methods)
            if load(args.workdir, n) is None]
    for i, (name, overrides) in enumerate(todo):
      print(f'[{i + 1}/{len(todo)}] {name}', flush=True)
      summary = run_one(os.path.join(args.workdir, name), overrides)
      seconds = summary['diagnostics (not differentially private)'][
          'train_time_s']
      print(f"    test accuracy {summary['test_accuracy']:.4f}, epsilon"
            f" {summary['epsilon']:.3f}, {seconds:.0f} s", flush=True)
  seeds = args.report_seeds or args.seeds
  text, results = table(args.workdir, seeds, METHODS)
  print(text)
  write_doc(text)
  plot(results, seeds, PLOT)


if __name__ == '__main__':
  main()
