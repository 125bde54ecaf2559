"""Training plots written beside summary.json."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def plot_training(history: dict[str, list[float]], path: str,
                  title: str = '') -> None:
  """Test accuracy and epsilon spent against training steps, side by side.

  Parameter averages (``test_accuracy_ema``, ``test_accuracy_polyak``) are
  drawn beside the raw parameters' accuracy. The file is written atomically.
  """
  fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.8))
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
  tmp = os.path.join(os.path.dirname(path) or '.',
                     f'.{os.getpid()}.{os.path.basename(path)}')
  fig.savefig(tmp, dpi=110, format=os.path.splitext(path)[1][1:] or 'png')
  os.replace(tmp, path)
  plt.close(fig)
