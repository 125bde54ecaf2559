"""Tests for dpjax/averaging.py: EMA and Polyak parameter averages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import averaging


def _run(tx, grads_seq, params):
  state = tx.init(params)
  iterates = []
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    iterates.append(params)
  return params, state, iterates


def _grads(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  return [{'w': jnp.asarray(rng.normal(size=3), jnp.float32),
           'b': jnp.asarray(rng.normal(), jnp.float32)}
          for _ in range(num_steps)]


PARAMS = {'w': jnp.zeros(3), 'b': jnp.zeros(())}


@pytest.mark.parametrize('warmup', [False, True])
def test_ema_follows_its_recurrence(warmup):
  decay = 0.9
  _, state, iterates = _run(
      optax.chain(optax.sgd(0.5), averaging.ema_params(decay, warmup=warmup)),
      _grads(12), PARAMS)
  ema = jax.tree.map(np.asarray, PARAMS)
  for t, p in enumerate(iterates, start=1):
    d = min(decay, (1 + t) / (10 + t)) if warmup else decay
    ema = jax.tree.map(lambda a, x, d=d: d * a + (1 - d) * np.asarray(x),
                       ema, p)
  got = averaging.averaged_params(state)['ema']
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ema)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('start_step', [0, 4])
def test_polyak_is_the_mean_of_the_iterates(start_step):
  _, state, iterates = _run(
      optax.chain(optax.sgd(0.5), averaging.polyak_params(start_step)),
      _grads(10), PARAMS)
  expected = jax.tree.map(lambda *xs: np.mean(xs, axis=0),
                          *iterates[start_step:])
  got = averaging.averaged_params(state)['polyak']
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_averaging_never_changes_the_training_trajectory():
  """Post-processing: the raw parameters are those of the chain without it."""
  grads = _grads(6)
  plain, _, _ = _run(optax.chain(optax.sgd(0.5, momentum=0.9)), grads, PARAMS)
  averaged, state, _ = _run(
      optax.chain(optax.sgd(0.5, momentum=0.9), averaging.ema_params(0.99),
                  averaging.polyak_params()), grads, PARAMS)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(averaged)):
    np.testing.assert_array_equal(a, b)
  assert sorted(averaging.averaged_params(state)) == ['ema', 'polyak']


def test_averages_found_inside_a_dp_chain():
  tx = optax.chain(
      optax.chain(dpjax.add_gaussian_noise(1.0, 1.0, 4.0, 0), optax.sgd(0.1)),
      averaging.ema_params(0.5))
  state = tx.init(PARAMS)
  assert list(averaging.averaged_params(state)) == ['ema']
  assert not averaging.averaged_params(optax.sgd(0.1).init(PARAMS))


@pytest.mark.parametrize('decay', [1.0, -0.1, 2])
def test_bad_ema_decay(decay):
  with pytest.raises(ValueError, match='ema decay'):
    averaging.ema_params(decay)


def test_bad_polyak_start():
  with pytest.raises(ValueError, match='start_step'):
    averaging.polyak_params(-1)


def test_averaging_needs_params():
  tx = averaging.ema_params(0.5)
  with pytest.raises(ValueError, match='needs the parameters'):
    tx.update(PARAMS, tx.init(PARAMS))
