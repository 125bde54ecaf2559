"""Tests for dpjax/clipping.py: values, NaN handling, sensitivity properties."""

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

import dpjax
from dpjax import clipping

Relation = dp_accounting.NeighboringRelation
# Float32 rounding of g * (C / ||g||) can overshoot C by a few ulps.
TOL = 1e-5

# Rows mixing ordinary values, huge ones (whose squares overflow float32),
# NaN and +-Inf: every kind of row an adversary or a bug can produce.
_ELEMENTS = st.one_of(
    st.floats(-10, 10, width=32),
    st.sampled_from([1e30, -1e30, 3e38, np.nan, np.inf, -np.inf, 0.0]),
)


def _batches(batch_size):
  return st.fixed_dictionaries({
      'a': hnp.arrays(np.float32, (batch_size, 3), elements=_ELEMENTS),
      'b': hnp.arrays(np.float32, (batch_size, 2, 2), elements=_ELEMENTS),
  })


def _clipped_sum(clip, grads, mask=None):
  out, _ = clip.clip(grads, clip.init(None), mask)
  return out


def _dist(x, y):
  diff = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, x, y)
  return float(np.sqrt(sum(np.sum(d ** 2) for d in jax.tree.leaves(diff))))


def _drop(grads, j):
  return jax.tree.map(lambda x: np.delete(x, j, axis=0), grads)


class TestFlatClipping:

  def test_values_clip_and_sum(self):
    clip = dpjax.clip_per_example(1.0)
    grads = {'w': jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    out = _clipped_sum(clip, grads)
    np.testing.assert_allclose(out.grad_sum['w'], [0.9, 1.2], rtol=1e-6)
    np.testing.assert_allclose(out.norms, [5.0, 0.5], rtol=1e-6)
    assert int(out.num_clipped) == 1

  def test_small_gradients_pass_unchanged(self):
    clip = dpjax.clip_per_example(10.0)
    grads = {'w': jnp.array([[1.0, 2.0], [3.0, -1.0]])}
    out = _clipped_sum(clip, grads)
    np.testing.assert_array_equal(out.grad_sum['w'], [4.0, 1.0])

  @pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf, 3e38])
  def test_nonfinite_row_is_zeroed_and_counted(self, bad):
    clip = dpjax.clip_per_example(1.0)
    grads = {'w': jnp.array([[0.3, 0.4], [bad, 1.0], [0.0, 0.5]])}
    out = _clipped_sum(clip, grads)
    np.testing.assert_allclose(out.grad_sum['w'], [0.3, 0.9], rtol=1e-6)
    assert int(out.num_nonfinite) == 1
    assert np.isinf(out.norms[1])

  def test_padding_rows_contribute_exactly_zero(self):
    clip = dpjax.clip_per_example(1.0)
    grads = {'w': jnp.array([[0.3, 0.4], [np.nan, 1e30], [5.0, 5.0]])}
    mask = jnp.array([True, False, False])
    out = _clipped_sum(clip, grads, mask)
    np.testing.assert_array_equal(
        out.grad_sum['w'], np.array([0.3, 0.4], np.float32))
    assert int(out.num_nonfinite) == 0
    np.testing.assert_array_equal(out.norms[1:], [0.0, 0.0])

  def test_sensitivity_per_relation(self):
    clip = dpjax.clip_per_example(2.5)
    assert clip.sensitivity() == 2.5
    assert clip.sensitivity(Relation.ADD_OR_REMOVE_ONE) == 2.5
    assert clip.sensitivity(Relation.REPLACE_ONE) == 5.0

  def test_update_in_optax_chain(self):
    # Standalone use: per-example grads in, noisy mean update out.
    clip = dpjax.clip_per_example(1.0)
    noise = dpjax.add_gaussian_noise(0.0, clip.sensitivity(), 2.0, key=0)
    tx = optax.chain(clip, noise, optax.sgd(1.0))
    params = {'w': jnp.zeros(2)}
    grads = {'w': jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates['w'], [-0.45, -0.6], rtol=1e-6)

  def test_update_accepts_mask_through_chain(self):
    clip = dpjax.clip_per_example(1.0)
    tx = optax.chain(clip, optax.sgd(1.0))
    grads = {'w': jnp.array([[0.3, 0.4], [0.6, 0.8]])}
    updates, _ = tx.update(grads, tx.init(None), None,
                           mask=jnp.array([False, True]))
    np.testing.assert_allclose(updates['w'], [-0.6, -0.8], rtol=1e-6)

  @pytest.mark.parametrize('bad', [0.0, -1.0, np.nan, np.inf])
  def test_rejects_bad_clip_norm(self, bad):
    with pytest.raises(ValueError, match='l2_norm_clip'):
      dpjax.clip_per_example(bad)

  def test_rejects_non_number(self):
    with pytest.raises(TypeError, match='l2_norm_clip'):
      dpjax.clip_per_example('1.0')

  def test_rejects_mismatched_batch_sizes(self):
    clip = dpjax.clip_per_example(1.0)
    grads = {'a': jnp.zeros((3, 2)), 'b': jnp.zeros((4, 2))}
    with pytest.raises(ValueError, match='common batch dimension'):
      _clipped_sum(clip, grads)

  def test_rejects_mask_of_wrong_shape(self):
    clip = dpjax.clip_per_example(1.0)
    with pytest.raises(ValueError, match='mask must have shape'):
      _clipped_sum(clip, {'a': jnp.zeros((3, 2))}, jnp.ones(4, bool))


class TestSensitivityProperty:
  """||f(D) - f(D')|| <= declared sensitivity for neighbouring batches."""

  @settings(max_examples=60, deadline=None)
  @given(grads=_batches(5), j=st.integers(0, 4),
         clip_norm=st.sampled_from([0.1, 1.0, 7.0]))
  def test_add_remove(self, grads, j, clip_norm):
    clip = dpjax.clip_per_example(clip_norm)
    full = _clipped_sum(clip, grads).grad_sum
    removed = _clipped_sum(clip, _drop(grads, j)).grad_sum
    bound = clip.sensitivity(Relation.ADD_OR_REMOVE_ONE)
    assert _dist(full, removed) <= bound * (1 + TOL)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(full))

  @settings(max_examples=60, deadline=None)
  @given(grads=_batches(4), other=_batches(1), j=st.integers(0, 3),
         clip_norm=st.sampled_from([0.1, 1.0, 7.0]))
  def test_replace_one(self, grads, other, j, clip_norm):
    clip = dpjax.clip_per_example(clip_norm)
    replaced = jax.tree.map(lambda x, y: np.concatenate(
        [x[:j], y, x[j + 1:]]), grads, other)
    dist = _dist(_clipped_sum(clip, grads).grad_sum,
                 _clipped_sum(clip, replaced).grad_sum)
    assert dist <= clip.sensitivity(Relation.REPLACE_ONE) * (1 + TOL)

  @settings(max_examples=60, deadline=None)
  @given(grads=_batches(5), j=st.integers(0, 4),
         mask=hnp.arrays(bool, (5,)))
  def test_padding_flip(self, grads, j, mask):
    clip = dpjax.clip_per_example(1.0)
    flipped = mask.copy()
    flipped[j] = ~flipped[j]
    dist = _dist(_clipped_sum(clip, grads, mask).grad_sum,
                 _clipped_sum(clip, grads, flipped).grad_sum)
    assert dist <= clip.sensitivity() * (1 + TOL)

  def test_adversarial_huge_norms(self):
    clip = dpjax.clip_per_example(1.0)
    base = {'w': np.random.default_rng(0).normal(size=(8, 100)).astype(
        np.float32)}
    for scale in (1e3, 1e10, 1e18, 1e30):
      attacked = {'w': base['w'].copy()}
      attacked['w'][3] = scale
      dist = _dist(_clipped_sum(clip, base).grad_sum,
                   _clipped_sum(clip, attacked).grad_sum)
      assert dist <= clip.sensitivity(Relation.REPLACE_ONE) * (1 + TOL)


def test_per_example_global_norms_matches_numpy():
  rng = np.random.default_rng(1)
  grads = {'a': rng.normal(size=(4, 3)), 'b': rng.normal(size=(4, 2, 5))}
  expected = np.sqrt((grads['a'] ** 2).sum(1) + (grads['b'] ** 2).sum((1, 2)))
  np.testing.assert_allclose(
      clipping.per_example_global_norms(grads), expected, rtol=1e-5)
