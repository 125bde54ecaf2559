"""Audits dpjax's DP-SGD mechanism with gradient canaries (one training run).

For each mechanism it prints the claimed epsilon (dpjax's accountant) next to
the empirical lower bound of Steinke, Nasr & Jagielski 2023, and plots the
canary scores of included and excluded canaries. 'correct' is dpjax as
shipped; 'no_clip' and 'weak_noise' (noise / 10) are deliberately broken and
must be flagged.

    python scripts/audit.py --epsilon 2 --out docs/audit.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import dpjax  # pylint: disable=g-import-not-at-top
from dpjax import accounting  # pylint: disable=g-import-not-at-top
from dpjax import audit  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epsilon', type=float, default=2.0,
                      help='claimed epsilon (sigma is calibrated to it)')
  parser.add_argument('--delta', type=float, default=1e-5)
  parser.add_argument('--sampling-rate', type=float, default=0.5)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--canaries', type=int, default=1000)
  parser.add_argument('--guess-fraction', type=float, default=0.1)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--mechanisms', nargs='+',
                      default=['correct', 'no_clip', 'weak_noise'],
                      choices=['correct', 'no_clip', 'weak_noise'])
  parser.add_argument('--out', default='audit.png', help='histogram PNG')
  parser.add_argument('--json', help='also write the results here')
  args = parser.parse_args()

  sigma = accounting.calibrate_noise_multiplier(
      args.epsilon, args.delta, args.sampling_rate, args.steps)
  clip = dpjax.clip_per_example(1.0)
  expected_batch = args.sampling_rate * args.canaries / 2
  mechanisms = {
      'correct': dict(clipping=clip),
      'no_clip': dict(clipping=audit.unclipped(1.0)),
      'weak_noise': dict(clipping=clip, noise_tx=dpjax.add_gaussian_noise(
          sigma / 10, clip.sensitivity(), expected_batch, key=dpjax.KeySchedule(args.seed, args.seed).root(
              dpjax.keys.NOISE))),
  }
  print(f'sigma = {sigma:.3f} for epsilon = {args.epsilon} (delta ='
        f' {args.delta:g}, q = {args.sampling_rate}, {args.steps} steps)')
  print('| mechanism | claimed epsilon | lower bound (95%) | correct / guesses'
        ' | verdict |')
  print('|---|---|---|---|---|')
  fig, axes = plt.subplots(1, len(args.mechanisms),
                           figsize=(4.2 * len(args.mechanisms), 3.4))
  axes = np.atleast_1d(axes)
  results = {}
  for ax, name in zip(axes, args.mechanisms):
    r = audit.gradient_canary_audit(
        noise_multiplier=sigma, num_canaries=args.canaries,
        guess_fraction=args.guess_fraction, sampling_rate=args.sampling_rate,
        steps=args.steps, delta=args.delta, seed=args.seed, progress=True,
        **mechanisms[name])
    verdict = 'VIOLATION' if r.violation else 'consistent'
    print(f'| {name} | {r.claimed_epsilon:.3f} | {r.epsilon_lower_bound:.3f} |'
          f' {r.num_correct} / {r.num_guesses} | {verdict} |', flush=True)
    results[name] = {'claimed_epsilon': r.claimed_epsilon,
                     'epsilon_lower_bound': r.epsilon_lower_bound,
                     'num_correct': r.num_correct,
                     'num_guesses': r.num_guesses}
    bins = np.linspace(r.scores.min(), r.scores.max(), 50)
    ax.hist(r.scores[r.included], bins, alpha=0.6, label='included')
    ax.hist(r.scores[~r.included], bins, alpha=0.6, label='excluded')
    ax.set_title(f'{name}: eps_lb {r.epsilon_lower_bound:.2f} vs claimed'
                 f' {r.claimed_epsilon:.2f}', fontsize=9)
    ax.set_xlabel('canary score')
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f'wrote {args.out}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
