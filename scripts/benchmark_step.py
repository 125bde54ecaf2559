"""Times the jitted DP-SGD step against the non-private step of the same model.

Both steps include the optimizer update and run on the same batch. Reported:
median milliseconds per step after warm-up, the ratio DP / non-private, and
peak memory of each compiled step (XLA's buffer assignment: arguments + outputs
+ temporaries; on GPU also the allocator's peak).

    python scripts/benchmark_step.py --models mnist_cnn cifar_cnn --batch-size 256
    python scripts/benchmark_step.py --secure-noise   # + the DP step with secure noise

With ``--secure-noise`` the DP step is also timed with
``add_gaussian_noise(..., secure=True)`` (four Gaussian draws per coordinate,
Holohan & Braghin 2021), right after the plain one, and the ratio reported.
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

MODELS = {
    'mnist_cnn': ('tanh_cnn', (28, 28, 1)),
    'cifar_cnn': ('cifar_tanh_cnn', (32, 32, 3)),
}


def _loss_fn(model):
  def loss_fn(params, example):
    logits = model.apply({'params': params}, example['image'][None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, example['label'])
  return loss_fn


def build_steps(model, microbatch_size, secure=False):
  """(non-private step, DP step), each ``(params, opt_state, batch, mask)``."""
  loss_fn = _loss_fn(model)
  optimizer = optax.sgd(0.1, momentum=0.9)
  clip = dpjax.clip_per_example(1.0)
  dp_tx = optax.chain(
      dpjax.add_gaussian_noise(1.0, clip.sensitivity(), 256.0, key=0,
                               secure=secure),
      optimizer)
  grad_fn = dpjax.clipped_grad(loss_fn, clip, microbatch_size=microbatch_size)

  def nonprivate(params, opt_state, batch, mask):
    def mean_loss(p):
      losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)
      return jnp.sum(jnp.where(mask, losses, 0)) / jnp.maximum(mask.sum(), 1)
    grads = jax.grad(mean_loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def private(params, opt_state, batch, mask):
    out = grad_fn(params, batch, mask)
    updates, opt_state = dp_tx.update(out.grad_sum, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return (jax.jit(nonprivate), optimizer), (jax.jit(private), dp_tx)


def peak_bytes(jitted, *args) -> int:
  analysis = jitted.lower(*args).compile().memory_analysis()
  if analysis is None:
    return -1
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def time_step(jitted, params, opt_state, batch, mask, warmup, iters):
  for _ in range(warmup):
    params, opt_state = jitted(params, opt_state, batch, mask)
  jax.block_until_ready(params)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    params, opt_state = jitted(params, opt_state, batch, mask)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def benchmark(name, batch_size, microbatch_size, warmup, iters,
              secure_noise=False):
  model_name, shape = MODELS[name]
  model = models.get_model(model_name, 10)
  rng = np.random.default_rng(0)
  batch = {
      'image': jnp.asarray(rng.normal(size=(batch_size,) + shape), jnp.float32),
      'label': jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
  }
  mask = jnp.ones(batch_size, bool)
  params = model.init(jax.random.key(0), batch['image'][:1])['params']
  (nonprivate, opt), (private, dp_tx) = build_steps(model, microbatch_size)
  variants = [('nonprivate', nonprivate, opt), ('dp', private, dp_tx)]
  if secure_noise:
    _, (secure, secure_tx) = build_steps(model, microbatch_size, secure=True)
    variants.append(('dp_secure', secure, secure_tx))
  result = {'model': name, 'batch_size': batch_size,
            'microbatch_size': microbatch_size,
            'num_params': sum(x.size for x in jax.tree.leaves(params))}
  for label, step, tx in variants:
    opt_state = tx.init(params)
    result[f'{label}_peak_mb'] = peak_bytes(
        step, params, opt_state, batch, mask) / 2**20
    result[f'{label}_ms'] = time_step(step, params, opt_state, batch, mask,
                                      warmup, iters)
  result['time_ratio'] = result['dp_ms'] / result['nonprivate_ms']
  result['memory_ratio'] = result['dp_peak_mb'] / result['nonprivate_peak_mb']
  if secure_noise:
    result['secure_ratio'] = result['dp_secure_ms'] / result['dp_ms']
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=list(MODELS),
                      choices=list(MODELS))
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--microbatch-size', type=int, default=None)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=20)
  parser.add_argument('--secure-noise', action='store_true',
                      help='also time the DP step with secure noise')
  parser.add_argument('--json', help='also write the results to this file')
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f'# {device.platform} {device.device_kind}, {jax.device_count()}'
        f' device(s), jax {jax.__version__}, {platform.processor() or ""}')
  print('| model | params | B | microbatch | non-private ms | DP ms |'
        ' DP / non-private | peak MB non-private | peak MB DP | memory ratio |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  results = []
  for name in args.models:
    r = benchmark(name, args.batch_size, args.microbatch_size, args.warmup,
                  args.iters, args.secure_noise)
    results.append(r)
    print(f"| {r['model']} | {r['num_params']} | {r['batch_size']} |"
          f" {r['microbatch_size'] or 'none'} | {r['nonprivate_ms']:.1f} |"
          f" {r['dp_ms']:.1f} | {r['time_ratio']:.2f}x |"
          f" {r['nonprivate_peak_mb']:.1f} | {r['dp_peak_mb']:.1f} |"
          f" {r['memory_ratio']:.2f}x |", flush=True)
    if args.secure_noise:
      print(f"|   secure noise | | | | | {r['dp_secure_ms']:.1f} |"
            f" secure / plain DP: {r['secure_ratio']:.2f}x | |"
            f" {r['dp_secure_peak_mb']:.1f} | |", flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
