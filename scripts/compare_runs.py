"""Compares dpjax-train runs: a markdown table and a test-accuracy plot.

Reads ``summary.json`` and ``history.json`` from each run directory.

    python scripts/compare_runs.py runs/ic runs/bc --labels IC BC \
        --plot docs/clipping_mnist.png
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

def _load(run: str) -> tuple[dict, dict]:
  with open(os.path.join(run, 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(run, 'history.json')) as f:
    history = json.load(f)
  return summary, history


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('runs', nargs='+', help='run directories (--workdir)')
  p.add_argument('--labels', nargs='+', help='one label per run')
  p.add_argument('--plot', help='write the accuracy plot here (PNG)')
  p.add_argument('--title', default='')
  args = p.parse_args(argv)
  labels = args.labels or [os.path.basename(r.rstrip('/')) for r in args.runs]
  if len(labels) != len(args.runs):
    p.error('give one label per run')
  print('| run | mode | group size | layers | sampler / accountant | sigma |'
        ' sensitivity | epsilon | test accuracy | time (s) |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  fig, ax = plt.subplots(figsize=(7, 4))
  for label, run in zip(labels, args.runs):
    s, h = _load(run)
    print(f"| {label} | {s.get('clipping_mode', 'flat')} |"
          f" {s.get('group_size', 1)} | {s.get('layers', 'none')} |"
          f" {s['sampler']} / {s['accountant']} | {s['noise_multiplier']:.3f} |"
          f" {s['sensitivity']:.3g} | {s['epsilon']:.3f} |"
          f" {100 * s['test_accuracy']:.2f}% | {s.get(DIAGNOSTICS, s)['train_time_s']:.0f} |")
    ax.plot(h['step'], [100 * a for a in h['test_accuracy']], marker='o',
            markersize=3, label=label)
  ax.set_xlabel('step')
  ax.set_ylabel('test accuracy (%)')
  ax.grid(alpha=0.3)
  ax.legend()
  if args.title:
    ax.set_title(args.title)
  fig.tight_layout()
  if args.plot:
    fig.savefig(args.plot, dpi=110)


if __name__ == '__main__':
  main()
