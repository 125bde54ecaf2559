"""Times dpjax-train's whole logical step, DP against non-private.

The step ``train.make_train_step`` builds (the one ``dpjax-train`` runs:
gather, engine, noise, optimizer, averages), on a fixed Poisson-sized batch
of random images, for the MNIST and CIFAR-10 tanh CNNs. Reported: median
milliseconds per step after warm-up and the ratio DP / non-private. Only
the stable ``dpjax.train`` API is used, so the same script times another
checkout (``PYTHONPATH=<checkout>``), e.g. main before a refactor:

    python scripts/benchmark_train_step.py --iters 10
    PYTHONPATH=/path/to/old/checkout python scripts/benchmark_train_step.py

The first line printed is a sanity line (the non-private step alone): a run
whose sanity line moves between checkouts was disturbed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpjax
from dpjax import models
from dpjax import train

MODELS = {
    'mnist_cnn': ('tanh_cnn', (28, 28, 1)),
    'cifar_cnn': ('cifar_tanh_cnn', (32, 32, 3)),
    # Tramer & Boneh's CNN on CIFAR-10's ScatterNet features (8x8x243).
    'scatter_cnn_tb': ('scatter_cnn_tb', (8, 8, 243)),
}


def _steps(model, shape, batch_size, route, microbatch_size=None):
  """{'nonprivate': (step, state), 'dp': (step, state)}."""
  n = 4 * batch_size
  plan = dpjax.make_plan(
      dpjax.PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0,
                          expected_batch_size=batch_size, steps=1000),
      n, keys=dpjax.KeySchedule(0, 1))
  optimizer = optax.sgd(0.1, momentum=0.9)
  out = {}
  for name, step_plan, tx in (
      ('nonprivate', None, optimizer),
      ('dp', plan, optax.chain(plan.noise(), optimizer))):
    state = train.create_train_state(model, jax.random.key(0), shape, tx)
    step = train.make_train_step(model, step_plan, grad_route=route,
                                 microbatch_size=microbatch_size)
    out[name] = (step, state)
  return out


def _time(step, state, data, warmup, iters):
  for _ in range(warmup):
    state, _ = step(state, *data)
  jax.block_until_ready(state.params)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    state, _ = step(state, *data)
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def benchmark(name, batch_size, route, warmup, iters, microbatch_size=None):
  model_name, shape = MODELS[name]
  model = models.get_model(model_name, 10)
  rng = np.random.default_rng(0)
  n = 4 * batch_size
  images = jnp.asarray(rng.normal(size=(n,) + shape), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
  indices = jnp.arange(batch_size, dtype=jnp.int32)
  mask = jnp.ones(batch_size, bool)
  data = (images, labels, indices, mask)
  result = {'model': name, 'batch_size': batch_size, 'route': route,
            'microbatch_size': microbatch_size}
  for label, (step, state) in _steps(model, shape, batch_size, route,
                                     microbatch_size).items():
    result[f'{label}_ms'] = _time(step, state, data, warmup, iters)
  result['ratio'] = result['dp_ms'] / result['nonprivate_ms']
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=list(MODELS),
                      choices=list(MODELS))
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--route', default='vmap',
                      help="perf.grad_route ('vmap', 'bookkeeping', ...)")
  parser.add_argument('--microbatch-size', type=int, default=None,
                      help='perf.microbatch_size (default: the whole batch)')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--json', help='also write the results to this file')
  args = parser.parse_args()
  print(f'# dpjax from {dpjax.__file__}; jax {jax.__version__};'
        f' {platform.processor() or platform.machine()};'
        f' devices {jax.devices()}', flush=True)
  results = []
  for name in args.models:
    r = benchmark(name, args.batch_size, args.route, args.warmup, args.iters,
                  args.microbatch_size)
    results.append(r)
    print(f"{name} B={r['batch_size']} microbatch={r['microbatch_size']}"
          f" route={r['route']}: non-private"
          f" {r['nonprivate_ms']:.1f} ms, DP {r['dp_ms']:.1f} ms,"
          f" DP / non-private {r['ratio']:.2f}x", flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
