"""``dpjax-privacy``: epsilon of a DP-SGD run, or the noise for a target epsilon.

Like TF Privacy's ``compute_dp_sgd_privacy``, for Poisson-sampled DP-SGD::

    dpjax-privacy --dataset-size 60000 --batch-size 256 \
        --noise-multiplier 1.1 --epochs 60 --delta 1e-5
    dpjax-privacy --dataset-size 50000 --batch-size 4096 --steps 2500 \
        --target-epsilon 8 --accountant pld
    dpjax-privacy -N 60000 -B 256 --noise-multiplier 1.1 --epochs 60 \
        --conversion classic       # TF Privacy's legacy number: 3.01

RDP's epsilon depends on how Renyi DP is converted to (epsilon, delta): the
default is dp-accounting's improved conversion (Canonne, Kamath & Steinke
2020); ``--conversion classic`` is Mironov 2017's, with TF Privacy's legacy
orders and its step count ceil(epochs N / B), so that TF Privacy's old
``compute_dp_sgd_privacy`` numbers are reproduced. The output always says
which conversion it used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
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
  p.add_argument('--conversion', choices=accounting.RDP_CONVERSIONS,
                 default='improved',
                 help="RDP -> (epsilon, delta) conversion: 'improved' (default,"
                 " dp-accounting's) or 'classic' (Mironov 2017, TF Privacy's"
                 ' legacy compute_dp_sgd_privacy: larger epsilon)')
  p.add_argument('--pld-discretization', type=float,
                 default=accounting.DEFAULT_PLD_DISCRETIZATION,
                 help='PLD value discretization interval (default 1e-4)')
  p.add_argument('--json', action='store_true', help='print JSON')
  return p


def _classic_steps(args: argparse.Namespace) -> int:
  """TF Privacy's legacy step count: ceil(epochs N / B)."""
  if args.steps is not None:
    return args.steps
  return int(math.ceil(args.epochs * args.dataset_size / args.batch_size))


def _classic(args: argparse.Namespace, q: float, steps: int) -> dict:
  if args.target_epsilon is not None:
    return {'noise_multiplier_rdp_classic':
                accounting.calibrate_noise_multiplier_classic(
                    args.target_epsilon, args.delta, q, steps)}
  eps, order = accounting.rdp_epsilon(
      accounting.dpsgd_event(args.noise_multiplier, q, steps), args.delta,
      'classic')
  return {'epsilon_rdp_classic': eps, 'rdp_order_classic': order}


def compute(args: argparse.Namespace) -> dict:
  """The result of one invocation as a dict (raises ValueError on bad input)."""
  q = accounting.sampling_rate(args.batch_size, args.dataset_size)
  accounting.check_delta(args.delta, args.dataset_size)
  classic = args.conversion == 'classic'
  if classic and args.accountant != 'rdp':
    raise ValueError(
        f'--conversion classic converts RDP; it does not apply to the'
        f' {args.accountant!r} accountant. Use --accountant rdp.')
  steps = (args.steps if args.steps is not None
           else accounting.steps_for_epochs(args.epochs, q))
  result = {'dataset_size': args.dataset_size, 'batch_size': args.batch_size,
            'sampling_rate': q, 'steps': steps, 'delta': args.delta,
            'epochs': args.epochs, 'conversion': args.conversion}
  if args.target_epsilon is not None:
    result['target_epsilon'] = args.target_epsilon
  else:
    result['noise_multiplier'] = args.noise_multiplier
  if classic:
    result['steps'] = _classic_steps(args)
    result.update(_classic(args, q, result['steps']))
    return result
  kinds = ('rdp', 'pld') if args.accountant == 'both' else (args.accountant,)
  for kind in kinds:
    if args.target_epsilon is not None:
      result[f'noise_multiplier_{kind}'] = accounting.calibrate_noise_multiplier(
          args.target_epsilon, args.delta, q, steps, kind,
          pld_discretization=args.pld_discretization)
    else:
      result[f'epsilon_{kind}'] = accounting.epsilon(
          accounting.dpsgd_event(args.noise_multiplier, q, steps), args.delta,
          kind, pld_discretization=args.pld_discretization)
  if 'rdp' in kinds:
    # What TF Privacy's legacy tool says for the same run, for comparison.
    result['steps_classic'] = _classic_steps(args)
    result.update(_classic(args, q, result['steps_classic']))
  return result


_IMPROVED = ("dp-accounting's improved conversion (Canonne, Kamath &"
             ' Steinke 2020)')
_CLASSIC = ('the classic conversion (Mironov 2017, Prop. 3) on TF Privacy\'s'
            ' legacy orders')


def _steps_note(result: dict, steps: int) -> str:
  if result.get('epochs') is None:
    return f'{steps} steps'
  return f'{steps} steps = ceil(epochs N / B)'


def _conversion_note(result: dict) -> list[str]:
  """Which RDP conversion gave the numbers, and what the other one gives."""
  sigma_mode = 'target_epsilon' not in result
  if result['conversion'] == 'classic':
    text = (
        f'RDP -> (epsilon, delta) by {_CLASSIC}, over'
        f" {_steps_note(result, result['steps'])}, as TF Privacy's legacy"
        ' compute_dp_sgd_privacy did. The default (--conversion improved) is'
        ' a tighter bound on the same mechanism: a smaller '
        + ('epsilon.' if sigma_mode else 'noise multiplier.'))
  elif 'steps_classic' in result:
    if sigma_mode:
      other = ("TF Privacy's legacy compute_dp_sgd_privacy reports epsilon ="
               f" {result['epsilon_rdp_classic']:.4f} for this run")
    else:
      other = ("TF Privacy's legacy compute_dp_sgd_privacy needs noise"
               f" multiplier {result['noise_multiplier_rdp_classic']:.4f}")
    text = (
        f'RDP -> (epsilon, delta) by {_IMPROVED}. {other} ({_CLASSIC},'
        f" {_steps_note(result, result['steps_classic'])}): a looser bound on"
        ' the same mechanism, hence the larger number; --conversion classic'
        ' reproduces it.')
  else:
    return []
  return textwrap.wrap(text, 100)


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
  if result['conversion'] == 'classic':
    if 'epsilon_rdp_classic' in result:
      lines.append(f"  noise multiplier {result['noise_multiplier']:g} ->"
                   f" epsilon = {result['epsilon_rdp_classic']:.4f} (RDP"
                   f" accountant, classic conversion, order"
                   f" {result['rdp_order_classic']:g})")
    else:
      lines.append(f"  target epsilon {result['target_epsilon']:g} -> noise"
                   ' multiplier ='
                   f" {result['noise_multiplier_rdp_classic']:.4f} (RDP"
                   ' accountant, classic conversion)')
  return '\n'.join(lines + _conversion_note(result))


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
