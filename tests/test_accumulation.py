"""Tests for dpjax/accumulation.py: physical batches, noise once per step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import accumulation
from dpjax import plan as plan_lib
from dpjax import train


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[:-3] + (-1,))
    return nn.Dense(10)(nn.tanh(nn.Dense(64)(x)))


MODEL = MLP()
SHAPE = (4, 4, 1)
N, PADDED, REAL = 200, 32, 27
SIGMA = 50.0  # noise dominates the clipped sum (norm <= REAL * C)


@functools.lru_cache()
def _data():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(N,) + SHAPE), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, N))
  indices = np.zeros(PADDED, np.int32)
  indices[:REAL] = rng.choice(N, REAL, replace=False)
  return images, labels, indices, np.arange(PADDED) < REAL


@functools.lru_cache()
def _params():
  return MODEL.init(jax.random.key(0), jnp.zeros((1,) + SHAPE))['params']


def _state(tx):
  params = jax.tree.map(jnp.copy, _params())  # the step donates its state
  return train.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)


@functools.lru_cache()
def _step(physical_batch_size, noise_multiplier, key=0):
  """The state after one DP step, and its metrics, for a physical size."""
  plan = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=noise_multiplier,
      expected_batch_size=REAL, steps=1), N,
      keys=dpjax.KeySchedule(0, key))
  state = _state(optax.chain(plan.noise(), optax.sgd(1.0)))
  step = train.make_train_step(MODEL, plan,
                               physical_batch_size=physical_batch_size)
  return step(state, *_data())


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_split_batch_pieces_and_errors():
  indices, mask = np.arange(12), np.arange(12) < 7
  pieces = list(accumulation.split_batch(indices, mask, 4))
  assert [len(i) for i, _ in pieces] == [4, 4, 4]
  np.testing.assert_array_equal(np.concatenate([i for i, _ in pieces]),
                                indices)
  assert sum(int(m.sum()) for _, m in pieces) == 7
  assert len(list(accumulation.split_batch(indices, mask, None))) == 1
  with pytest.raises(ValueError, match='multiple of 5'):
    list(accumulation.split_batch(indices, mask, 5))
  with pytest.raises(ValueError, match='same length'):
    list(accumulation.split_batch(indices, mask[:5], 4))


def test_accumulated_step_equals_one_call():
  """Same key: the same noisy update from 4 physical batches as from one."""
  ref, ref_metrics = _step(None, noise_multiplier=SIGMA, key=3)
  out, metrics = _step(8, noise_multiplier=SIGMA, key=3)
  np.testing.assert_allclose(_flat(out.params), _flat(ref.params),
                             rtol=1e-5, atol=1e-6)
  assert int(metrics['count']) == int(ref_metrics['count']) == REAL
  np.testing.assert_allclose(float(metrics['loss']), float(ref_metrics['loss']),
                             rtol=1e-5)


def test_noise_is_drawn_once_per_logical_step():
  """Four physical batches, one draw: std = sigma * C / B, not twice that."""
  noisy, _ = _step(8, noise_multiplier=SIGMA, key=3)
  clean, _ = _step(8, noise_multiplier=0.0)
  noise = _flat(noisy.params) - _flat(clean.params)
  expected = SIGMA * 1.0 / REAL  # lr 1, divisor = expected batch size
  assert noise.size > 1000
  assert abs(np.std(noise) / expected - 1) < 0.05
  # The noise stream made exactly one draw.
  assert int(noisy.opt_state[0].count) == 1


def test_non_private_accumulation_matches_one_call():
  mean_sgd = lambda: optax.chain(plan_lib.NonPrivatePlan().noise(),
                                 optax.sgd(0.5))
  ref, _ = train.make_train_step(MODEL, None)(_state(mean_sgd()), *_data())
  out, _ = train.make_train_step(MODEL, None, physical_batch_size=8)(
      _state(mean_sgd()), *_data())
  np.testing.assert_allclose(_flat(out.params), _flat(ref.params),
                             rtol=1e-5, atol=1e-6)
