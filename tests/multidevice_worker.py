"""Runs on 8 fake CPU devices for tests/test_distributed.py; prints JSON.

XLA_FLAGS must be set before jax is imported, so this runs in a subprocess:

    python tests/multidevice_worker.py
"""

import json
import os
import sys


def composed_on_meshes(images, labels, indices, mask, meshes):
  """Each composition that a mesh used to refuse, on 1, 2 and 8 devices.

  One noisy DP step with the same keys: the parameters (and BatchNorm
  statistics) must equal the one-device step's, also with physical batches.
  Returns {kind: {setting: max abs difference}} plus the update norms.
  """
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import dpjax
  from dpjax import distributed
  from dpjax import models
  from dpjax import normalization
  from dpjax import pruning
  from dpjax import train

  class TinyBN(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      return nn.Dense(4)(jnp.mean(nn.relu(x), axis=(-3, -2)))

  flat = lambda t: np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(t)] or [np.zeros(0)])
  public = np.asarray(images[:24])
  cases = {
      'bookkeeping': dict(model=models.SmallCNN(num_classes=4),
                          route='bookkeeping'),
      'adaptive': dict(model=models.SmallCNN(num_classes=4),
                       clipping=dict(mode='adaptive', count_noise_std=2.0)),
      'batch_clipping': dict(model=models.SmallCNN(num_classes=4),
                             clipping=dict(mode='batch', group_size=2),
                             accountant='gdp'),
      'pruning': dict(model=models.SmallCNN(num_classes=4), prune=True),
      'per_layer_ghost': dict(model=models.SmallCNN(num_classes=4),
                              clipping=dict(mode='per_layer',
                                            layers='equal'),
                              route='ghost'),
      'bn_public': dict(model=TinyBN(), policy='public'),
      'bn_frozen': dict(model=TinyBN(), policy='frozen'),
      'bn_privatized': dict(model=TinyBN(), policy='privatized'),
      'bn_batch': dict(model=TinyBN(), policy='batch',
                       clipping=dict(mode='batch', group_size=2),
                       accountant='gdp'),
      # 'vmap_twin': an earlier case this one must match on one device.
      'pruning_bookkeeping': dict(model=models.SmallCNN(num_classes=4),
                                  prune=True, route='bookkeeping',
                                  vmap_twin='pruning'),
      'bn_privatized_bookkeeping': dict(model=TinyBN(), policy='privatized',
                                        route='bookkeeping',
                                        vmap_twin='bn_privatized'),
  }

  def plan_mode(case):
    return case.get('clipping', {}).get('mode', 'flat')

  def run(case, mesh, physical):
    model = case['model']
    policy = case.get('policy')
    config = dpjax.PrivacyConfig(
        clip_norm=0.5, noise_multiplier=1.0, steps=1,
        expected_batch_size=14 if plan_mode(case) == 'batch' else 13,
        accountant=case.get('accountant', 'rdp'),
        clipping=dpjax.ClippingConfig(**case.get('clipping', {})),
        stats_share=0.1 if policy == 'privatized' else None)
    schedule = dpjax.KeySchedule(0, 7)
    variables = model.init(jax.random.key(0), images[:1])
    plan = dpjax.make_plan(config, 64, keys=schedule,
                           params=variables['params'])
    normalizer = None
    if policy is not None:
      normalizer = normalization.make_normalizer(
          model, variables, normalization.NormalizationConfig(policy=policy),
          public_images=public, plan=plan,
          batch_clipping=plan.mode == 'batch',
          public_key=schedule.root(dpjax.keys.PUBLIC_BATCH))
    pruner = None
    tx = optax.chain(plan.noise(), optax.sgd(1.0))
    if case.get('prune'):
      pruner = pruning.make_pruner(pruning.PruningConfig(
          mode='select', keep_fraction=0.5))
      tx = pruning.masked_chain(plan.noise(), optax.sgd(1.0), 'select')
    state = train.create_train_state(model, jax.random.key(0),
                                     images.shape[1:], tx, normalizer)
    if pruner is not None:
      params, pstate = pruner.init(state.params,
                                   schedule.root(dpjax.keys.PRUNE))
      state = state.replace(params=params, opt_state=tx.init(params),
                            pruning=pstate)
    start = flat(state.params)
    data = (images, labels)
    if mesh is not None:
      state, data = distributed.put_replicated((state, data), mesh)
    step = train.make_train_step(
        model, plan, mesh=mesh, physical_batch_size=physical,
        normalizer=normalizer, pruner=pruner,
        stats_key=schedule.root(dpjax.keys.STATS),
        grad_route=case.get('route', 'auto'))
    state, _ = step(state, *data, indices, mask,
                    None if normalizer is None else normalizer.public_batch(0))
    return start, flat(state.params), flat(state.model_state)

  results, one_device = {}, {}
  for name, case in cases.items():
    start, ref, ref_state = run(case, None, None)
    one_device[name] = ref
    result = {'update_norm': float(np.linalg.norm(ref - start))}
    if 'vmap_twin' in case:
      result['vmap_twin'] = float(np.max(np.abs(
          ref - one_device[case['vmap_twin']])))
    settings = [('2', meshes[2], None), ('8', meshes[8], None),
                ('2_physical', meshes[2], 8)]
    if plan_mode(case) != 'batch':
      settings.append(('8_physical', meshes[8], 8))
    for label, mesh, physical in settings:
      _, params, model_state = run(case, mesh, physical)
      result[label] = float(max(np.max(np.abs(params - ref)), np.max(
          np.abs(model_state - ref_state), initial=0.0)))
    results[name] = result
  return results


def main():
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import dpjax
  from dpjax import augmult
  from dpjax import distributed
  from dpjax import models
  from dpjax import train

  assert jax.device_count() == 8, jax.devices()

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = x.reshape(x.shape[:-3] + (-1,))
      return nn.Dense(4)(nn.tanh(nn.Dense(32)(x)))

  model = models.SmallCNN(num_classes=4)  # convolutions: the risky case
  loss_fn = train.example_loss(model)
  rng = np.random.default_rng(0)
  n, padded, real = 64, 16, 13
  images = jnp.asarray(rng.normal(size=(n, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, n))
  indices = np.zeros(padded, np.int32)
  indices[:real] = rng.choice(n, real, replace=False)
  mask = np.arange(padded) < real
  batch = {'image': images[indices], 'label': labels[indices]}
  params = model.init(jax.random.key(0), images[:1])['params']
  meshes = {d: distributed.make_mesh(d) for d in (1, 2, 8)}
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  out = {}

  # Per-example gradients against the unsharded vmap(grad): each device's
  # clipped row i (a one-hot mask), scaled back by max(1, norm_i / C).
  clip_norm = 0.5
  clip = dpjax.clip_per_example(clip_norm)
  _, ref_grads = jax.jit(dpjax.per_example_grads(loss_fn))(params, batch)
  ref_rows = [flat(jax.tree.map(lambda g, i=i: g[i], ref_grads))
              for i in range(real)]
  ref = jax.jit(dpjax.clipped_grad(loss_fn, clip))(params, batch, mask)
  for d, mesh in meshes.items():
    fn = jax.jit(distributed.clipped_grad(loss_fn, clip, mesh,
                                          microbatch_size=1))
    rows = []
    for i in range(real):
      one = fn(params, batch, np.arange(padded) == i)
      scale = max(1.0, float(one.stats.norms[i]) / clip_norm)
      rows.append(flat(one.grad_sum) * scale)
    out[f'per_example_max_diff_{d}'] = float(max(
        np.max(np.abs(a - b)) for a, b in zip(rows, ref_rows)))
    out[f'per_example_max_abs_{d}'] = float(max(np.max(np.abs(r))
                                                for r in rows))
    # Clipped sums, norms and counts of the whole batch.
    got = fn(params, batch, mask)
    out[f'sum_max_diff_{d}'] = float(np.max(np.abs(
        flat(got.grad_sum) - flat(ref.grad_sum))))
    out[f'norms_max_diff_{d}'] = float(np.max(np.abs(
        np.asarray(got.stats.norms) - np.asarray(ref.stats.norms))))
    out[f'num_clipped_{d}'] = int(got.stats.num_clipped)
  out['num_clipped_ref'] = int(ref.stats.num_clipped)
  try:
    jax.jit(distributed.clipped_grad(loss_fn, clip, meshes[8]))(
        params, jax.tree.map(lambda x: x[:12], batch), mask[:12])
    out['indivisible_error'] = ''
  except ValueError as e:
    out['indivisible_error'] = str(e)

  # The sharded batch: every row on exactly one device.
  sharded = distributed.put_sharded(np.arange(padded), meshes[8])
  shards = sorted(np.asarray(s.data).tolist() for s in sharded.addressable_shards)
  out['shards'] = shards

  # One noisy DP step: same key, same update for 1, 2 and 8 devices, also
  # with physical batches of 8 rows over 8 devices. (A dense model: the
  # step's psum, noise and accumulation do not depend on the layers, and it
  # compiles fast.)
  plan = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=0.5, noise_multiplier=2.0, expected_batch_size=real,
      steps=1), n, keys=dpjax.KeySchedule(0, 7))
  model = MLP()
  params = model.init(jax.random.key(0), images[:1])['params']

  def one_step(mesh, physical=None, private=True, augmult=None):
    # A fresh chain each time: the step donates the state, whose first noise
    # key is the transform's own array.
    tx = optax.chain(plan.noise(), optax.sgd(1.0))
    state = train.TrainState.create(
        apply_fn=model.apply, params=jax.tree.map(jnp.copy, params),
        tx=tx if private else optax.chain(
            dpjax.plan.NonPrivatePlan().noise(), optax.sgd(1.0)))
    data = (images, labels)
    if mesh is not None:
      state, data = distributed.put_replicated((state, data), mesh)
    step = train.make_train_step(model, plan if private else None, mesh=mesh,
                                 physical_batch_size=physical, augmult=augmult)
    state, _ = step(state, *data, indices, mask)
    return flat(state.params)

  ref_params = one_step(None)
  out['update_norm'] = float(np.linalg.norm(ref_params - flat(params)))
  for name, mesh, physical in (('2', meshes[2], None),
                               ('8_physical', meshes[8], 8)):
    out[f'update_max_diff_{name}'] = float(np.max(np.abs(
        one_step(mesh, physical) - ref_params)))
  # Augmentation multiplicity: each example's views follow its index, not
  # its device; the non-private baseline shards too.
  views = augmult.AugMult(augmult.get_augmentation(('flip', 'shift')), 2,
                          jax.random.key(3))
  for private in (True, False):
    name = 'dp' if private else 'nonprivate'
    ref_aug = one_step(None, private=private, augmult=views)
    out[f'augmult_{name}_update_norm'] = float(np.linalg.norm(
        ref_aug - flat(params)))
    out[f'augmult_{name}_max_diff_2'] = float(np.max(np.abs(
        one_step(meshes[2], private=private, augmult=views) - ref_aug)))

  out['composed'] = composed_on_meshes(images, labels, indices, mask, meshes)

  # End to end: dpjax-train's config fields on 2 devices, with physical
  # batches, against 1 device.
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import default  # pylint: disable=g-import-not-at-top
  summaries = {}
  for d in (1, 2):
    config = default.get_config()
    config.progress_bar = False
    config.privacy.steps = 2
    config.privacy.noise_multiplier = 1.0
    config.privacy.target_epsilon = None
    config.eval_every_steps = 2
    config.perf.num_devices = d
    config.perf.physical_batch_size = 128  # one compiled shape
    config.privacy.noise_seed = 5  # the two runs draw the same noise
    workdir = os.path.join(sys.argv[1], f'devices{d}')
    summaries[d] = train.train_and_evaluate(config, workdir)
  out['e2e'] = {d: {'compiled_batch_sizes': s[train.DIAGNOSTICS][
      'compiled_batch_sizes'], **{k: s[k] for k in (
          'epsilon', 'test_loss', 'num_devices')}}
                for d, s in summaries.items()}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
