"""Tests for dpjax/autotune.py and the bounded compile count of a DP step."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from configs import default
from dpjax import data as data_lib
from dpjax import autotune
from dpjax import engines
from dpjax import plan as plan_lib
from dpjax import train
from dpjax.training import run as run_lib

_W = jax.ShapeDtypeStruct((128, 128), jnp.float32)
_BATCH = {'x': jax.ShapeDtypeStruct((32, 128), jnp.float32)}


def _loss(w, example):
  return jnp.sum(jnp.tanh(example['x'] @ w) ** 2)


def _make(m):
  return jax.jit(dpjax.clipped_grad(_loss, dpjax.clip_per_example(1.0),
                                    microbatch_size=m))


def test_chosen_microbatch_is_the_largest_within_budget():
  peaks = {m: autotune.peak_bytes(_make(m), _W, _BATCH, None) for m in (4, 8)}
  assert peaks[4] < peaks[8]  # per-example gradients grow with m
  budget = (peaks[4] + peaks[8]) // 2
  m = autotune.microbatch_size(_make, (_W, _BATCH, None), 32, budget)
  assert m == 4
  assert autotune.peak_bytes(_make(m), _W, _BATCH, None) <= budget


def test_whole_batch_when_it_fits():
  assert autotune.microbatch_size(_make, (_W, _BATCH, None), 32, 2**40) == 32


def test_raises_when_nothing_fits():
  with pytest.raises(ValueError, match='memory_budget_mb'):
    autotune.microbatch_size(_make, (_W, _BATCH, None), 32, 1024)


def test_candidates_and_default_budget():
  assert autotune.candidate_sizes(24) == [1, 2, 4, 8, 16, 24]
  assert autotune.candidate_sizes(1) == [1]
  assert autotune.default_budget_bytes() > 0


class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[:-3] + (-1,)))


def _dp_setup(grad_route, n=60):
  model = _Tiny()
  config = dpjax.PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0,
                               expected_batch_size=8, steps=12)
  plan = dpjax.make_plan(config, n, pad_to_multiple_of=4,
                         keys=dpjax.KeySchedule(0, 0))
  tx = optax.chain(plan.noise(), optax.sgd(0.1))
  state = train.create_train_state(model, jax.random.key(0), (5, 5, 1), tx)
  state = state.replace(clip_state=plan.clipping.init(state.params))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(n, 5, 5, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, n), jnp.int32)
  step = train.make_train_step(model, plan, grad_route=grad_route)
  return plan, state, images, labels, step


@pytest.mark.parametrize('grad_route', ['vmap', 'bookkeeping'])
def test_one_compilation_per_padded_size_under_poisson_sampling(
    grad_route, caplog):
  plan, state, images, labels, step = _dp_setup(grad_route)
  sizes = set()
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    for t in range(plan.num_steps):
      batch = plan.sampler.sample(t)
      sizes.add(len(batch.indices))
      state, _ = step(state, images, labels, batch.indices, batch.mask)
  compiled = lambda name: sum(
      f'jit({name})' in r.getMessage() and 'Finished' not in r.getMessage()
      for r in caplog.records)
  assert len(sizes) >= 2  # the sampler really produced several sizes
  assert sizes <= set(plan.sampler.padded_sizes)
  assert compiled('grad_step') == len(sizes)
  assert compiled('apply_step') == 1


def test_routes_give_the_same_step():
  outs = {}
  for route in ('vmap', 'ghost', 'bookkeeping'):
    plan, state, images, labels, step = _dp_setup(route)
    batch = plan.sampler.sample(0)
    state, metrics = step(state, images, labels, batch.indices, batch.mask)
    outs[route] = (state.params, metrics)
  for route in ('ghost', 'bookkeeping'):
    for a, b in zip(jax.tree.leaves(outs[route][0]),
                    jax.tree.leaves(outs['vmap'][0])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(outs[route][1]['num_clipped']) == int(
        outs['vmap'][1]['num_clipped'])


def test_train_tunes_microbatch_to_budget():
  plan, state, images, labels, _ = _dp_setup('auto')
  train_data = data_lib.ArrayDataset(np.asarray(images), np.asarray(labels))
  size = plan.sampler.max_batch_size
  below = autotune.candidate_sizes(size)[-2]
  loss = engines.LossSpec(train.example_loss(_Tiny()))
  spec = jax.ShapeDtypeStruct
  engine = engines.select(plan, loss, microbatch_size=below)
  batch = dpjax.Batch({'image': spec((size, 5, 5, 1), jnp.float32),
                       'label': spec((size,), jnp.int32)},
                      spec((size,), jnp.bool_))
  budget = autotune.peak_bytes(jax.jit(engine), state.params, batch,
                               state.clip_state, dpjax.StepInputs())
  m = train.tune_microbatch(_Tiny(), plan, state, train_data, size,
                            budget_mb=budget / 2**20)
  assert m == below


def test_grad_route_is_checked():
  plan, *_ = _dp_setup('auto')
  with pytest.raises(ValueError, match='grad_route'):
    engines.select(plan, engines.LossSpec(train.example_loss(_Tiny())),
                   route='fast')


@pytest.mark.parametrize('microbatch,physical,warns', [
    (4, 64, True), (4, None, True), (None, 64, False), (64, 64, False)])
def test_microbatching_a_cpu_step_warns_of_the_slow_scan(
    caplog, microbatch, physical, warns):
  """XLA:CPU's slow convolution gradients in a scan: said, not silent."""
  plan, *_ = _dp_setup('auto')
  config = default.get_config()
  config.perf.microbatch_size = microbatch
  config.perf.physical_batch_size = physical
  with caplog.at_level('WARNING'):
    got = run_lib._microbatch(config, None, plan, None, None, None, None)  # pylint: disable=protected-access
  assert got == microbatch
  assert (run_lib.CPU_SCAN_WARNING in caplog.text) == warns


def test_a_non_private_step_does_not_microbatch_so_does_not_warn(caplog):
  config = default.get_config()
  config.perf.microbatch_size = 4
  with caplog.at_level('WARNING'):
    got = run_lib._microbatch(config, None, plan_lib.NonPrivatePlan(), None,  # pylint: disable=protected-access
                              None, None, None)
  assert got == 4
  assert run_lib.CPU_SCAN_WARNING not in caplog.text
