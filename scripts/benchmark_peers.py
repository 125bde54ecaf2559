"""DP-SGD step time and memory: dpjax's routes against non-private and peers.

One run, same model, batch and machine: non-private JAX, dpjax with each
clipping route (vmap, bookkeeping, ghost), optax.contrib.dpsgd, jax_privacy's
``clipped_grad`` and Opacus (hooks and ghost clipping) with non-private torch.
Every variant is a full step (gradient, clipping, Gaussian noise, SGD with
momentum) on a fixed batch, run in its own process with its own interpreter
(peers from a separate virtual environment, ``--peer-python``); the variants
are timed round-robin, one step each per round, so load from other processes
on a shared machine hits all of them alike. Reported: median wall and CPU
milliseconds per step, throughput ratios, and peak memory (XLA's buffer
assignment of the compiled step for JAX, and the process's peak RSS growth
during the steps for everything). Peers that are not installed are skipped
with a message.

    python scripts/benchmark_peers.py --models mnist_cnn cifar_cnn \\
        --peer-python /work/venv-peers/bin/python --iters 20
    python scripts/benchmark_peers.py --variants jax-nonprivate dpjax-vmap \\
        dpjax-bookkeeping dpjax-ghost --dpjax-clipping per_layer

A peer environment (never the one dpjax's tests run in):

    python3 -m venv /work/venv-peers
    /work/venv-peers/bin/pip install jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 \\
        optax==0.2.8 jax-privacy
    /work/venv-peers/bin/pip install torch==2.13.0
    /work/venv-peers/bin/pip install opacus --no-deps
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    'mnist_cnn': ('tanh_cnn', (28, 28, 1)),
    'cifar_cnn': ('cifar_tanh_cnn', (32, 32, 3)),
}
# name -> (runs in the peer interpreter?, description)
VARIANTS = {
    'jax-nonprivate': (False, 'JAX non-private'),
    'dpjax-vmap': (False, 'dpjax vmap'),
    'dpjax-bookkeeping': (False, 'dpjax bookkeeping'),
    'dpjax-ghost': (False, 'dpjax ghost'),
    'optax-dpsgd': (False, 'optax.contrib.dpsgd'),
    'jax_privacy': (True, 'jax_privacy 2 clipped_grad'),
    'torch-nonprivate': (True, 'torch non-private'),
    'opacus': (True, 'Opacus (hooks)'),
    'opacus-ghost': (True, 'Opacus ghost clipping'),
}
CLIP, SIGMA, LR, MOMENTUM = 1.0, 1.0, 0.1, 0.9


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------
# Workers: build one variant's step, then run one step per 'step' command.


def _load_models_module():
  # Only dpjax/models.py (flax and jax): peers' environments need not hold
  # dpjax's other dependencies.
  spec = importlib.util.spec_from_file_location(
      '_dpjax_models', os.path.join(REPO, 'dpjax', 'models.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclasses look it up
  spec.loader.exec_module(module)
  return module


def _jax_step(variant, model_name, shape, batch_size, clipping='flat'):
  """(step() -> None, info) for a JAX variant."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  models = _load_models_module()
  model = models.MODELS[model_name](num_classes=10)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch_size,) + shape), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
  params = model.init(jax.random.key(0), images[:1])['params']
  sgd = optax.sgd(LR, momentum=MOMENTUM)

  def loss_fn(p, example):
    logits = model.apply({'params': p}, example['image'][None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, example['label'])

  def noisy_update(grad_sum, key, opt_state, p):
    leaves, treedef = jax.tree.flatten(grad_sum)
    keys = jax.random.split(key, len(leaves))
    noisy = [(g + SIGMA * CLIP * jax.random.normal(k, g.shape)) / batch_size
             for g, k in zip(leaves, keys)]
    updates, opt_state = sgd.update(jax.tree.unflatten(treedef, noisy),
                                    opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  tx = sgd
  if variant == 'jax-nonprivate':
    def step(p, opt_state, key, images, labels):
      del key
      def mean_loss(p):
        losses = jax.vmap(loss_fn, in_axes=(None, 0))(
            p, {'image': images, 'label': labels})
        return jnp.mean(losses)
      updates, opt_state = sgd.update(jax.grad(mean_loss)(p), opt_state, p)
      return optax.apply_updates(p, updates), opt_state
  elif variant.startswith('dpjax-'):
    sys.path.insert(0, REPO)
    import dpjax
    from dpjax import ghost
    route = variant.split('-', 1)[1]
    clip = (dpjax.clip_per_example(CLIP) if clipping == 'flat'
            else dpjax.clip_per_layer(clip_norm=CLIP, groups='module'))
    grad_fn = ghost.clipped_grad_for_route(route, loss_fn, clip)
    def step(p, opt_state, key, images, labels):
      # Every row is a real example: the fixed batch has no padding.
      out = grad_fn(p, {'image': images, 'label': labels}, None)
      return noisy_update(out.grad_sum, key, opt_state, p)
  elif variant == 'optax-dpsgd':
    tx = optax.contrib.dpsgd(LR, CLIP, SIGMA, seed=0, momentum=MOMENTUM)
    def step(p, opt_state, key, images, labels):
      del key
      grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(
          p, {'image': images, 'label': labels})
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state
  elif variant == 'jax_privacy':
    from jax_privacy import clipping as jp_clipping
    def batch_loss(p, images, labels):  # images [1, ...]: keep_batch_dim
      logits = model.apply({'params': p}, images)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).sum()
    grad_fn = jp_clipping.clipped_grad(batch_loss, l2_clip_norm=CLIP,
                                       batch_argnums=(1, 2))
    def step(p, opt_state, key, images, labels):
      return noisy_update(grad_fn(p, images, labels), key, opt_state, p)
  else:
    raise ValueError(variant)

  jitted = jax.jit(step)
  state = {'params': params, 'opt': tx.init(params), 'key': jax.random.key(1)}
  args = (state['params'], state['opt'], state['key'], images, labels)
  analysis = jitted.lower(*args).compile().memory_analysis()
  xla_mb = None if analysis is None else (
      analysis.argument_size_in_bytes + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes) / 2**20

  def run():
    state['key'], key = jax.random.split(state['key'])
    state['params'], state['opt'] = jitted(state['params'], state['opt'], key,
                                           images, labels)
    jax.block_until_ready(state['params'])

  return run, {'xla_peak_mb': xla_mb,
               'num_params': int(sum(x.size for x in jax.tree.leaves(params)))}


def _torch_model(model_name, nn):
  if model_name == 'tanh_cnn':
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.Tanh(),
        nn.MaxPool2d(2, 1), nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(),
        nn.MaxPool2d(2, 1), nn.Flatten(), nn.Linear(512, 32), nn.Tanh(),
        nn.Linear(32, 10))
  layers, c = [], 3
  for f in (32, 64, 128):
    layers += [nn.Conv2d(c, f, 3, padding=1), nn.Tanh(),
               nn.Conv2d(f, f, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2, 2)]
    c = f
  return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 128),
                       nn.Tanh(), nn.Linear(128, 10))


def _torch_step(variant, model_name, shape, batch_size):
  """(step() -> None, info) for torch / Opacus."""
  import torch
  from torch import nn
  torch.manual_seed(0)
  model = _torch_model(model_name, nn)
  h, w, c = shape
  images = torch.randn(batch_size, c, h, w)
  labels = torch.randint(0, 10, (batch_size,))
  optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  criterion = nn.CrossEntropyLoss()
  if variant != 'torch-nonprivate':
    import opacus
    import warnings
    warnings.simplefilter('ignore')
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=batch_size)
    engine = opacus.PrivacyEngine()
    kwargs = dict(module=model, optimizer=optimizer, data_loader=loader,
                  noise_multiplier=SIGMA, max_grad_norm=CLIP,
                  poisson_sampling=False)
    if variant == 'opacus-ghost':
      model, optimizer, criterion, _ = engine.make_private(
          criterion=criterion, grad_sample_mode='ghost', **kwargs)
    else:
      model, optimizer, _ = engine.make_private(**kwargs)

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(images), labels)
    loss.backward()
    optimizer.step()

  num = sum(p.numel() for p in model.parameters())
  return run, {'xla_peak_mb': None, 'num_params': int(num)}


def worker(variant, model, batch_size, warmup, clipping='flat'):
  """Builds one step, then answers 'step' lines with 'wall cpu' seconds."""
  model_name, shape = MODELS[model]
  base = _rss_mb()
  try:
    if variant.startswith(('torch', 'opacus')):
      run, info = _torch_step(variant, model_name, shape, batch_size)
    else:
      run, info = _jax_step(variant, model_name, shape, batch_size, clipping)
  except ImportError as e:
    print(f'SKIP {variant}: {e}', flush=True)
    return
  for _ in range(warmup):
    run()
  before = _rss_mb()
  print('READY ' + json.dumps(info), flush=True)
  for line in sys.stdin:
    if line.strip() != 'step':
      break
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    print(f'{time.perf_counter() - t0} {time.process_time() - c0}',
          flush=True)
  print('DONE ' + json.dumps({'rss_peak_mb': _rss_mb() - base,
                              'rss_after_warmup_mb': before - base}),
        flush=True)


# ---------------------------------------------------------------------------
# Driver.


def _start(variant, model, args):
  in_peer_env = VARIANTS[variant][0]
  python = args.peer_python if in_peer_env else sys.executable
  if not python or not os.path.exists(python):
    return None, f'no peer interpreter ({python!r}); pass --peer-python'
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen(
      [python, os.path.abspath(__file__), '--worker', variant, '--models',
       model, '--batch-size', str(args.batch_size), '--warmup',
       str(args.warmup), '--dpjax-clipping', args.dpjax_clipping],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=env)
  line = proc.stdout.readline()
  if line.startswith('READY '):
    return proc, json.loads(line[6:])
  proc.kill()
  err = proc.stderr.read().strip().splitlines()
  reason = line.strip() or (err[-1] if err else 'no output')
  return None, reason


def bench_model(model, args):
  procs, infos, rows = {}, {}, {}
  for variant in args.variants:
    proc, info = _start(variant, model, args)
    if proc is None:
      print(f'# {model}: skipped {variant}: {info}', file=sys.stderr,
            flush=True)
      continue
    procs[variant], infos[variant] = proc, info
  times = {v: ([], []) for v in procs}
  for _ in range(args.iters):
    for v, proc in procs.items():  # round-robin: one step each per round
      proc.stdin.write('step\n')
      proc.stdin.flush()
      wall, cpu = map(float, proc.stdout.readline().split())
      times[v][0].append(wall)
      times[v][1].append(cpu)
  for v, proc in procs.items():
    proc.stdin.write('quit\n')
    proc.stdin.flush()
    done = json.loads(proc.stdout.readline()[5:])
    proc.wait()
    med = lambda x: 1e3 * statistics.median(x) if x else None
    rows[v] = dict(infos[v], **done, wall_ms=med(times[v][0]),
                   cpu_ms=med(times[v][1]))
  return rows


def _fmt(x, spec='.1f'):
  return '-' if x is None else format(x, spec)


def report(model, rows, batch_size):
  timed = {v: r for v, r in rows.items() if r['wall_ms'] is not None}
  base = timed.get('jax-nonprivate')
  best = min((r['wall_ms'], v) for v, r in timed.items()
             if v.startswith('dpjax-')) if any(
                 v.startswith('dpjax-') for v in timed) else None
  print(f'\n### {model}, B={batch_size}\n')
  print('| variant | ms/step (wall) | ms/step (CPU) | / JAX non-private'
        ' (wall, CPU) | fastest dpjax speed-up (wall, CPU) | XLA peak MB |'
        ' peak RSS growth MB |')
  print('|---|---|---|---|---|---|---|')
  for v, r in rows.items():
    if r['wall_ms'] is None:  # --iters 0: memory only
      print(f"| {VARIANTS[v][1]} | - | - | - | - | {_fmt(r['xla_peak_mb'])} |"
            ' - |', flush=True)
      continue
    rel = '-' if base is None else (
        f"{r['wall_ms'] / base['wall_ms']:.2f}x,"
        f" {r['cpu_ms'] / base['cpu_ms']:.2f}x")
    speed = '-'
    if best is not None:
      b = rows[best[1]]
      speed = (f"{r['wall_ms'] / b['wall_ms']:.2f}x,"
               f" {r['cpu_ms'] / b['cpu_ms']:.2f}x")
    print(f"| {VARIANTS[v][1]} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} |"
          f" {rel} | {speed} | {_fmt(r['xla_peak_mb'])} |"
          f" {_fmt(r['rss_peak_mb'])} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=list(MODELS),
                      choices=list(MODELS))
  parser.add_argument('--variants', nargs='+', default=list(VARIANTS),
                      choices=list(VARIANTS))
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=20,
                      help='timed steps per variant (0: XLA memory only)')
  parser.add_argument('--peer-python',
                      default=os.environ.get('DPJAX_PEER_PYTHON',
                                             '/work/venv-peers/bin/python'),
                      help='interpreter with jax_privacy, torch and opacus')
  parser.add_argument('--dpjax-clipping', default='flat',
                      choices=('flat', 'per_layer'),
                      help="dpjax's clipping: flat, or per layer (one group"
                      ' per module); the peers always clip flat')
  parser.add_argument('--json', help='also write the results to this file')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker, args.models[0], args.batch_size, args.warmup,
           args.dpjax_clipping)
    return
  import platform
  print(f'# {platform.machine()}, {os.cpu_count()} CPUs, python'
        f' {platform.python_version()}, {args.iters} interleaved steps per'
        ' variant, medians')
  results = {}
  for model in args.models:
    results[model] = bench_model(model, args)
    report(model, results[model], args.batch_size)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
