"""Times the DP step of the zoo's ViT and decoder transformer on each route.

For each model: the non-private step (mean loss, SGD with momentum) and the
DP-SGD step (flat clipping, Gaussian noise, the same optimizer) by the
'vmap', 'ghost' (the 'memory' policy: norms inside one backward, then one
weighted backward) and 'bookkeeping' routes, one after another on the same
batch, each with warm-up and the median of the timed steps; then XLA's
buffer assignment of each compiled step (arguments + outputs + temporaries)
at every ``--memory-batch-size``. Reported: ms/step, DP / non-private, the
speed-up over vmap, and the memory ratios.

    python scripts/benchmark_transformers.py --batch-size 256 --iters 10
    python scripts/benchmark_transformers.py --iters 0 --memory-batch-size 256 1024
    python scripts/benchmark_transformers.py --check   # tiny, any load

Timings need an otherwise idle machine: the script refuses to time while the
1-minute load average exceeds the cores, and times the non-private step again
at the end (the sanity line: a disturbed run shows as a drift between the
two).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dpjax  # pylint: disable=g-import-not-at-top
from dpjax import ghost  # pylint: disable=g-import-not-at-top
from dpjax import models  # pylint: disable=g-import-not-at-top
from dpjax.training import features  # pylint: disable=g-import-not-at-top
from scripts.benchmark_step import time_step  # pylint: disable=g-import-not-at-top

ROUTES = ('vmap', 'ghost', 'bookkeeping')
VOCAB, LENGTH = 256, 64


def make_model(name: str):
  """(model, one example) of the benchmark's two models."""
  if name.startswith('vit'):
    model = models.get_model('vit_small' if name == 'vit_small' else
                             'vit_tiny', 10)
    return model, {'image': jnp.ones((32, 32, 3)), 'label': jnp.int32(0)}
  model = models.get_model('transformer_tiny', VOCAB, vocab_size=VOCAB,
                           max_length=LENGTH, pool='none')
  tokens = jnp.arange(LENGTH, dtype=jnp.int32) % VOCAB
  return model, {'tokens': tokens, 'label': tokens}


def make_batch(example, batch_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  if 'image' in example:
    return {'image': jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)),
                                 jnp.float32),
            'label': jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  tokens = jnp.asarray(rng.integers(0, VOCAB, (batch_size, LENGTH)),
                       jnp.int32)
  return {'tokens': tokens, 'label': jnp.roll(tokens, -1, axis=1)}


def build_steps(model, example, batch_size: int):
  """{'nonprivate' | route: jitted step(params, opt_state, batch, mask)}."""
  loss_fn = features.example_loss(model)
  optimizer = optax.sgd(0.1, momentum=0.9)
  clip = dpjax.clip_per_example(1.0)
  noise = dpjax.add_gaussian_noise(1.0, clip.sensitivity(),
                                   float(batch_size), key=0)

  def nonprivate(params, opt_state, batch, mask):
    def mean_loss(p):
      losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)
      return jnp.sum(jnp.where(mask, losses, 0)) / batch_size
    grads = jax.grad(mean_loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def private(route):
    grad_fn = ghost.clipped_grad_for_route(route, loss_fn, clip)

    def step(params, state, batch, mask):
      opt_state, noise_state = state
      out = grad_fn(params, batch, mask)
      grads, noise_state = noise.update(out.grad_sum, noise_state)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), (opt_state, noise_state)
    return step

  steps = {'nonprivate': nonprivate}
  steps.update({route: private(route) for route in ROUTES})
  return {k: jax.jit(v) for k, v in steps.items()}, noise


def initial(model, example, noise):
  """(params, non-private optimizer state, DP step state)."""
  field = 'image' if 'image' in example else 'tokens'
  params = model.init(jax.random.key(0), example[field][None])['params']
  opt_state = optax.sgd(0.1, momentum=0.9).init(params)
  return params, opt_state, (opt_state, noise.init(params))


def peak_mb(step, *args) -> float:
  analysis = step.lower(*args).compile().memory_analysis()
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          + analysis.temp_size_in_bytes) / 2 ** 20


def benchmark(name: str, args) -> None:
  model, example = make_model(name)
  steps, noise = build_steps(model, example, args.batch_size)
  params, opt_state, dp_state = initial(model, example, noise)
  size = sum(x.size for x in jax.tree.leaves(params))
  print(f'\n### {name} ({size:,} parameters)\n')
  if args.iters:
    _time_routes(name, steps, params, opt_state, dp_state, args)
  if args.cost:
    _cost(steps, params, opt_state, dp_state, example, args.batch_size)
  for b in args.memory_batch_size:
    steps_b, _ = build_steps(model, example, b)
    batch_b, mask_b = make_batch(example, b), jnp.ones(b, bool)
    mb = {v: peak_mb(s, params, opt_state if v == 'nonprivate' else dp_state,
                     batch_b, mask_b) for v, s in steps_b.items()}
    print(f'\nXLA peak MB at B={b}: ' + ', '.join(
        f'{v} {m:.1f} ({m / mb["nonprivate"]:.2f}x)' for v, m in mb.items()),
          flush=True)


def _cost(steps, params, opt_state, dp_state, example, batch_size) -> None:
  """XLA's flop and byte counts of each compiled step (load-independent)."""
  batch, mask = make_batch(example, batch_size), jnp.ones(batch_size, bool)
  cost = {}
  for variant, step in steps.items():
    state = opt_state if variant == 'nonprivate' else dp_state
    analysis = step.lower(params, state, batch, mask).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    cost[variant] = (analysis.get('flops', 0.0),
                     analysis.get('bytes accessed', 0.0))
  flops0, bytes0 = cost['nonprivate']
  print(f'\nXLA cost at B={batch_size}: ' + ', '.join(
      f'{v} {f / 1e9:.1f} GFLOP ({f / flops0:.2f}x), {b / 1e9:.2f} GB'
      f' accessed ({b / bytes0:.2f}x)' for v, (f, b) in cost.items())
        + ". XLA counts a loop's body once: 'ghost' (its pass 1 runs in a"
        ' loop over slices) is undercounted.', flush=True)


def _time_routes(name, steps, params, opt_state, dp_state, args) -> None:
  batch = make_batch(make_model(name)[1], args.batch_size)
  mask = jnp.ones(args.batch_size, bool)
  ms = {}
  for variant, step in steps.items():
    _check_idle(args, f'before {name} / {variant}')
    state = opt_state if variant == 'nonprivate' else dp_state
    ms[variant] = time_step(step, params, state, batch, mask, args.warmup,
                            args.iters)
    print(f'# {name} / {variant}: {ms[variant]:.1f} ms', file=sys.stderr,
          flush=True)
  again = time_step(steps['nonprivate'], params, opt_state, batch, mask,
                    args.warmup, args.iters)
  print(f'sanity: non-private step {ms["nonprivate"]:.1f} ms at the start,'
        f' {again:.1f} ms at the end ({again / ms["nonprivate"]:.2f}x).\n')
  print(f'B={args.batch_size} | ms/step | DP / non-private | speed-up over'
        ' vmap |')
  print('|---|---|---|---|')
  for variant, t in ms.items():
    print(f'| {variant} | {t:.1f} | {t / ms["nonprivate"]:.2f}x |'
          f' {ms["vmap"] / t:.2f}x |' if variant != 'nonprivate' else
          f'| {variant} | {t:.1f} | 1.00x | - |', flush=True)


def _check_idle(args, where: str) -> None:
  load, cores = os.getloadavg()[0], os.cpu_count() or 1
  # A step that just ran keeps up to one unit per core in the average.
  if not args.check and load > 2 * cores:
    sys.exit(f'benchmark_transformers: refused {where}: load average'
             f' {load:.2f} on {cores} cores; other processes share the CPUs.'
             ' Rerun on an otherwise idle machine (or --check).')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=['vit', 'transformer'],
                      choices=['vit', 'vit_small', 'transformer'])
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--memory-batch-size', type=int, nargs='*',
                      default=[1024])
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--cost', action='store_true',
                      help="also XLA's flop and byte counts at --batch-size")
  parser.add_argument('--check', action='store_true',
                      help='tiny sizes at any load: not a measurement')
  args = parser.parse_args()
  if args.check:
    args.batch_size, args.memory_batch_size = 4, [8]
    args.warmup, args.iters = 1, 1
  load = os.getloadavg()[0]
  # XLA's buffer assignment (--iters 0) does not depend on the load.
  if not args.check and args.iters and load > (os.cpu_count() or 1):
    sys.exit(f'benchmark_transformers: refused at start: load average'
             f' {load:.2f}. Rerun on an otherwise idle machine (or --check).')
  print(f'# {platform.machine()}, {os.cpu_count()} cores, jax'
        f' {jax.__version__}, load average {load:.2f}; warm-up {args.warmup},'
        f' median of {args.iters} steps' + (' (CHECK RUN: not a measurement)'
                                           if args.check else ''))
  for name in args.models:
    benchmark(name, args)


if __name__ == '__main__':
  main()
