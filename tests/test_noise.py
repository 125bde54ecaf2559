"""Tests for dpjax/noise.py: noise distribution, one draw per step, divisor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import dpjax
from dpjax import keys
from dpjax import noise


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

  def test_draw_t_uses_the_stream_key_of_step_t(self):
    key = jax.random.key(7)
    tx = dpjax.add_gaussian_noise(1.0, 1.0, 1.0, key)
    state = tx.init(None)
    for t in range(3):
      out, state = tx.update({'w': jnp.zeros(3)}, state)
      expected = noise.gaussian_noise_like(keys.for_step(key, t),
                                           {'w': jnp.zeros(3)}, 1.0)
      np.testing.assert_array_equal(out['w'], expected['w'])
      assert int(state.count) == t + 1
    np.testing.assert_array_equal(jax.random.key_data(state.key),
                                  jax.random.key_data(key))

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
      out = grad_fn(params, batch, None)
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


class TestNoiseFromClipState:
  """Noise scaled to the thresholds in the clipping's state."""

  def _noise(self, clip, state, sigma=1.3, batch=8.0, key=0):
    tx = dpjax.add_gaussian_noise_from_state(sigma, clip, batch, key)
    zeros = {'a': jnp.zeros(20000), 'b': jnp.zeros(20000)}
    out, _ = tx.update(zeros, tx.init(None), clip_state=state)
    return out

  def test_isotropic_std_is_sigma_times_current_bound(self):
    clip = dpjax.clip_per_layer({'a': 0.6, 'b': 0.8})
    state = clip.init(None)._replace(
        clip_norms={'a': jnp.float32(3.0), 'b': jnp.float32(4.0)})
    out = self._noise(clip, state)
    for leaf in ('a', 'b'):
      std = 1.3 * 5.0 / 8.0
      assert stats.kstest(np.asarray(out[leaf]) / std, 'norm').pvalue > 1e-3
      assert stats.kstest(np.asarray(out[leaf]) / (1.5 * std),
                          'norm').pvalue < 1e-6

  def test_per_layer_std_is_sigma_sqrt_l_times_c_i(self):
    clip = dpjax.clip_per_layer({'a': 0.3, 'b': 2.0}, noise='per_layer')
    out = self._noise(clip, clip.init(None))
    for leaf, c in (('a', 0.3), ('b', 2.0)):
      std = 1.3 * np.sqrt(2) * c / 8.0
      assert stats.kstest(np.asarray(out[leaf]) / std, 'norm').pvalue > 1e-3
      for wrong in (2 / 3, 3 / 2):
        assert stats.kstest(np.asarray(out[leaf]) / (wrong * std),
                            'norm').pvalue < 1e-6

  def test_refuses_a_call_without_the_clip_state(self):
    clip = dpjax.clip_per_layer({'a': 1.0})
    tx = dpjax.add_gaussian_noise_from_state(1.0, clip, 1.0, 0)
    with pytest.raises(ValueError, match='clip_state'):
      tx.update({'a': jnp.zeros(3)}, tx.init(None))


def _every_mode():
  from dpjax import adaptive_clipping, batch_clipping  # pylint: disable=g-import-not-at-top
  return {
      'flat': dpjax.clip_per_example(1.0),
      'per_layer': dpjax.clip_per_layer(clip_norm=1.0, rule='sqrt_size'),
      'per_layer_noise': dpjax.clip_per_layer(clip_norm=1.0,
                                              noise='per_layer'),
      'automatic': dpjax.clip_automatic(1.0),
      'normalized': dpjax.clip_normalized(1.0),
      'adaptive': adaptive_clipping.clip_quantile(
          1.0, count_noise_std=0.5, expected_batch_size=6, key=1),
      'adaptive_per_layer': adaptive_clipping.clip_quantile(
          1.0, rule='equal', count_noise_std=0.5, expected_batch_size=6,
          key=1),
      'batch_rows': batch_clipping.clip_groups_of(
          dpjax.clip_per_example(1.0), 4),
  }


@pytest.mark.parametrize('mode', sorted(_every_mode()))
def test_every_mode_composes_with_optax_chain(mode):
  clip = _every_mode()[mode]
  params = {'w': jnp.zeros((3, 2)), 'b': jnp.zeros(2)}
  tx = optax.chain(dpjax.private_aggregate(clip, 0.0, 6.0, key=0),
                   optax.sgd(1.0))
  state = tx.init(params)
  rng = np.random.default_rng(0)
  grads = {'w': jnp.asarray(rng.normal(size=(6, 3, 2)), jnp.float32) * 3,
           'b': jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)}
  grads['b'] = grads['b'].at[5].set(jnp.nan)
  mask = jnp.arange(6) < 5
  updates, new_state = jax.jit(
      lambda g, s: tx.update(g, s, params, mask=mask))(grads, state)
  out, _ = clip.clip(grads, state[0].clip_state, mask)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(out.grad_sum)):
    np.testing.assert_allclose(a, -np.asarray(b) / 6.0, rtol=1e-5)
  thresholds = lambda s: jax.tree.leaves(getattr(s[0].clip_state,
                                                  'clip_norms', ()))
  moved = [not np.array_equal(a, b) for a, b in zip(thresholds(state),
                                                     thresholds(new_state))]
  # Adaptive thresholds move once per call; nothing else has moving state.
  assert any(moved) == mode.startswith('adaptive')


def test_init_survives_a_donated_state():
  """A step that donates the noise state must not break a later init."""
  tx = dpjax.add_gaussian_noise(1.0, 1.0, 4, key=0)
  params = {'w': jnp.zeros(3)}
  update = jax.jit(tx.update, donate_argnums=(1,))
  first, _ = update(params, tx.init(params))
  again, _ = update(params, tx.init(params))
  np.testing.assert_array_equal(first['w'], again['w'])


class TestSecureNoise:
  """Sum-of-four-Gaussians draws (Holohan & Braghin 2021)."""

  def test_distribution_is_the_same_gaussian(self):
    tx = dpjax.add_gaussian_noise(1.3, 0.5, 4.0, key=11, secure=True)
    out, _ = tx.update({'w': jnp.zeros(20000)}, tx.init(None))
    samples = np.asarray(out['w']) / (1.3 * 0.5 / 4.0)
    assert stats.kstest(samples, 'norm').pvalue > 1e-3
    assert stats.kstest(samples / 1.2, 'norm').pvalue < 1e-6

  def test_differs_from_a_single_draw(self):
    plain = dpjax.add_gaussian_noise(1.0, 1.0, 1.0, key=5)
    secure = dpjax.add_gaussian_noise(1.0, 1.0, 1.0, key=5, secure=True)
    a, _ = plain.update({'w': jnp.zeros(100)}, plain.init(None))
    b, _ = secure.update({'w': jnp.zeros(100)}, secure.init(None))
    assert not np.allclose(a['w'], b['w'])

  def test_plan_passes_secure_noise_on(self):
    config = dpjax.PrivacyConfig(noise_multiplier=1.0, steps=3,
                                 expected_batch_size=10, secure_noise=True)
    schedule = keys.KeySchedule(0, 1)
    plan = dpjax.make_plan(config, 100, keys=schedule)
    out, _ = plan.noise().update({'w': jnp.zeros(4)}, plan.noise().init(None))
    expected = noise.gaussian_noise_like(
        keys.for_step(schedule.root(keys.NOISE), 0), {'w': jnp.zeros(4)},
        1.0, secure=True)
    np.testing.assert_allclose(out['w'], expected['w'] / 10.0, rtol=1e-6)
