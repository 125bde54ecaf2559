"""Table and plot of dpjax-train runs that differ in normalization.

Reads each run's summary.json and history.json, prints a markdown table (test
accuracy, epsilon, noise multipliers, time) and plots test accuracy against
steps, one line per variant. A variant may list several runs (seeds) joined
by commas: the table then gives the mean and each seed's accuracy, the plot
the mean with the seeds' range shaded.

    python scripts/compare_normalization.py --out docs/normalization.png \
        none=runs/none groupnorm=runs/gn scalenorm=runs/sn \
        bn_public=runs/bn_public bn_privatized=runs/bn_priv
    python scripts/compare_normalization.py --out docs/norm.png \
        groupnorm=runs/gn_s0,runs/gn_s1 none=runs/none_s0,runs/none_s1
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

HEADER = ('| normalization | test accuracy | seeds | epsilon | sigma (step) |'
          ' sigma gradient | sigma statistics | steps | minutes |\n'
          '|---|---|---|---|---|---|---|---|---|')
# dpjax.train.DIAGNOSTICS (not imported: this script needs no JAX).
DIAGNOSTICS = 'diagnostics (not differentially private)'


def load_run(workdir: str) -> tuple[dict, dict]:
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, 'history.json')) as f:
    history = json.load(f)
  return summary, history


def table_row(name: str, summaries: list[dict]) -> str:
  """One markdown row: mean accuracy (each seed's), privacy, mean minutes."""
  first = summaries[0]
  norm = first.get('normalization', {})
  sigma_g = norm.get('gradient_noise_multiplier', first['noise_multiplier'])
  sigma_s = norm.get('stats_noise_multiplier')
  accuracies = [s['test_accuracy'] for s in summaries]
  accuracy = f'{np.mean(accuracies):.4f}'
  if len(accuracies) > 1:
    accuracy += ' (' + ' / '.join(f'{a:.4f}' for a in accuracies) + ')'
  minutes = np.mean([s.get(DIAGNOSTICS, s)['train_time_s']
                     for s in summaries]) / 60
  epsilon = max(s['epsilon'] for s in summaries)
  return (f'| {name} | {accuracy} | {len(summaries)} | {epsilon:.3f} |'
          f" {first['noise_multiplier']:.4f} | {sigma_g:.4f} |"
          f' {"-" if sigma_s is None else f"{sigma_s:.4f}"} |'
          f" {first['steps']} | {minutes:.1f} |")


def plot_variant(ax, name: str, histories: list[dict]) -> None:
  """Mean test accuracy against steps; the seeds' range shaded."""
  steps = histories[0]['step']
  curves = np.array([h['test_accuracy'][:len(steps)] for h in histories])
  line, = ax.plot(steps, curves.mean(0), marker='o', markersize=3, label=name)
  if len(histories) > 1:
    ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2,
                    color=line.get_color())


def compare(variants: list[tuple[str, list[str]]], out: str | None = None,
            title: str = '') -> str:
  """The markdown table of ``(name, workdirs)`` variants; the plot to ``out``."""
  rows = [HEADER]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, workdirs in variants:
    runs = [load_run(w) for w in workdirs]
    rows.append(table_row(name, [s for s, _ in runs]))
    plot_variant(ax, name, [h for _, h in runs])
  ax.set_xlabel('step')
  ax.set_ylabel('test accuracy')
  if title:
    ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  if out:
    fig.tight_layout()
    fig.savefig(out, dpi=120)
  plt.close(fig)
  return '\n'.join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+',
                      help='name=workdir or name=workdir1,workdir2 (seeds)')
  parser.add_argument('--out', default=None, help='PNG path for the plot')
  parser.add_argument('--title', default='')
  args = parser.parse_args()
  variants = []
  for run in args.runs:
    if '=' not in run:
      parser.error(f'{run!r}: expected name=workdir[,workdir...]')
    name, dirs = run.split('=', 1)
    variants.append((name, dirs.split(',')))
  print(compare(variants, args.out, args.title))


if __name__ == '__main__':
  main()
