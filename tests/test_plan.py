"""Tests for dpjax/plan.py: the pieces agree; bad settings are refused."""

import dataclasses

import dp_accounting
import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from dpjax import accounting

BASE = dpjax.PrivacyConfig(clip_norm=0.5, noise_multiplier=1.1, delta=1e-5,
                           expected_batch_size=256, epochs=15)


def test_pieces_agree():
  plan = dpjax.make_plan(BASE, 60000)
  assert plan.sampling_rate == plan.sampler.sampling_rate == 256 / 60000
  assert plan.num_steps == 3515
  assert plan.relation == dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  assert plan.sensitivity == 0.5
  assert plan.noise_std == pytest.approx(1.1 * 0.5)
  assert plan.step_event() == accounting.poisson_gaussian_event(
      1.1, 256 / 60000)
  assert plan.epsilon() == pytest.approx(1.281, rel=5e-3)


def test_noise_transform_uses_plan_std_and_public_divisor():
  plan = dpjax.make_plan(BASE, 60000)
  tx = plan.noise()
  out, _ = tx.update({'w': jnp.zeros(20000)}, tx.init(None))
  std = float(np.std(np.asarray(out['w'])))
  assert std == pytest.approx(plan.noise_std / 256, rel=0.03)


def test_target_epsilon_calibrates_noise():
  config = dataclasses.replace(BASE, noise_multiplier=None, target_epsilon=2.0)
  plan = dpjax.make_plan(config, 60000)
  assert plan.epsilon() <= 2.0
  assert plan.epsilon() == pytest.approx(2.0, rel=1e-2)


def test_summary_names_the_guarantee():
  summary = dpjax.make_plan(BASE, 60000).summary()
  for key in ('epsilon', 'delta', 'noise_multiplier', 'accountant', 'steps',
              'sampling_rate', 'clip_norm', 'sensitivity',
              'neighbouring_relation', 'sampler'):
    assert key in summary
  assert summary['sampler'] == 'poisson'


@pytest.mark.parametrize('change,match', [
    (dict(noise_multiplier=-1.0), 'noise_multiplier'),
    (dict(clip_norm=0.0), 'l2_norm_clip'),
    (dict(clip_norm=-2.0), 'l2_norm_clip'),
    (dict(delta=1.0), 'delta'),
    (dict(delta=1e-3), '1/N'),
    (dict(expected_batch_size=70000), 'larger than the dataset'),
    (dict(epochs=None), 'exactly one of privacy.epochs'),
    (dict(steps=10), 'exactly one of privacy.epochs'),
    (dict(target_epsilon=3.0), 'exactly one of privacy.noise_multiplier'),
    (dict(accountant='gdp'), 'accountant'),
])
def test_rejects_bad_settings(change, match):
  with pytest.raises(ValueError, match=match):
    dpjax.make_plan(dataclasses.replace(BASE, **change), 60000)
