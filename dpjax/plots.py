"""Training plots written beside summary.json."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def plot_training(history: dict[str, list[float]], path: str,
                  title: str = '') -> None:
  """Test accuracy and epsilon spent against training steps, side by side."""
  fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.8))
  steps = history['step']
  ax_acc.plot(steps, [100 * a for a in history['test_accuracy']], marker='o')
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
  fig.savefig(path, dpi=110)
  plt.close(fig)
