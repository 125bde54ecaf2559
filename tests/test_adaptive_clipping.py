"""Tests for dpjax/adaptive_clipping.py: quantile tracking, counts, accounting."""

import dataclasses

import dp_accounting
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import dpjax
from dpjax import accounting
from dpjax import adaptive_clipping
from dpjax import train


def _clip(initial=1.0, **kw):
  kw = {'count_noise_std': 1.0, 'expected_batch_size': 256, 'key': 0,
        'target_quantile': 0.5, 'learning_rate': 0.2, **kw}
  return adaptive_clipping.clip_quantile(initial, **kw)


def _run_steps(clip, norms_fn, steps, batch=256, seed=0):
  """Thresholds after ``steps`` steps on rows of random norms (jitted scan)."""

  def step(state, key):
    grads = norms_fn(key, batch)
    _, state = clip.clip(grads, state, None)
    return clip.end_step(state), state.clip_norms

  state = clip.init(norms_fn(jax.random.key(seed), batch))
  keys = jax.random.split(jax.random.key(seed + 1), steps)
  final, history = jax.jit(lambda s: jax.lax.scan(step, s, keys))(state)
  return final, history


def _rows_with_norms(key, batch, log_mean=0.0, dim=4):
  norms = jnp.exp(log_mean + jax.random.normal(key, (batch,)))
  direction = jnp.ones(dim) / dim ** 0.5
  return norms[:, None] * direction


@pytest.mark.parametrize('quantile', [0.2, 0.5, 0.9])
def test_flat_threshold_converges_to_target_quantile(quantile):
  clip = _clip(0.01, target_quantile=quantile)
  final, history = _run_steps(
      clip, lambda k, b: {'w': _rows_with_norms(k, b)}, 400)
  # Norms are lognormal(0, 1): the q-quantile is exp(Phi^-1(q)).
  expected = np.exp(stats.norm.ppf(quantile))
  tail = np.asarray(history[-100:])
  assert np.median(tail) == pytest.approx(expected, rel=0.1)
  assert float(final.clip_norms) == pytest.approx(expected, rel=0.25)
  assert float(history[0]) == pytest.approx(0.01)


def test_per_layer_thresholds_follow_each_groups_quantile():
  clip = _clip({'a': 1.0, 'b': 1.0}, target_quantile=0.5)

  def rows(key, batch):
    ka, kb = jax.random.split(key)
    return {'a': _rows_with_norms(ka, batch, np.log(0.1)),
            'b': _rows_with_norms(kb, batch, np.log(5.0), dim=2)}

  final, _ = _run_steps(clip, rows, 400)
  assert float(final.clip_norms['a']) == pytest.approx(0.1, rel=0.2)
  assert float(final.clip_norms['b']) == pytest.approx(5.0, rel=0.2)
  assert clip.num_counts(final) == 2


def test_counts_are_centred_and_exclude_padding_and_nan():
  clip = _clip(1.0)
  grads = {'w': jnp.array([[0.5], [2.0], [jnp.nan], [0.1], [0.2]])}
  mask = jnp.array([True, True, True, True, False])
  out, state = clip.clip(grads, clip.init(grads), mask)
  # Real rows: 0.5 (under), 2.0 (over), NaN (over), 0.1 (under); padding: 0.
  assert float(state.counts) == 0.0
  assert int(out.num_nonfinite) == 1
  np.testing.assert_allclose(out.grad_sum['w'], [1.6], rtol=1e-6)


def test_count_sensitivity_is_one_half_per_group():
  clip = _clip({'a': 1.0, 'b': 0.5})
  rng = np.random.default_rng(0)
  grads = {'a': rng.normal(size=(6, 3)).astype(np.float32),
           'b': rng.normal(size=(6, 2)).astype(np.float32)}
  state = clip.init(grads)
  base = clip.clip(grads, state, None)[1].counts
  for j in range(6):
    for mask in (np.arange(6) != j,):
      counts = clip.clip(grads, state, mask)[1].counts
      for key in ('a', 'b'):
        assert abs(float(counts[key]) - float(base[key])) == 0.5


@pytest.mark.parametrize('microbatch_size', [1, 3, 4])
def test_threshold_updated_once_per_step_whatever_the_microbatching(
    microbatch_size):
  def loss_fn(w, example):
    return jnp.sum(w * example) ** 2

  clip = _clip(2.0, expected_batch_size=8)
  batch = jnp.asarray(np.random.default_rng(0).normal(size=(9, 3)),
                      jnp.float32)
  mask = jnp.arange(9) < 8
  params = jnp.ones(3)
  whole = dpjax.clipped_grad(loss_fn, clip)(params, batch, mask)
  chunked = jax.jit(dpjax.clipped_grad(
      loss_fn, clip, microbatch_size=microbatch_size))(params, batch, mask)
  # Clipping never moves the thresholds; it only accumulates the counts.
  assert float(chunked.clip_state.clip_norms) == 2.0
  assert float(chunked.clip_state.counts) == float(whole.clip_state.counts)
  after_whole = clip.end_step(whole.clip_state)
  after_chunked = clip.end_step(chunked.clip_state)
  assert float(after_chunked.clip_norms) == pytest.approx(
      float(after_whole.clip_norms), rel=1e-6)
  assert float(after_chunked.counts) == 0.0
  assert float(after_chunked.clip_norms) != 2.0


def test_count_noise_has_the_declared_std():
  sigma_b, batch, eta = 3.0, 100.0, 0.1
  clip = _clip(1.0, count_noise_std=sigma_b, expected_batch_size=batch,
               learning_rate=eta, target_quantile=0.5)
  state = clip.init(None)

  def one(key):
    return clip.end_step(state._replace(key=key)).clip_norms

  thresholds = jax.vmap(one)(jax.random.split(jax.random.key(3), 4000))
  # log C' = -eta (noise / batch + 1/2 - 1/2): noise = -log(C') batch / eta.
  noise = -np.log(np.asarray(thresholds)) * batch / eta
  assert stats.kstest(noise / sigma_b, 'norm').pvalue > 1e-3
  for wrong in (2 / 3, 3 / 2):
    assert stats.kstest(noise / (wrong * sigma_b), 'norm').pvalue < 1e-3


def test_thresholds_stay_in_public_range():
  clip = _clip(1.0, count_noise_std=1e6, learning_rate=5.0)
  final, history = _run_steps(
      clip, lambda k, b: {'w': _rows_with_norms(k, b)}, 50)
  history = np.asarray(history)
  assert np.all(history >= adaptive_clipping.MIN_CLIP_NORM)
  assert np.all(history <= adaptive_clipping.MAX_CLIP_NORM)
  assert np.isfinite(float(final.clip_norms))


class TestAccounting:

  def test_joint_and_sigma_eff_are_inverse(self):
    for z, sigma_b, k in [(1.0, 12.8, 1), (0.8, 5.0, 4), (2.0, 50.0, 62)]:
      joint = adaptive_clipping.joint_noise_multiplier(z, sigma_b, k)
      assert joint < z
      assert adaptive_clipping.gradient_noise_multiplier(
          joint, sigma_b, k) == pytest.approx(z, rel=1e-9)

  def test_sigma_eff_refuses_too_little_count_noise(self):
    with pytest.raises(ValueError, match='count_noise_std'):
      adaptive_clipping.gradient_noise_multiplier(1.0, 0.5)

  @pytest.mark.parametrize('mode', ['sigma_eff', 'compose'])
  @pytest.mark.parametrize('sigma,count_std,q,steps', [
      (1.0, 12.8, 256 / 60000, 2000),
      (0.6, 2.0, 0.01, 300),
      (3.0, 100.0, 0.1, 50),
  ])
  def test_epsilon_never_below_same_gradient_noise_without_it(
      self, mode, sigma, count_std, q, steps):
    """Opacus #807: adaptive clipping's epsilon ignored the count release."""
    n = 60000
    base = dpjax.PrivacyConfig(
        clip_norm=1.0, noise_multiplier=sigma, delta=1e-5,
        expected_batch_size=round(q * n), steps=steps)
    adaptive = dataclasses.replace(base, clipping=dpjax.plan.ClippingConfig(
        mode='adaptive', count_noise_std=count_std,
        adaptive_accounting=mode))
    plan = dpjax.make_plan(adaptive, n)
    same_noise = dpjax.make_plan(dataclasses.replace(
        base, noise_multiplier=plan.grad_noise_multiplier), n)
    assert plan.epsilon() >= same_noise.epsilon()
    # The ledger the training loop fills gives the same, larger, epsilon.
    ledger = accounting.PrivacyLedger()
    for step in range(steps):
      plan.record_step(ledger, step)
    assert ledger.epsilon(1e-5) == pytest.approx(plan.epsilon(), rel=1e-9)
    if mode == 'compose':
      assert plan.grad_noise_multiplier == sigma
      assert plan.epsilon() > same_noise.epsilon()
    else:
      assert plan.grad_noise_multiplier > sigma
      assert plan.noise_multiplier == sigma

  def test_per_layer_counts_are_charged(self):
    params = {'a': jnp.zeros(3), 'b': jnp.zeros(2), 'c': jnp.zeros(1)}
    config = dpjax.PrivacyConfig(
        noise_multiplier=1.0, expected_batch_size=256, steps=100,
        clipping=dpjax.plan.ClippingConfig(
            mode='adaptive', layers='equal', count_noise_std=12.8,
            adaptive_accounting='compose'))
    plan = dpjax.make_plan(config, 60000, params=params)
    assert plan.num_counts == 3
    assert plan.noise_multiplier == pytest.approx(
        adaptive_clipping.joint_noise_multiplier(1.0, 12.8, 3))
    with pytest.raises(ValueError, match='params='):
      dpjax.make_plan(config, 60000)

  def test_separate_subsampled_events_would_understate_epsilon(self):
    """Why the count release is folded into the step's event.

    Gradient and counts see the same Poisson sample; composing them as two
    independently subsampled events gives a smaller (wrong) epsilon than the
    one subsampled Gaussian they really are.
    """
    z, z_b, q, steps = 0.7, 1.5, 0.05, 200
    joint = (z ** -2 + z_b ** -2) ** -0.5
    right = accounting.epsilon(accounting.dpsgd_event(joint, q, steps), 1e-5)
    wrong = accounting.epsilon(dp_accounting.ComposedDpEvent([
        accounting.dpsgd_event(z, q, steps),
        accounting.dpsgd_event(z_b, q, steps)]), 1e-5)
    assert wrong < right


class TinyModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_train_state_carries_the_clip_state():
  config = dpjax.PrivacyConfig(
      noise_multiplier=1.0, expected_batch_size=8, steps=3,
      clipping=dpjax.plan.ClippingConfig(mode='adaptive', count_noise_std=1.0))
  plan = dpjax.make_plan(config, 100)
  model = TinyModel()
  tx = optax.chain(plan.noise(), optax.sgd(0.1))
  state = train.create_train_state(model, jax.random.key(0), (8, 8, 1), tx)
  state = state.replace(clip_state=plan.clipping.init(state.params))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(100, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 100))
  step = train.make_train_step(model, plan, microbatch_size=4)
  before = float(state.clip_state.clip_norms)
  batch = plan.sampler.sample(0)
  state, _ = step(state, images, labels, batch.indices, batch.mask)
  assert float(state.clip_state.clip_norms) != before
  assert float(state.clip_state.counts) == 0.0
  # The thresholds are leaves of the TrainState pytree, so a checkpoint of
  # the state saves them.
  leaves = jax.tree.leaves(state)
  assert any(leaf is state.clip_state.clip_norms for leaf in leaves)
  summary = plan.summary(state.clip_state)
  assert summary['sensitivity'] == pytest.approx(
      float(state.clip_state.clip_norms))
  assert summary['final_clip_norms'] == [float(state.clip_state.clip_norms)]
