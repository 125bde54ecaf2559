"""Times one DP-SGD logical step on 1 device against N data-parallel devices.

The step is dpjax-train's (``train.make_train_step``: per-example clipped
gradients, the psum of the clipped sums over the ``data`` mesh axis, noise
once, SGD with momentum) on the same padded batch; 1 device runs it without a
mesh. On CPU the devices are fake (``--xla_force_host_platform_device_count``,
set here before jax is imported) and share the machine's cores, so the
speed-up is bounded by the cores, not the device count. Reported: median ms
per step after warm-up and the speed-up t(1) / t(N).

    python scripts/benchmark_devices.py --devices 2 --models mnist_cnn
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', type=int, default=2)
  parser.add_argument('--models', nargs='+', default=['mnist_cnn'],
                      choices=['mnist_cnn', 'cifar_cnn'])
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=20)
  args = parser.parse_args()
  if 'jax' in sys.modules:
    raise RuntimeError('jax must not be imported before the device count.')
  if os.environ.get('JAX_PLATFORMS', 'cpu') == 'cpu':
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') +
        f' --xla_force_host_platform_device_count={args.devices}')
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import dpjax
  from dpjax import distributed
  from dpjax import models
  from dpjax import train

  shapes = {'mnist_cnn': ('tanh_cnn', (28, 28, 1)),
            'cifar_cnn': ('cifar_tanh_cnn', (32, 32, 3))}
  device = jax.devices()[0]
  print(f'# {device.platform} {device.device_kind}, {jax.device_count()}'
        f' device(s), {os.cpu_count()} cores, jax {jax.__version__},'
        f' {platform.processor() or ""}')
  print(f'| model | B | 1 device ms | {args.devices} devices ms | speed-up |')
  print('|---|---|---|---|---|')
  for name in args.models:
    model_name, shape = shapes[name]
    model = models.get_model(model_name, 10)
    n = 4 * args.batch_size
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(n,) + shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
    indices = np.arange(args.batch_size, dtype=np.int32)
    mask = np.ones(args.batch_size, bool)
    plan = dpjax.make_plan(dpjax.PrivacyConfig(
        noise_multiplier=1.0, expected_batch_size=args.batch_size, steps=1),
                           n)
    ms = {}
    for d in (1, args.devices):
      mesh = None if d == 1 else distributed.make_mesh(d)
      state = train.create_train_state(
          model, jax.random.key(0), shape,
          optax.chain(plan.noise(), optax.sgd(0.1, momentum=0.9)))
      data = (images, labels)
      if mesh is not None:
        state, data = distributed.put_replicated((state, data), mesh)
      step = train.make_train_step(model, plan, mesh=mesh)
      times = []
      for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        state, _ = step(state, *data, indices, mask)
        jax.block_until_ready(state.params)
        if i >= args.warmup:
          times.append(time.perf_counter() - start)
      ms[d] = 1e3 * statistics.median(times)
    print(f'| {name} | {args.batch_size} | {ms[1]:.1f} |'
          f' {ms[args.devices]:.1f} | {ms[1] / ms[args.devices]:.2f}x |',
          flush=True)


if __name__ == '__main__':
  main()
