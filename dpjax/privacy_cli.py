"""``dpjax-privacy``: epsilon of a DP-SGD run, or the noise for a target epsilon.

Like TF Privacy's ``compute_dp_sgd_privacy``, for Poisson-sampled DP-SGD::

    dpjax-privacy --dataset-size 60000 --batch-size 256 \
        --noise-multiplier 1.1 --epochs 60 --delta 1e-5
    dpjax-privacy --dataset-size 50000 --batch-size 4096 --steps 2500 \
        --target-epsilon 8 --accountant pld
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from dpjax import accounting


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='dpjax-privacy',
      description='Privacy of Poisson-sampled DP-SGD (subsampled Gaussian).')
  p.add_argument('--dataset-size', '-N', type=int, required=True,
                 help='number of training examples N')
  p.add_argument('--batch-size', '-B', type=float, required=True,
                 help='expected batch size; sampling rate q = B / N')
  noise = p.add_mutually_exclusive_group(required=True)
  noise.add_argument('--noise-multiplier', type=float,
                     help='sigma: noise std / clip norm')
  noise.add_argument('--target-epsilon', type=float,
                     help='find the smallest sigma reaching this epsilon')
  length = p.add_mutually_exclusive_group(required=True)
  length.add_argument('--epochs', type=float, help='passes over the data')
  length.add_argument('--steps', type=int, help='number of steps')
  p.add_argument('--delta', type=float, default=1e-5, help='default 1e-5')
  p.add_argument('--accountant', choices=('rdp', 'pld', 'both'),
                 default='rdp', help="default 'rdp'")
  p.add_argument('--pld-discretization', type=float,
                 default=accounting.DEFAULT_PLD_DISCRETIZATION,
                 help='PLD value discretization interval (default 1e-4)')
  p.add_argument('--json', action='store_true', help='print JSON')
  return p


def compute(args: argparse.Namespace) -> dict:
  """The result of one invocation as a dict (raises ValueError on bad input)."""
  q = accounting.sampling_rate(args.batch_size, args.dataset_size)
  accounting.check_delta(args.delta, args.dataset_size)
  steps = (args.steps if args.steps is not None
           else accounting.steps_for_epochs(args.epochs, q))
  kinds = ('rdp', 'pld') if args.accountant == 'both' else (args.accountant,)
  result = {'dataset_size': args.dataset_size, 'batch_size': args.batch_size,
            'sampling_rate': q, 'steps': steps, 'delta': args.delta}
  for kind in kinds:
    if args.target_epsilon is not None:
      result[f'noise_multiplier_{kind}'] = accounting.calibrate_noise_multiplier(
          args.target_epsilon, args.delta, q, steps, kind,
          pld_discretization=args.pld_discretization)
    else:
      result[f'epsilon_{kind}'] = accounting.epsilon(
          accounting.dpsgd_event(args.noise_multiplier, q, steps), args.delta,
          kind, pld_discretization=args.pld_discretization)
  if args.target_epsilon is not None:
    result['target_epsilon'] = args.target_epsilon
  else:
    result['noise_multiplier'] = args.noise_multiplier
  return result


def format_result(result: dict) -> str:
  head = (f"DP-SGD with Poisson sampling rate q = {result['sampling_rate']:.5g}"
          f" (N={result['dataset_size']}, expected batch"
          f" {result['batch_size']:g}) over {result['steps']} steps, delta ="
          f" {result['delta']:g}:")
  lines = [head]
  for kind in ('rdp', 'pld'):
    if f'epsilon_{kind}' in result:
      lines.append(f"  noise multiplier {result['noise_multiplier']:g} ->"
                   f" epsilon = {result[f'epsilon_{kind}']:.4f}"
                   f' ({kind.upper()} accountant)')
    if f'noise_multiplier_{kind}' in result:
      lines.append(f"  target epsilon {result['target_epsilon']:g} -> noise"
                   f" multiplier = {result[f'noise_multiplier_{kind}']:.4f}"
                   f' ({kind.upper()} accountant)')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    result = compute(args)
  except (ValueError, TypeError) as e:
    parser.error(str(e))
  print(json.dumps(result, indent=2) if args.json else format_result(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
