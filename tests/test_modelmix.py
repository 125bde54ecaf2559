"""Tests for dpjax/modelmix.py: mixing, refined clipping, accountant, guard."""

import dataclasses
import math

import dp_accounting
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import dpjax
from configs import cifar10_modelmix
from configs import cifar10_modelmix_cpu
from configs import default
from dpjax import clipping
from dpjax import modelmix
from dpjax import train
from tests import strategies

Relation = dp_accounting.NeighboringRelation
TOL = 1e-5


def _gap_enforced(current, previous, tau):
  """Reference gap rule in float64, written independently of the module."""
  current = np.asarray(current, np.float64)
  previous = np.asarray(previous, np.float64)
  diff = current - previous
  sign = np.where(diff >= 0, 1.0, -1.0)
  push = np.where(np.abs(diff) < tau, sign * tau / 2, 0.0)
  return current + push, previous - push


def _mix_once(current, previous, tau, key=0, updates=None):
  """One mixing step from explicit (w_{k-1}, w_{k-2}); returns w_k, state."""
  tx = dpjax.mix_model_states(tau, key)
  state = tx.init(current)._replace(previous_params=previous)
  if updates is None:
    updates = jax.tree.map(jnp.zeros_like, current)
  out, state = jax.jit(tx.update)(updates, state, current)
  return optax.apply_updates(current, out), state


class TestMixing:

  def test_stays_in_gap_enforced_segment(self):
    rng = np.random.default_rng(0)
    tau = 0.1
    previous = rng.normal(size=2000).astype(np.float32)
    # Far apart, closer than tau, and equal coordinates.
    offsets = np.concatenate([rng.normal(0, 1, 1000),
                              rng.uniform(-tau, tau, 500), np.zeros(500)])
    current = (previous + offsets).astype(np.float32)
    step = rng.normal(0, 0.01, 2000).astype(np.float32)
    new, _ = _mix_once({'w': jnp.asarray(current)},
                       {'w': jnp.asarray(previous)}, tau,
                       updates={'w': jnp.asarray(step)})
    a, b = _gap_enforced(current, previous, tau)
    mixed = np.asarray(new['w'], np.float64) - step
    slack = 1e-5
    assert np.all(mixed >= np.minimum(a, b) - slack)
    assert np.all(mixed <= np.maximum(a, b) + slack)
    assert np.all(np.abs(a - b) >= tau - 1e-6)

  def test_far_coordinates_are_not_pushed(self):
    a, b = modelmix.enforce_gap(jnp.array([1.0, -2.0]), jnp.array([0.0, 0.0]),
                                0.5)
    np.testing.assert_array_equal(a, [1.0, -2.0])
    np.testing.assert_array_equal(b, [0.0, 0.0])

  def test_gap_rule_pushes_along_the_difference(self):
    a, b = modelmix.enforce_gap(jnp.array([0.1, -0.1]), jnp.array([0.0, 0.0]),
                                1.0)
    np.testing.assert_allclose(a, [0.6, -0.6], rtol=1e-6)
    np.testing.assert_allclose(b, [-0.5, 0.5], rtol=1e-6)

  def test_gap_rule_with_equal_coordinates(self):
    # sign(0) must not be 0: equal coordinates end exactly tau apart, and the
    # mixed value spreads over the whole segment of width tau.
    tau = 0.2
    w = jnp.full((4000,), 0.7)
    a, b = modelmix.enforce_gap(w, w, tau)
    np.testing.assert_allclose(a - b, tau, rtol=1e-6)
    new, _ = _mix_once({'w': w}, {'w': w}, tau)
    spread = np.asarray(new['w']) - 0.7
    assert np.all(np.abs(spread) <= tau / 2 + 1e-6)
    assert spread.max() - spread.min() > 0.99 * tau

  def test_alpha_is_uniform_and_fresh_across_coordinates_leaves_and_steps(self):
    tau = 1.0
    current = {'a': jnp.ones(3000), 'b': jnp.ones(3000)}
    previous = {'a': jnp.zeros(3000), 'b': jnp.zeros(3000)}
    tx = dpjax.mix_model_states(tau, jax.random.key(7))
    update = jax.jit(tx.update)
    state = tx.init(current)._replace(previous_params=previous)
    zeros = jax.tree.map(jnp.zeros_like, current)
    alphas = []
    for _ in range(2):
      out, state = update(zeros, state, current)
      # w_k = alpha * 1 + (1 - alpha) * 0: the update recovers alpha.
      new = optax.apply_updates(current, out)
      alphas.append({k: np.asarray(v) for k, v in new.items()})
      state = state._replace(previous_params=previous)
    first, second = alphas
    for alpha in (first['a'], first['b'], second['a']):
      assert stats.kstest(alpha, 'uniform').pvalue > 1e-3
      assert len(np.unique(alpha)) > 2990
    assert abs(np.corrcoef(first['a'], first['b'])[0, 1]) < 0.1
    assert abs(np.corrcoef(first['a'], second['a'])[0, 1]) < 0.1

  def test_first_step_mixes_the_initial_state_with_itself(self):
    tx = dpjax.mix_model_states(0.5, 0)
    params = {'w': jnp.zeros(1000)}
    state = tx.init(params)
    out, state = tx.update({'w': jnp.zeros(1000)}, state, params)
    assert 0 < float(jnp.abs(out['w']).max()) <= 0.25
    # The state now holds the parameters the step started from (w_{k-2}).
    np.testing.assert_array_equal(state.previous_params['w'], params['w'])

  def test_composes_with_noise_and_sgd(self):
    plan = dpjax.make_plan(dpjax.PrivacyConfig(
        clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=2, steps=3),
                           100)
    tx = optax.chain(plan.noise(), optax.sgd(0.5),
                     dpjax.mix_model_states(1e-3, 1))
    params = {'w': jnp.array([0.0, 10.0])}
    state = tx.init(params)
    for _ in range(3):
      updates, state = jax.jit(tx.update)({'w': jnp.array([2.0, 2.0])}, state,
                                          params)
      params = optax.apply_updates(params, updates)
    # Each step moves by -0.5 * (2 / 2) plus a mixing move of at most one
    # previous step (0.5) or the gap (1e-3).
    assert np.all(np.asarray(params['w']) < np.array([0.0, 10.0]) - 0.5)
    assert np.all(np.isfinite(np.asarray(params['w'])))

  def test_update_requires_params(self):
    tx = dpjax.mix_model_states(0.1, 0)
    with pytest.raises(ValueError, match='current parameters'):
      tx.update({'w': jnp.zeros(2)}, tx.init({'w': jnp.zeros(2)}))

  @pytest.mark.parametrize('bad', [0.0, -1.0, math.inf])
  def test_rejects_bad_tau(self, bad):
    with pytest.raises(ValueError, match='tau'):
      dpjax.mix_model_states(bad, 0)


def _clipped(clip, grads, mask=None):
  out, _ = clip.clip(grads, clip.init(None), mask)
  return out


def _dist(x, y):
  diff = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, x, y)
  return float(np.sqrt(sum(np.sum(d ** 2) for d in jax.tree.leaves(diff))))




class TestRefinedClipping:

  def test_l2_first_then_linf(self):
    clip = dpjax.clip_l2_then_linf(1.0, p=4.0)
    out = _clipped(clip, {'w': jnp.array([[10.0, 1.0]])})
    # L2 to 1 gives (0.995, 0.0995); the clamp to 1/sqrt(4) then cuts the
    # first coordinate. Clamping first would give (0.5, 0.5).
    np.testing.assert_allclose(out.grad_sum['w'], [0.5, 0.0995037], rtol=1e-5)
    assert clip.linf_bound == 0.5 and clip.p == 4.0

  def test_every_row_obeys_both_bounds(self):
    rng = np.random.default_rng(2)
    clip = dpjax.clip_l2_then_linf(2.0, p=9.0)
    grads = rng.normal(0, 5, (16, 7)).astype(np.float32)
    grads[3, 0] = 1e6
    for row in grads:
      out = _clipped(clip, {'w': jnp.asarray(row[None])}).grad_sum['w']
      assert float(jnp.abs(out).max()) <= 2.0 / 3.0 * (1 + TOL)
      assert float(jnp.linalg.norm(out)) <= 2.0 * (1 + TOL)

  def test_p_one_is_flat_clipping(self):
    rng = np.random.default_rng(3)
    grads = {'w': jnp.asarray(rng.normal(0, 3, (6, 5)), jnp.float32)}
    np.testing.assert_allclose(
        _clipped(dpjax.clip_l2_then_linf(1.0, 1.0), grads).grad_sum['w'],
        _clipped(dpjax.clip_per_example(1.0), grads).grad_sum['w'], rtol=1e-6)

  @pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf, 3e38])
  def test_nonfinite_rows_and_padding_contribute_zero(self, bad):
    clip = dpjax.clip_l2_then_linf(1.0, p=4.0)
    grads = {'w': jnp.array([[0.3, 0.4], [bad, 1.0], [5.0, 5.0]])}
    out = _clipped(clip, grads, jnp.array([True, True, False]))
    np.testing.assert_allclose(out.grad_sum['w'], [0.3, 0.4], rtol=1e-6)
    assert int(out.num_nonfinite) == 1
    np.testing.assert_array_equal(out.norms[2], 0.0)

  def test_microbatching_does_not_change_the_sum(self):
    clip = dpjax.clip_l2_then_linf(0.5, p=3.0)

    def loss(w, ex):
      return 0.5 * jnp.sum((ex['x'] * w - ex['y']) ** 2)

    rng = np.random.default_rng(4)
    batch = {'x': jnp.asarray(rng.normal(size=(7, 3)), jnp.float32),
             'y': jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)}
    mask = jnp.arange(7) < 6
    whole = dpjax.clipped_grad(loss, clip)(jnp.ones(3), batch, mask)
    chunked = dpjax.clipped_grad(loss, clip, microbatch_size=2)(
        jnp.ones(3), batch, mask)
    np.testing.assert_allclose(whole.grad_sum, chunked.grad_sum, rtol=1e-5)

  def test_sensitivity_is_the_l2_bound(self):
    clip = dpjax.clip_l2_then_linf(3.0, p=100.0)
    assert clip.sensitivity() == 3.0
    assert clip.sensitivity(Relation.REPLACE_ONE) == 6.0
    assert clip.name == 'l2_then_linf'

  @pytest.mark.parametrize('bad', [0.5, 0.0, -1.0, np.nan])
  def test_rejects_bad_p(self, bad):
    with pytest.raises(ValueError, match='p must'):
      dpjax.clip_l2_then_linf(1.0, bad)

  @settings(max_examples=40, deadline=None)
  @given(grads=strategies.batches(5), j=st.integers(0, 4),
         p=st.sampled_from([1.0, 4.0, 100.0]))
  def test_add_remove_property(self, grads, j, p):
    clip = dpjax.clip_l2_then_linf(1.0, p)
    full = _clipped(clip, grads).grad_sum
    removed = _clipped(
        clip, jax.tree.map(lambda x: np.delete(x, j, axis=0), grads)).grad_sum
    assert _dist(full, removed) <= clip.sensitivity() * (1 + TOL)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(full))

  @settings(max_examples=40, deadline=None)
  @given(grads=strategies.batches(4), other=strategies.batches(1), j=st.integers(0, 3),
         p=st.sampled_from([1.0, 4.0, 100.0]))
  def test_replace_one_property(self, grads, other, j, p):
    clip = dpjax.clip_l2_then_linf(1.0, p)
    replaced = jax.tree.map(
        lambda x, y: np.concatenate([x[:j], y, x[j + 1:]]), grads, other)
    dist = _dist(_clipped(clip, grads).grad_sum,
                 _clipped(clip, replaced).grad_sum)
    assert dist <= clip.sensitivity(Relation.REPLACE_ONE) * (1 + TOL)

  @settings(max_examples=40, deadline=None)
  @given(grads=strategies.batches(5), j=st.integers(0, 4), mask=hnp.arrays(bool, (5,)))
  def test_padding_flip_property(self, grads, j, mask):
    clip = dpjax.clip_l2_then_linf(1.0, 4.0)
    flipped = mask.copy()
    flipped[j] = ~flipped[j]
    dist = _dist(_clipped(clip, grads, mask).grad_sum,
                 _clipped(clip, grads, flipped).grad_sum)
    assert dist <= clip.sensitivity() * (1 + TOL)


# The authors' CIFAR-10 run (PAPERS.md section 3).
PAPER = dict(noise_multiplier=0.335, sampling_rate=1500 / 50000, steps=3400,
             clip_norm=20.0, expected_batch_size=1500, tau_over_lr=0.15,
             p=100.0, delta=1e-5)


class TestAccountant:

  @pytest.mark.parametrize('change,expected,tol', [
      ({}, 8.00, 0.01),
      ({'p': 25.0}, 9.3, 0.01),
      ({'tau_over_lr': 0.075}, 14.2, 0.01),
      ({'tau_over_lr': 0.3}, 5.0, 0.01),
      # PAPERS.md quotes 448.8: that figure is what Phi(a) - Phi(b) gives
      # when it cancels to 0 in the right tail (68 grid points at p = 1)
      # and the resulting NaN terms are dropped. With the density computed
      # without cancellation the same grid gives 450.48, as does any wider
      # or finer grid; the cut at w/2 + 8 sbar gives 447.0.
      ({'p': 1.0}, 450.48, 0.001),
  ])
  def test_reference_values(self, change, expected, tol):
    eps = modelmix.modelmix_epsilon(**{**PAPER, **change})
    assert eps == pytest.approx(expected, rel=tol)

  def test_far_below_the_standard_epsilon_of_the_same_run(self):
    # ModelMix 8.0 vs ~551 (RDP) for the standard Poisson-subsampled Gaussian.
    from dpjax import accounting  # pylint: disable=g-import-not-at-top
    standard = accounting.epsilon(accounting.dpsgd_event(
        PAPER['noise_multiplier'], PAPER['sampling_rate'], PAPER['steps']),
                                  1e-5, 'rdp')
    assert standard == pytest.approx(551, rel=0.01)
    assert modelmix.modelmix_epsilon(**PAPER) < standard / 50

  def test_vanishing_mixing_is_the_gaussian_rdp_bound(self):
    # w -> 0: P0 is N(0, sbar^2) and A_k = exp(k (k-1) / (2 sigma^2)), the
    # integer-order RDP bound of the Poisson-subsampled Gaussian.
    sigma, c, b, p, q, steps = 1.1, 1.0, 256, 4.0, 0.01, 1000
    sbar, shift = sigma * c / b, c / (math.sqrt(p) * b)
    log_a = modelmix.log_moments(sbar, 1e-3 * sbar, shift, p, 19)
    k = np.arange(20)
    np.testing.assert_allclose(log_a, k * (k - 1) / (2 * sigma ** 2),
                               rtol=1e-4, atol=1e-9)

    def gaussian_eps(order):
      ks = np.arange(order + 1)
      terms = [math.comb(order, j) * (1 - q) ** (order - j) * q ** j
               * math.exp(j * (j - 1) / (2 * sigma ** 2)) for j in ks]
      return (steps * math.log(sum(terms)) + math.log(1e5)) / (order - 1)

    expected = min(gaussian_eps(a) for a in range(2, 20))
    eps = modelmix.modelmix_epsilon(
        noise_multiplier=sigma, sampling_rate=q, steps=steps, clip_norm=c,
        expected_batch_size=b, tau_over_lr=1e-3 * sbar, p=p, delta=1e-5)
    assert eps == pytest.approx(expected, rel=1e-4)

  def test_monotone_in_steps_gap_and_noise(self):

    def eps(**change):
      return modelmix.modelmix_epsilon(**{**PAPER, **change})

    assert eps(steps=1000) < eps(steps=2000) < eps()
    assert eps(tau_over_lr=0.3) < eps() < eps(tau_over_lr=0.075)
    assert eps(noise_multiplier=0.5) < eps()
    assert eps(steps=0) == 0.0
    assert eps(noise_multiplier=0.0) == math.inf

  def test_moments_are_cached_across_steps(self):
    modelmix.log_moments.cache_clear()
    for steps in range(1, 200):
      modelmix.modelmix_epsilon(**{**PAPER, 'steps': steps})
    info = modelmix.log_moments.cache_info()
    assert info.misses == 1 and info.hits == 198

  def test_wide_uniform_is_fast(self):
    # w / sbar = 1e6: the flat middle is summed in closed form.
    eps = modelmix.modelmix_epsilon(**{**PAPER, 'tau_over_lr': 4.5e3})
    assert 0 < eps < modelmix.modelmix_epsilon(**PAPER)

  @pytest.mark.parametrize('field,bad', [
      ('sampling_rate', 0.0), ('sampling_rate', 1.5), ('steps', -1),
      ('clip_norm', 0.0), ('tau_over_lr', -0.1), ('delta', 1.0),
      ('orders', (1, 2))])
  def test_rejects_bad_settings(self, field, bad):
    with pytest.raises(ValueError, match=field):
      modelmix.modelmix_epsilon(**{**PAPER, field: bad})


def _assumptions(**change):
  facts = dict(optimizer='sgd', momentum=0.0, constant_learning_rate=True,
               clipping=dpjax.clip_l2_then_linf(1.0, 100.0),
               poisson_sampling=True, relation=Relation.ADD_OR_REMOVE_ONE)
  return modelmix.failed_assumptions(**{**facts, **change})


class TestAssumptionGuard:

  def test_matching_pipeline_passes(self):
    assert not _assumptions()
    assert not _assumptions(clipping=dpjax.clip_per_example(1.0))

  @pytest.mark.parametrize('change,match', [
      ({'momentum': 0.9}, 'momentum is 0.9'),
      ({'optimizer': 'adam'}, "optimizer is 'adam'"),
      ({'constant_learning_rate': False}, 'constant learning rate'),
      ({'poisson_sampling': False}, 'Poisson'),
      ({'relation': Relation.REPLACE_ONE}, 'add/remove'),
  ])
  def test_each_failure_is_named(self, change, match):
    failed = _assumptions(**change)
    assert len(failed) == 1 and match in failed[0]

  def test_other_clipping_is_named(self):
    other = clipping.make_per_example_clipping(
        optax.init_empty_state, dpjax.clip_per_example(1.0).clip, 1.0,
        'layerwise')
    failed = _assumptions(clipping=other)
    assert failed == ["L2-then-L-inf clipping: clipping is 'layerwise'"]
    with pytest.raises(ValueError, match='layerwise'):
      _ = modelmix.ModelMixAccountant(_plan(other), 0.15).p

  def test_other_release_in_ledger_withholds(self):
    plan = _plan(dpjax.clip_l2_then_linf(1.0, 4.0))
    report = modelmix.ModelMixReport(
        modelmix.ModelMixAccountant(plan, 0.15), tau=0.1)
    ledger = dpjax.PrivacyLedger()
    ledger.record(plan.step_event(), 5)
    report.update(ledger)
    assert report.epsilon == pytest.approx(
        modelmix.ModelMixAccountant(plan, 0.15).epsilon(5))
    ledger.record(dp_accounting.GaussianDpEvent(5.0))
    with pytest.warns(UserWarning, match='no release besides'):
      report.update(ledger)
    assert report.epsilon is None
    assert report.postfix() == {'eps_modelmix': 'withheld'}


def _plan(clip):
  plan = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=10, steps=5),
                         1000)
  return dataclasses.replace(plan, clipping=clip)


def _digits_config(**optimizer):
  config = default.get_config()
  config.progress_bar = False
  config.privacy.steps = 4
  config.privacy.noise_multiplier = 1.0  # no calibration: a fast test
  config.privacy.target_epsilon = None
  config.perf.pad_to_multiple_of = 512  # one compiled batch size
  config.eval_every_steps = config.log_every_steps = 4
  config.modelmix.enabled = True
  config.modelmix.p = 16.0
  config.optimizer.update(optimizer)
  return config


class TestTraining:

  def test_reports_both_epsilons(self, tmp_path):
    config = _digits_config()
    summary = train.train_and_evaluate(config, str(tmp_path))
    plan = dpjax.make_plan(train.privacy_config(config, linf_p=16.0),
                           summary['dataset_size'])
    assert plan.clipping.name == 'l2_then_linf'
    expected = modelmix.ModelMixAccountant(plan, 0.15).epsilon()
    assert summary['epsilon_modelmix'] == pytest.approx(expected, rel=1e-9)
    assert summary['epsilon'] == pytest.approx(plan.epsilon(), rel=1e-9)
    assert summary['epsilon_modelmix'] < summary['epsilon']
    assert summary['clipping'] == 'l2_then_linf'
    assert summary['modelmix']['p'] == 16.0
    assert summary['modelmix']['tau'] == pytest.approx(0.15 * 2.0)
    assert not summary['modelmix']['withheld_because']

  def test_momentum_withholds_modelmix_epsilon(self, tmp_path):
    config = _digits_config(momentum=0.9)
    with pytest.warns(UserWarning, match='momentum'):
      summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary['epsilon_modelmix'] is None
    assert math.isfinite(summary['epsilon'])
    assert 'momentum' in summary['modelmix']['withheld_because'][0]


def test_cifar10_config_has_the_paper_settings():
  config = cifar10_modelmix.get_config()
  assert (config.data.name, config.model.name, config.model.norm) == (
      'cifar10', 'resnet20', 'group')
  p = config.privacy
  assert (p.clip_norm, p.expected_batch_size, p.steps, p.delta) == (
      20.0, 1500, 3500, 1e-5)
  assert (config.optimizer.name, config.optimizer.learning_rate,
          config.optimizer.momentum, config.optimizer.schedule) == (
              'sgd', 0.15, 0.0, 'constant')
  assert config.modelmix.enabled
  assert (config.modelmix.tau_over_lr, config.modelmix.p) == (0.15, 100.0)
  plan = dpjax.make_plan(
      train.privacy_config(config, linf_p=config.modelmix.p), 50000)
  assert plan.sampling_rate == 1500 / 50000
  eps = modelmix.ModelMixAccountant(plan, config.modelmix.tau_over_lr).epsilon()
  assert eps == pytest.approx(8.0, rel=0.01) and eps <= 8.0


def test_cifar10_cpu_config_keeps_the_recipe_at_modelmix_epsilon_8():
  config = cifar10_modelmix_cpu.get_config()
  assert (config.model.name, config.model.width) == ('resnet20', 0.5)
  assert (config.privacy.clip_norm, config.optimizer.learning_rate,
          config.modelmix.tau_over_lr, config.modelmix.p) == (
              20.0, 0.15, 0.15, 100.0)
  plan = dpjax.make_plan(
      train.privacy_config(config, linf_p=config.modelmix.p), 50000)
  eps = modelmix.ModelMixAccountant(plan, config.modelmix.tau_over_lr).epsilon()
  assert eps == pytest.approx(8.0, rel=0.01) and eps <= 8.0
  assert config.eval_size < 10000
