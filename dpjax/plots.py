"""Training plots written beside summary.json."""

from __future__ import annotations

import collections
import math
import os
from typing import Sequence

# Figures are built without pyplot, so that writing them never changes the
# caller's backend (a notebook's inline plots keep working) and needs no
# display.
from matplotlib import figure as figure_lib
import matplotlib.ticker


def plot_training(history: dict[str, list[float]], path: str,
                  title: str = '') -> None:
  """Test accuracy and epsilon spent against training steps, side by side.

  Parameter averages (``test_accuracy_ema``, ``test_accuracy_polyak``) are
  drawn beside the raw parameters' accuracy. The file is written atomically.
  """
  fig = figure_lib.Figure(figsize=(10, 3.8))
  ax_acc, ax_eps = fig.subplots(1, 2)
  steps = history['step']
  ax_acc.plot(steps, [100 * a for a in history['test_accuracy']], marker='o',
              label='parameters')
  averaged = [k for k in sorted(history) if k.startswith('test_accuracy_')]
  for key in averaged:
    ax_acc.plot(steps, [100 * a for a in history[key]], marker='.',
                label=key[len('test_accuracy_'):])
  if averaged:
    ax_acc.legend()
  ax_acc.set_xlabel('step')
  ax_acc.set_ylabel('test accuracy (%)')
  ax_acc.grid(alpha=0.3)
  eps = history['epsilon']
  if all(math.isfinite(e) for e in eps):
    ax_eps.plot(steps, eps, marker='o', color='tab:red')
    ax_eps.set_ylabel('epsilon spent')
    eps_mm = history.get('epsilon_modelmix', [])
    if any(math.isfinite(e) for e in eps_mm):
      ax_eps.lines[0].set_label('DP-SGD accountant')
      ax_eps.plot(steps, eps_mm, marker='s', color='tab:green',
                  label='ModelMix accountant')
      ax_eps.legend()
  else:
    ax_eps.text(0.5, 0.5, 'non-private run\n(epsilon = inf)',
                ha='center', va='center', transform=ax_eps.transAxes)
  ax_eps.set_xlabel('step')
  ax_eps.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)


def privacy_utility_points(
    runs: Sequence[dict[str, float | str]],
) -> dict[str, list[tuple[float, float, float, float]]]:
  """Groups runs into ``{series: [(epsilon, mean, min, max) accuracy (%)]}``.

  Args:
    runs: one dict per training run with ``epsilon`` (the run's guarantee),
      ``test_accuracy`` (a fraction) and optionally ``series`` (a label:
      method, config). Runs of a series with the same epsilon are seeds.

  >>> privacy_utility_points([
  ...     {'epsilon': 1.0, 'test_accuracy': 0.8},
  ...     {'epsilon': 1.0, 'test_accuracy': 0.9},
  ...     {'epsilon': 4.0, 'test_accuracy': 0.95}])
  {'': [(1.0, 85.0, 80.0, 90.0), (4.0, 95.0, 95.0, 95.0)]}
  """
  series = collections.defaultdict(lambda: collections.defaultdict(list))
  for run in runs:
    series[str(run.get('series', ''))][float(run['epsilon'])].append(
        round(100 * float(run['test_accuracy']), 6))
  return {
      label: [(e, round(sum(a) / len(a), 6), min(a), max(a))
              for e, a in sorted(by_eps.items())]
      for label, by_eps in sorted(series.items())}


def plot_privacy_utility(runs: Sequence[dict[str, float | str]], path: str,
                         title: str = '') -> None:
  """Test accuracy against epsilon: one line per series, mean over seeds.

  The line goes through the mean of a series' runs at each epsilon and a bar
  spans their minimum to maximum (see :func:`privacy_utility_points`).

  Args:
    runs: one dict per training run with ``epsilon``, ``test_accuracy`` and
      optionally ``series``.
    path: the PNG to write (atomically).
    title: figure title.
  """
  points = privacy_utility_points(runs)
  fig = figure_lib.Figure(figsize=(5.5, 4))
  ax = fig.subplots()
  for label, rows in points.items():
    eps, mean, lo, hi = zip(*rows)
    ax.errorbar(eps, mean, marker='o', capsize=3, label=label or None,
                yerr=[[m - l for m, l in zip(mean, lo)],
                      [h - m for m, h in zip(mean, hi)]])
  if any(points):
    ax.legend()
  ax.set_xscale('log')
  # Label exactly the swept epsilons, as plain numbers.
  ax.set_xticks(sorted({e for rows in points.values() for e, *_ in rows}))
  ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%.3g'))
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.set_xlabel('epsilon')
  ax.set_ylabel('test accuracy (%)')
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  _save(fig, path)


def _save(fig, path: str) -> None:
  """Writes ``fig`` to ``path`` atomically."""
  tmp = os.path.join(os.path.dirname(path) or '.',
                     f'.{os.getpid()}.{os.path.basename(path)}')
  fig.savefig(tmp, dpi=110, format=os.path.splitext(path)[1][1:] or 'png')
  os.replace(tmp, path)
