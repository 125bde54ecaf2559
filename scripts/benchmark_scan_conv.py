"""Times a convolution's gradients whole and inside a scan, as microbatching runs them.

dpjax's microbatching (``perf.microbatch_size``, :func:`dpjax.per_example.
microbatched`) scans over chunks of the batch. On XLA:CPU the kernel gradient
of a convolution inside that while loop keeps its transposed dimension labels
(``f01b_i01o->01bf``) and runs on a slow generic path, where the same
convolution outside a loop is canonicalized and runs fast. This script
measures one 3x3 convolution on ScatterNet-sized inputs (8x8x243, Tramer &
Boneh's CIFAR-10 features): forward, input gradient and kernel gradient, each
on the whole batch and as a scan over two halves (the same arithmetic).

    python scripts/benchmark_scan_conv.py --batch-size 512

The forward pass is the sanity line: whole and scanned should match.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax


def _loss(kernel, x):
  y = lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jnp.sum(jnp.tanh(y))


FUNCTIONS = {
    'forward': _loss,
    'input gradient': lambda k, x: jnp.sum(jax.grad(_loss, argnums=1)(k, x)),
    'kernel gradient': lambda k, x: jnp.sum(jax.grad(_loss)(k, x)),
}


def _scanned(fn, chunks):
  def run(kernel, x):
    xs = x.reshape((chunks, -1) + x.shape[1:])
    return lax.scan(lambda c, xc: (c + fn(kernel, xc), None), 0.0, xs)[0]
  return run


def _time(fn, args, iters):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch-size', type=int, default=512)
  parser.add_argument('--channels', type=int, default=243)
  parser.add_argument('--chunks', type=int, default=2)
  parser.add_argument('--iters', type=int, default=3)
  args = parser.parse_args()
  print(f'# jax {jax.__version__}; {platform.processor() or platform.machine()};'
        f' devices {jax.devices()}', flush=True)
  x = jnp.ones((args.batch_size, 8, 8, args.channels))
  kernel = jnp.full((3, 3, args.channels, 64), 0.01)
  for name, fn in FUNCTIONS.items():
    whole = _time(fn, (kernel, x), args.iters)
    scanned = _time(_scanned(fn, args.chunks), (kernel, x), args.iters)
    print(f'{name}: whole {whole:.0f} ms, scan of {args.chunks}'
          f' {scanned:.0f} ms, scan / whole {scanned / whole:.1f}x', flush=True)


if __name__ == '__main__':
  main()
