"""Table and plot of dpjax-train runs that differ in normalization.

Reads each run's summary.json and history.json, prints a markdown table (test
accuracy, epsilon, noise multipliers, time) and plots test accuracy against
steps, one line per run.

    python scripts/compare_normalization.py --out docs/normalization.png \
        none=runs/none groupnorm=runs/gn scalenorm=runs/sn \
        bn_public=runs/bn_public bn_privatized=runs/bn_priv
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


# dpjax.train.DIAGNOSTICS (not imported: this script needs no JAX).
DIAGNOSTICS = 'diagnostics (not differentially private)'

def load_run(workdir: str) -> tuple[dict, dict]:
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, 'history.json')) as f:
    history = json.load(f)
  return summary, history


def table_row(name: str, summary: dict) -> str:
  norm = summary.get('normalization', {})
  sigma_g = norm.get('gradient_noise_multiplier', summary['noise_multiplier'])
  sigma_s = norm.get('stats_noise_multiplier')
  return (f"| {name} | {summary['test_accuracy']:.4f} |"
          f" {summary['epsilon']:.3f} | {summary['noise_multiplier']:.4f} |"
          f' {sigma_g:.4f} | {"-" if sigma_s is None else f"{sigma_s:.4f}"} |'
          f" {summary['steps']} | {summary.get(DIAGNOSTICS, summary)['train_time_s'] / 60:.1f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', help='name=workdir')
  parser.add_argument('--out', default=None, help='PNG path for the plot')
  args = parser.parse_args()
  runs = [r.split('=', 1) for r in args.runs]
  print('| normalization | test accuracy | epsilon | sigma (step) |'
        ' sigma gradient | sigma statistics | steps | minutes |')
  print('|---|---|---|---|---|---|---|---|')
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, workdir in runs:
    summary, history = load_run(workdir)
    print(table_row(name, summary))
    ax.plot(history['step'], history['test_accuracy'], marker='o', label=name)
  ax.set_xlabel('step')
  ax.set_ylabel('test accuracy')
  ax.legend()
  ax.grid(alpha=0.3)
  if args.out:
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == '__main__':
  main()
