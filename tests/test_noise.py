"""Tests for dpjax/noise.py: noise distribution, one draw per step, divisor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import dpjax


def _noise_only(noise_multiplier, sensitivity, batch, key, size=20000):
  tx = dpjax.add_gaussian_noise(noise_multiplier, sensitivity, batch, key)
  zeros = {'a': jnp.zeros(size // 2), 'b': jnp.zeros((size // 4, 2))}
  out, _ = tx.update(zeros, tx.init(None))
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])


class TestNoiseDistribution:
  """KS test: the right std passes; 2/3 and 3/2 of it are rejected."""

  SIGMA, SENS, BATCH = 1.3, 0.7, 64.0

  def test_accepts_right_std(self):
    samples = _noise_only(self.SIGMA, self.SENS, self.BATCH, key=1)
    std = self.SIGMA * self.SENS / self.BATCH
    assert stats.kstest(samples / std, 'norm').pvalue > 1e-3

  @pytest.mark.parametrize('factor', [2 / 3, 3 / 2])
  def test_rejects_wrong_std(self, factor):
    samples = _noise_only(self.SIGMA, self.SENS, self.BATCH, key=1)
    wrong = factor * self.SIGMA * self.SENS / self.BATCH
    assert stats.kstest(samples / wrong, 'norm').pvalue < 1e-6

  def test_leaves_get_independent_noise(self):
    tx = dpjax.add_gaussian_noise(1.0, 1.0, 1.0, key=3)
    out, _ = tx.update({'a': jnp.zeros(5000), 'b': jnp.zeros(5000)},
                       tx.init(None))
    assert abs(np.corrcoef(out['a'], out['b'])[0, 1]) < 0.05


class TestOneDrawPerStep:

  def test_state_key_split_once_per_update(self):
    key = jax.random.key(7)
    tx = dpjax.add_gaussian_noise(1.0, 1.0, 1.0, key)
    state = tx.init(None)
    _, state = tx.update({'w': jnp.zeros(3)}, state)
    expected = jax.random.split(key)[0]
    np.testing.assert_array_equal(jax.random.key_data(state.key),
                                  jax.random.key_data(expected))

  def test_fresh_noise_each_step(self):
    tx = dpjax.add_gaussian_noise(1.0, 1.0, 1.0, key=0)
    state = tx.init(None)
    first, state = tx.update({'w': jnp.zeros(100)}, state)
    second, _ = tx.update({'w': jnp.zeros(100)}, state)
    assert not np.allclose(first['w'], second['w'])

  @pytest.mark.parametrize('microbatch_size', [1, 2, 3, None])
  def test_noisy_update_independent_of_microbatching(self, microbatch_size):
    """Same key -> same noisy update whatever the microbatching.

    If noise were added per microbatch, the update would change with the
    number of microbatches (and its std would grow with it).
    """
    def loss_fn(w, ex):
      return jnp.sum((ex['x'] @ w - ex['y']) ** 2)

    rng = np.random.default_rng(0)
    batch = {'x': rng.normal(size=(6, 4)).astype(np.float32),
             'y': rng.normal(size=6).astype(np.float32)}
    params = jnp.zeros(4)
    clip = dpjax.clip_per_example(1.0)

    def noisy_update(mb):
      grad_fn = dpjax.clipped_grad(loss_fn, clip, microbatch_size=mb)
      tx = dpjax.add_gaussian_noise(2.0, clip.sensitivity(), 6.0, key=11)
      out = grad_fn(params, batch)
      update, _ = tx.update(out.grad_sum, tx.init(params))
      return update

    np.testing.assert_allclose(noisy_update(microbatch_size),
                               noisy_update(6), rtol=1e-5, atol=1e-6)


class TestPublicDivisor:

  def test_divides_by_expected_not_realized_batch_size(self):
    """Output is (sum + noise) / expected size for every realized size."""
    clip = dpjax.clip_per_example(10.0)
    tx = dpjax.add_gaussian_noise(0.0, clip.sensitivity(), 8.0, key=0)
    for realized in (1, 4, 8, 13):
      grads = {'w': jnp.ones((16, 2))}
      mask = jnp.arange(16) < realized
      summed, _ = clip.update(grads, clip.init(None), mask=mask)
      out, _ = tx.update(summed, tx.init(None))
      np.testing.assert_allclose(out['w'], [realized / 8.0] * 2, rtol=1e-6)

  def test_padding_does_not_change_the_update(self):
    """Adding masked rows (a different padded size) changes nothing."""
    clip = dpjax.clip_per_example(1.0)
    tx = optax.chain(
        dpjax.add_gaussian_noise(1.0, clip.sensitivity(), 4.0, key=5),
        optax.sgd(0.1))
    grads = {'w': jnp.arange(6.0).reshape(3, 2)}
    padded = {'w': jnp.concatenate([grads['w'], jnp.full((5, 2), 9.0)])}
    s1, _ = clip.update(grads, clip.init(None))
    s2, _ = clip.update(padded, clip.init(None), mask=jnp.arange(8) < 3)
    u1, _ = tx.update(s1, tx.init(grads))
    u2, _ = tx.update(s2, tx.init(grads))
    np.testing.assert_allclose(u1['w'], u2['w'], rtol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(noise_multiplier=-1.0), 'noise_multiplier'),
    (dict(noise_multiplier=np.nan), 'noise_multiplier'),
    (dict(l2_sensitivity=0.0), 'l2_sensitivity'),
    (dict(expected_batch_size=0), 'expected_batch_size'),
])
def test_rejects_bad_arguments(kwargs, match):
  args = dict(noise_multiplier=1.0, l2_sensitivity=1.0,
              expected_batch_size=4.0, key=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    dpjax.add_gaussian_noise(**args)
