"""DP-SGD step time and memory: dpjax's routes against non-private and peers.

One run, same model, batch and machine: non-private JAX, dpjax with each
clipping route (vmap, bookkeeping, ghost), optax.contrib.dpsgd, jax_privacy's
``clipped_grad`` and Opacus (hooks and ghost clipping) with non-private torch.
Every variant is a full step (gradient, clipping, Gaussian noise, SGD with
momentum) on a fixed batch, run in its own process with its own interpreter
(peers from a separate virtual environment, ``--peer-python``).

The variants are timed one after another, never side by side: each process
compiles (or builds) its step, runs ``--warmup`` untimed steps, then
``--iters`` timed ones, and exits before the next variant starts. torch runs
with as many intra-op threads as there are cores (``--threads``), as XLA
does. Reported: median wall and CPU milliseconds per step, ratios, and peak
memory (XLA's buffer assignment of the compiled step for JAX, the process's
peak RSS growth for everything), and a sanity line: torch's non-private step
against JAX's, the same model and batch in two frameworks. dpjax's variants
clip flat by default; ``--dpjax-clipping per_layer`` times per-layer
clipping (one group per module) on dpjax's routes:

    python scripts/benchmark_peers.py --variants jax-nonprivate dpjax-vmap \\
        dpjax-bookkeeping dpjax-ghost --dpjax-clipping per_layer

A timing is a measurement only on an otherwise idle machine: the script
refuses to start while the 1-minute load average exceeds the core count,
and stops if it exceeds twice the core count before a variant or at the end
(the benchmark's own worker accounts for up to one per core); it refuses
fewer than 10 timed steps.
``--check`` runs anyway at any size and load, to see that every variant
builds and runs, and marks its output as not a measurement (no ``--json``).

    python scripts/benchmark_peers.py --models mnist_cnn cifar_cnn \\
        --peer-python /work/venv-peers/bin/python --iters 20
    python scripts/benchmark_peers.py --check --batch-size 8 --iters 2

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
import platform
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
    'dpjax-make-private': (False, 'dpjax make_private (auto route)'),
    'optax-dpsgd': (False, 'optax.contrib.dpsgd'),
    'jax_privacy': (True, 'jax_privacy 2 clipped_grad'),
    'torch-nonprivate': (True, 'torch non-private'),
    'opacus': (True, 'Opacus (hooks)'),
    'opacus-ghost': (True, 'Opacus ghost clipping'),
}
CLIP, SIGMA, LR, MOMENTUM = 1.0, 1.0, 0.1, 0.9
MIN_ITERS = 10  # a median of fewer steps is not a measurement


def num_cores() -> int:
  """Cores this process may run on (the affinity mask, else the CPU count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------
# Workers: build one variant's step, warm up, time it, report, exit.


def _load_models_module():
  # Only dpjax/models.py (flax and jax): peers' environments need not hold
  # dpjax's other dependencies.
  spec = importlib.util.spec_from_file_location(
      '_dpjax_models', os.path.join(REPO, 'dpjax', 'models.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclasses look it up
  spec.loader.exec_module(module)
  return module


def _make_private_step(model, sgd, images, labels):
  """The step of a loop converted by dpjax.make_private, on a fixed batch.

  The user's batch loss and their own step around ``value_and_grad``; the
  fixed batch is wrapped as the PrivateBatch that ``private.batches`` would
  hand out (every row real), so the time is the convenience layer's step.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  sys.path.insert(0, REPO)
  import dpjax
  from dpjax import private as private_lib

  def batch_loss(p, batch):
    logits = model.apply({'params': p}, batch['image'])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()

  size = len(labels)
  private = dpjax.make_private(
      batch_loss, sgd, {'image': np.asarray(images), 'label': np.asarray(labels)},
      noise_multiplier=SIGMA, clip_norm=CLIP, expected_batch_size=size,
      steps=1, delta=0.5 / size)
  index, mask = jnp.arange(size, dtype=jnp.int32), jnp.ones(size, bool)

  def step(p, opt_state, key, images, labels):
    examples = dpjax.example_keys.Indexed(
        {'image': images, 'label': labels}, index)
    # A fresh step number per call: value_and_grad refuses a second release
    # of one step (its noise would be reused).
    step_key, noise_root, dropout_key = jax.random.split(key, 3)
    step_number = jax.random.randint(step_key, (), 0,
                                     jnp.iinfo(jnp.int32).max)
    batch = private_lib.PrivateBatch(
        dpjax.Batch(examples, mask), step_number,
        dpjax.GaussianNoiseState(noise_root, step_number), dropout_key)
    _, grads = private.value_and_grad(p, batch)
    updates, opt_state = sgd.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  return step


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
  elif variant == 'dpjax-make-private':
    step = _make_private_step(model, sgd, images, labels)
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


def _torch_step(variant, model_name, shape, batch_size, threads):
  """(step() -> None, info) for torch / Opacus."""
  import torch
  from torch import nn
  torch.set_num_threads(threads)
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
  return run, {'xla_peak_mb': None, 'num_params': int(num),
               'torch_threads': torch.get_num_threads()}


def worker(variant, model, batch_size, warmup, iters, threads,
           clipping='flat'):
  """Builds one step, warms up, times ``iters`` steps; prints one RESULT line."""
  model_name, shape = MODELS[model]
  base = _rss_mb()
  try:
    if variant.startswith(('torch', 'opacus')):
      run, info = _torch_step(variant, model_name, shape, batch_size, threads)
    else:
      run, info = _jax_step(variant, model_name, shape, batch_size, clipping)
  except ImportError as e:
    print(f'SKIP {variant}: {e}', flush=True)
    return
  for _ in range(warmup):
    run()
  walls, cpus = [], []
  for _ in range(iters):
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  print('RESULT ' + json.dumps(dict(info, wall_s=walls, cpu_s=cpus,
                                    rss_peak_mb=_rss_mb() - base)),
        flush=True)


# ---------------------------------------------------------------------------
# Driver: one variant at a time.


class LoadError(RuntimeError):
  """The machine is busy: a timing now would not be a measurement."""


def check_idle(cores: int, where: str, own: int = 0) -> float:
  """The 1-minute load average; LoadError if others' load exceeds the cores.

  ``own``: the load this benchmark puts on the machine itself (a variant that
  just ran keeps up to one unit per core in the 1-minute average), allowed on
  top of the core count between variants.
  """
  load = os.getloadavg()[0]
  if load > cores + own:
    raise LoadError(
        f'load average {load:.2f} exceeds the {cores} cores {where}: other'
        ' processes would share the CPUs and the timings would not be a'
        ' measurement. Rerun on an otherwise idle machine (or pass --check to'
        ' see that the variants run, without recording numbers).')
  return load


def run_variant(variant, model, args):
  """The variant's result dict, or (None, reason) when it was skipped."""
  python = args.peer_python if VARIANTS[variant][0] else sys.executable
  if not python or not os.path.exists(python):
    return None, f'no peer interpreter ({python!r}); pass --peer-python'
  threads = str(args.threads)
  env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=threads,
             MKL_NUM_THREADS=threads)
  proc = subprocess.run(
      [python, os.path.abspath(__file__), '--worker', variant, '--models',
       model, '--batch-size', str(args.batch_size), '--warmup',
       str(args.warmup), '--iters', str(args.iters), '--threads', threads,
       '--dpjax-clipping', args.dpjax_clipping],
      capture_output=True, text=True, env=env, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith('RESULT '):
      result = json.loads(line[7:])
      med = lambda x: 1e3 * statistics.median(x) if x else None
      result.update(wall_ms=med(result['wall_s']), cpu_ms=med(result['cpu_s']))
      return result, None
    if line.startswith('SKIP '):
      return None, line[5:]
  err = proc.stderr.strip().splitlines()
  return None, err[-1] if err else f'exit code {proc.returncode}'


def bench_model(model, args, cores):
  rows = {}
  for variant in args.variants:
    load = check_idle(cores, f'before {model} / {variant}', own=cores) if (
        not args.check and args.iters > 0) else os.getloadavg()[0]
    result, reason = run_variant(variant, model, args)
    if result is None:
      print(f'# {model}: skipped {variant}: {reason}', file=sys.stderr,
            flush=True)
      continue
    rows[variant] = result
    print(f'# {model} / {variant}: {_fmt(result["wall_ms"])} ms wall,'
          f' {_fmt(result["cpu_ms"])} ms CPU (load average before:'
          f' {load:.2f})', file=sys.stderr, flush=True)
  return rows


def _fmt(x, spec='.1f'):
  return '-' if x is None else format(x, spec)


def sanity_line(rows) -> str:
  """torch's non-private step against JAX's: same model, two frameworks."""
  jax_np, torch_np = rows.get('jax-nonprivate'), rows.get('torch-nonprivate')
  if not (jax_np and torch_np and jax_np['wall_ms'] and torch_np['wall_ms']):
    return 'sanity: torch or JAX non-private not timed; no cross-check.'
  return (f"sanity: torch non-private / JAX non-private ="
          f" {torch_np['wall_ms'] / jax_np['wall_ms']:.2f}x wall,"
          f" {torch_np['cpu_ms'] / jax_np['cpu_ms']:.2f}x CPU (torch with"
          f" {torch_np.get('torch_threads')} threads). Every peer ratio below"
          ' inherits this baseline: a ratio far from earlier idle runs'
          ' points at load or thread settings, not at DP.')


def report(model, rows, batch_size, check=False):
  timed = {v: r for v, r in rows.items() if r['wall_ms'] is not None}
  base = timed.get('jax-nonprivate')
  best = min((r['wall_ms'], v) for v, r in timed.items()
             if v.startswith('dpjax-')) if any(
                 v.startswith('dpjax-') for v in timed) else None
  note = ' (CHECK RUN: not a measurement)' if check else ''
  print(f'\n### {model}, B={batch_size}{note}\n')
  print(sanity_line(rows) + '\n')
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


def _args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=list(MODELS),
                      choices=list(MODELS))
  parser.add_argument('--variants', nargs='+', default=list(VARIANTS),
                      choices=list(VARIANTS))
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed steps after compilation (>= 1)')
  parser.add_argument('--iters', type=int, default=20,
                      help=f'timed steps per variant (>= {MIN_ITERS}; 0: XLA'
                      ' memory only)')
  parser.add_argument('--threads', type=int, default=num_cores(),
                      help='torch intra-op threads (default: the cores)')
  parser.add_argument('--check', action='store_true',
                      help='run at any size and load to see that every variant'
                      ' works; the numbers are not a measurement')
  parser.add_argument('--peer-python',
                      default=os.environ.get('DPJAX_PEER_PYTHON',
                                             '/work/venv-peers/bin/python'),
                      help='interpreter with jax_privacy, torch and opacus')
  parser.add_argument('--json', help='also write the results to this file')
  parser.add_argument('--dpjax-clipping', default='flat',
                      choices=('flat', 'per_layer'),
                      help="dpjax's clipping: flat, or per layer (one group"
                      ' per module); the peers always clip flat')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.worker and not args.check:
    if 0 < args.iters < MIN_ITERS:
      parser.error(f'--iters {args.iters}: a median of fewer than {MIN_ITERS}'
                   ' steps is not a measurement (use --check to try the'
                   ' script at small sizes).')
    if args.iters and args.warmup < 1:
      parser.error('--warmup must be >= 1: the first steps pay for caches'
                   ' and allocation.')
  if args.check and args.json:
    parser.error('--check results are not a measurement; --json refused.')
  return args


def main():
  args = _args()
  if args.worker:
    worker(args.worker, args.models[0], args.batch_size, args.warmup,
           args.iters, args.threads, args.dpjax_clipping)
    return
  cores = num_cores()
  try:
    # XLA's buffer assignment (--iters 0) does not depend on the load.
    timed = not args.check and args.iters > 0
    load = check_idle(cores, 'at start') if timed else os.getloadavg()[0]
    print(f'# {platform.machine()}, {cores} cores, load average {load:.2f},'
          f' python {platform.python_version()}, torch threads'
          f' {args.threads}; variants timed one after another, each'
          f' {args.warmup} warm-up + {args.iters} timed steps, medians')
    if args.check:
      print('# CHECK RUN: not a measurement (any size, any load); do not'
            ' record these numbers.')
    results = {}
    for model in args.models:
      results[model] = bench_model(model, args, cores)
      report(model, results[model], args.batch_size, args.check)
    if timed:
      check_idle(cores, 'at the end', own=cores)
  except LoadError as e:
    sys.exit(f'benchmark_peers: refused: {e}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'machine': platform.machine(), 'cores': cores,
                 'torch_threads': args.threads, 'results': results}, f,
                indent=2)


if __name__ == '__main__':
  main()
