"""Tests for dpjax/audit.py: estimators, and the audit catching broken DP."""

import numpy as np
import pytest

import dpjax
from dpjax import accounting
from dpjax import audit

DELTA = 1e-5


class TestEstimators:

  def test_perfect_guesses_bound(self):
    # q^200 < 0.05 needs q > 0.9851, i.e. eps > log(q / (1 - q)) = 4.19.
    assert audit.one_run_epsilon_lower_bound(1000, 200, 200, 0.0) == (
        pytest.approx(4.19, abs=0.01))

  def test_chance_guesses_give_zero(self):
    assert audit.one_run_epsilon_lower_bound(1000, 200, 100, DELTA) == 0.0

  def test_p_value_grows_with_the_claimed_epsilon(self):
    # 80 of 100 right is unlikely under eps=0 (a coin) and likely under eps=4.
    p = [audit.one_run_p_value(1000, 100, 80, e, DELTA) for e in (0, 1, 2, 4)]
    assert p == sorted(p)
    assert p[0] < 1e-3 and p[-1] > 0.5

  def test_delta_weakens_the_bound(self):
    strict = audit.one_run_epsilon_lower_bound(1000, 200, 190, 0.0)
    loose = audit.one_run_epsilon_lower_bound(1000, 200, 190, 1e-4)
    assert loose < strict

  def test_one_run_audit_counts_guesses(self):
    scores = np.arange(10.0)
    included = np.array([0, 0, 0, 1, 0, 1, 1, 0, 1, 1], bool)
    result = audit.one_run_audit(scores, included, 3, 3, 0.0)
    # top 3 (7, 8, 9): 2 in; bottom 3 (0, 1, 2): 3 out.
    assert (result.num_guesses, result.num_correct) == (6, 5)

  def test_clopper_pearson(self):
    assert audit.clopper_pearson_epsilon_lower_bound(
        5, 500, 5, 500, 0.0) == pytest.approx(3.74, abs=0.01)
    assert audit.clopper_pearson_epsilon_lower_bound(
        250, 500, 250, 500, DELTA) == 0.0


class TestGradientCanaryAudit:
  """The audit passes the correct mechanism and flags broken ones."""

  SETTINGS = dict(sampling_rate=0.5, steps=20, num_canaries=1000, seed=0,
                  microbatch_size=64)

  @pytest.fixture(scope='class')
  def sigma(self):
    return accounting.calibrate_noise_multiplier(2.0, DELTA, 0.5, 20)

  def test_correct_mechanism_stays_below_claim(self, sigma):
    result = audit.gradient_canary_audit(dpjax.clip_per_example(1.0), sigma,
                                         **self.SETTINGS)
    assert result.claimed_epsilon == pytest.approx(2.0, rel=1e-2)
    assert not result.violation
    assert 0 < result.epsilon_lower_bound < result.claimed_epsilon
    assert result.num_correct > result.num_guesses / 2  # it does learn

  def test_missing_clipping_is_flagged(self, sigma):
    result = audit.gradient_canary_audit(audit.unclipped(1.0), sigma,
                                         **self.SETTINGS)
    assert result.violation
    assert result.epsilon_lower_bound > 1.5 * result.claimed_epsilon

  def test_noise_divided_by_ten_is_flagged(self, sigma):
    clip = dpjax.clip_per_example(1.0)
    weak = dpjax.add_gaussian_noise(sigma / 10, clip.sensitivity(), 250.0,
                                    key=1)
    result = audit.gradient_canary_audit(clip, sigma, noise_tx=weak,
                                         **self.SETTINGS)
    assert result.violation


class TestMultiRunAudit:

  @staticmethod
  def _run(sigma_used):
    clip = dpjax.clip_per_example(1.0)

    def run(seed, include):
      grads = {'w': np.array([[30.0 if include else 0.0]], np.float32)}
      summed, _ = clip.update(grads, clip.init(None))
      noise = dpjax.add_gaussian_noise(sigma_used, 1.0, 1.0, key=seed)
      out, _ = noise.update(summed, noise.init(None))
      return float(out['w'][0])

    return run

  def test_correct_and_broken_gaussian_mechanism(self):
    # One Gaussian release; 400 runs can certify at most eps ~ 4 (perfect
    # separation), so the claim must sit below that.
    sigma = 2.0
    claimed = accounting.epsilon(accounting.dpsgd_event(sigma, 1.0, 1), DELTA)
    good = audit.multi_run_audit(self._run(sigma), 400, 0.5, DELTA)
    bad = audit.multi_run_audit(self._run(sigma / 10), 400, 0.5, DELTA)
    assert good < claimed
    assert bad > claimed
