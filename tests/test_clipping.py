"""Tests for dpjax/clipping.py: values, NaN handling, sensitivity properties."""

import copy
import dataclasses

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
from dpjax import batch_clipping
from dpjax import clipping
from tests import strategies

Relation = dp_accounting.NeighboringRelation
# Float32 rounding of g * (C / ||g||) can overshoot C by a few ulps.
TOL = 1e-5



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
  @given(grads=strategies.batches(5), j=st.integers(0, 4),
         clip_norm=st.sampled_from([0.1, 1.0, 7.0]))
  def test_add_remove(self, grads, j, clip_norm):
    clip = dpjax.clip_per_example(clip_norm)
    full = _clipped_sum(clip, grads).grad_sum
    removed = _clipped_sum(clip, _drop(grads, j)).grad_sum
    bound = clip.sensitivity(Relation.ADD_OR_REMOVE_ONE)
    assert _dist(full, removed) <= bound * (1 + TOL)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(full))

  @settings(max_examples=60, deadline=None)
  @given(grads=strategies.batches(4), other=strategies.batches(1), j=st.integers(0, 3),
         clip_norm=st.sampled_from([0.1, 1.0, 7.0]))
  def test_replace_one(self, grads, other, j, clip_norm):
    clip = dpjax.clip_per_example(clip_norm)
    replaced = jax.tree.map(lambda x, y: np.concatenate(
        [x[:j], y, x[j + 1:]]), grads, other)
    dist = _dist(_clipped_sum(clip, grads).grad_sum,
                 _clipped_sum(clip, replaced).grad_sum)
    assert dist <= clip.sensitivity(Relation.REPLACE_ONE) * (1 + TOL)

  @settings(max_examples=60, deadline=None)
  @given(grads=strategies.batches(5), j=st.integers(0, 4),
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


# Every clipping mode, built for the {'a': [B, 3], 'b': [B, 2, 2]} batches
# above with total bound C; each declares its sensitivity for its init state.
def _adaptive(c, **kw):
  from dpjax import adaptive_clipping  # pylint: disable=g-import-not-at-top
  return adaptive_clipping.clip_quantile(
      c, count_noise_std=1.0, expected_batch_size=4, key=0, **kw)


MODES = {
    'per_layer': lambda c: dpjax.clip_per_layer({'a': 0.6 * c, 'b': 0.8 * c}),
    'per_layer_noise': lambda c: dpjax.clip_per_layer(
        {'a': 0.6 * c, 'b': 0.8 * c}, noise='per_layer'),
    'automatic': lambda c: dpjax.clip_automatic(c, gamma=0.01),
    'normalized': dpjax.clip_normalized,
    'adaptive': _adaptive,
    'adaptive_per_layer': lambda c: _adaptive({'a': 0.6 * c, 'b': 0.8 * c}),
}


def _mode_sum(clip, grads, mask=None):
  state = clip.init(grads)
  out, _ = clip.clip(grads, state, mask)
  return out.grad_sum, clip.sensitivity(Relation.ADD_OR_REMOVE_ONE, state)


@pytest.mark.parametrize('mode', sorted(MODES))
class TestSensitivityPropertyEveryMode:
  """The same neighbouring-batch properties for every other clipping mode."""

  @settings(max_examples=15, deadline=None)
  @given(grads=strategies.batches(5), j=st.integers(0, 4),
         clip_norm=st.sampled_from([0.1, 7.0]))
  def test_add_remove(self, mode, grads, j, clip_norm):
    clip = MODES[mode](clip_norm)
    full, bound = _mode_sum(clip, grads)
    removed, _ = _mode_sum(clip, _drop(grads, j))
    assert _dist(full, removed) <= float(bound) * (1 + TOL)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(full))

  @settings(max_examples=15, deadline=None)
  @given(grads=strategies.batches(4), other=strategies.batches(1), j=st.integers(0, 3))
  def test_replace_one(self, mode, grads, other, j):
    clip = MODES[mode](1.0)
    replaced = jax.tree.map(lambda x, y: np.concatenate(
        [x[:j], y, x[j + 1:]]), grads, other)
    a, _ = _mode_sum(clip, grads)
    b, _ = _mode_sum(clip, replaced)
    bound = clip.sensitivity(Relation.REPLACE_ONE, clip.init(grads))
    assert _dist(a, b) <= float(bound) * (1 + TOL)

  @settings(max_examples=15, deadline=None)
  @given(grads=strategies.batches(5), j=st.integers(0, 4),
         mask=hnp.arrays(bool, (5,)))
  def test_padding_flip(self, mode, grads, j, mask):
    clip = MODES[mode](1.0)
    flipped = mask.copy()
    flipped[j] = ~flipped[j]
    a, bound = _mode_sum(clip, grads, mask)
    b, _ = _mode_sum(clip, grads, flipped)
    assert _dist(a, b) <= float(bound) * (1 + TOL)

  def test_adversarial_huge_tiny_and_nan_rows(self, mode):
    clip = MODES[mode](1.0)
    rng = np.random.default_rng(0)
    base = {'a': rng.normal(size=(6, 3)).astype(np.float32),
            'b': rng.normal(size=(6, 2, 2)).astype(np.float32)}
    ref, bound = _mode_sum(clip, base)
    for value in (1e3, 1e18, 1e30, 3e38, 1e-20, 1e-40, 0.0, np.nan, np.inf):
      attacked = jax.tree.map(np.copy, base)
      attacked['a'][2] = value
      attacked['b'][2] = value
      out, _ = _mode_sum(clip, attacked)
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
      assert _dist(ref, out) <= 2 * float(bound) * (1 + TOL), value


class TestPerLayerClipping:

  def test_thresholds_respected_leaf_by_leaf(self):
    rng = np.random.default_rng(0)
    norms = {'a': 0.3, 'b': {'c': 2.0, 'd': 0.05}}
    clip = dpjax.clip_per_layer(norms)
    grads = {'a': rng.normal(size=(7, 4)) * 10,
             'b': {'c': rng.normal(size=(7, 2, 3)),
                   'd': rng.normal(size=(7, 5)) * 1e-3}}
    grads['b']['d'][3] *= 1e5  # only this example's 'd' exceeds its bound
    grads = jax.tree.map(lambda x: x.astype(np.float32), grads)
    for i in range(7):
      one = jax.tree.map(lambda x: x[i:i + 1], grads)
      out = _clipped_sum(clip, one).grad_sum
      for key, limit in (('a', 0.3), ('c', 2.0), ('d', 0.05)):
        got = out[key] if key == 'a' else out['b'][key]
        orig = one[key] if key == 'a' else one['b'][key]
        assert np.linalg.norm(got) <= limit * (1 + TOL)
        if np.linalg.norm(orig) <= limit:  # unclipped groups pass unchanged
          np.testing.assert_allclose(got, orig[0], rtol=1e-5)
        else:  # clipped groups keep their direction at norm C_i
          np.testing.assert_allclose(got, orig[0] * limit
                                     / np.linalg.norm(orig), rtol=1e-5)

  def test_module_groups_clip_a_whole_layer_jointly(self):
    params = {'Dense_0': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros(2)},
              'Dense_1': {'kernel': jnp.zeros((2, 1)), 'bias': jnp.zeros(1)}}
    clip = dpjax.clip_per_layer(clip_norm=1.0, groups='module')
    state = clip.init(params)
    assert sorted(state.clip_norms) == ['Dense_0', 'Dense_1']
    grads = jax.tree.map(lambda p: jnp.full((1,) + p.shape, 3.0), params)
    out, _ = _mode_sum(clip, grads)
    layer0 = np.sqrt(np.sum(out['Dense_0']['kernel'] ** 2)
                     + np.sum(out['Dense_0']['bias'] ** 2))
    assert layer0 == pytest.approx(0.5 ** 0.5, rel=1e-5)

  @pytest.mark.parametrize('rule', ['equal', 'size', 'sqrt_size'])
  def test_rules_keep_total_bound(self, rule):
    params = {'a': jnp.zeros((10, 3)), 'b': jnp.zeros(4), 'c': jnp.zeros(1)}
    norms = clipping.per_layer_clip_norms(params, 2.0, rule)
    assert sum(v ** 2 for v in norms.values()) == pytest.approx(4.0)
    sizes = {'a': 30, 'b': 4, 'c': 1}
    expected = {'equal': lambda n: 1.0, 'size': float,
                'sqrt_size': np.sqrt}[rule]
    ratio = norms['a'] / norms['c']
    assert ratio == pytest.approx(expected(sizes['a']) / expected(1))
    assert dpjax.clip_per_layer(clip_norm=2.0, rule=rule).sensitivity() == 2.0

  def test_per_layer_noise_scale_pays_sqrt_groups(self):
    clip = dpjax.clip_per_layer({'a': 0.6, 'b': 0.8}, noise='per_layer')
    state = clip.init(None)
    scale = clip.noise_scale(state)
    np.testing.assert_allclose([scale['a'], scale['b']],
                               [0.6 * 2 ** 0.5, 0.8 * 2 ** 0.5], rtol=1e-6)
    iso = dpjax.clip_per_layer({'a': 0.6, 'b': 0.8})
    assert float(iso.noise_scale(iso.init(None))) == pytest.approx(1.0)
    assert float(clip.noise_scale(state, Relation.REPLACE_ONE)['b']) == (
        pytest.approx(1.6 * 2 ** 0.5))

  @pytest.mark.parametrize('kwargs,match', [
      (dict(clip_norms={'a': 1.0}, clip_norm=1.0), 'exactly one'),
      (dict(), 'exactly one'),
      (dict(clip_norms={'a': 0.0}), 'per-layer clip norm'),
      (dict(clip_norm=1.0, rule='largest'), 'rule'),
      (dict(clip_norm=1.0, noise='laplace'), 'noise'),
  ])
  def test_rejects_bad_settings(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      dpjax.clip_per_layer(**kwargs)

  def test_rejects_thresholds_that_do_not_match_the_gradients(self):
    clip = dpjax.clip_per_layer({'x': 1.0, 'y': 1.0})
    with pytest.raises(ValueError, match='pytree prefix'):
      _clipped_sum(clip, {'a': jnp.zeros((2, 3))})


class TestAutomaticClipping:

  @pytest.mark.parametrize('make', [
      lambda: dpjax.clip_automatic(1.0, gamma=0.01),
      lambda: dpjax.clip_normalized(1.0)])
  def test_tiny_and_zero_rows_stay_bounded(self, make):
    clip = make()
    for value in (0.0, 1e-45, 1e-40, 1e-30, 1e-20, 1e-12, 1e-7, 1e-3):
      grads = {'w': jnp.full((1, 1000), value, jnp.float32)}
      out = np.asarray(_clipped_sum(clip, grads).grad_sum['w'])
      assert np.all(np.isfinite(out))
      assert np.linalg.norm(out) <= 1.0 * (1 + TOL), value

  def test_automatic_rescales_every_row(self):
    clip = dpjax.clip_automatic(2.0, gamma=0.5)
    out = _clipped_sum(clip, {'w': jnp.array([[0.3, 0.4], [6.0, 8.0]])})
    expected = (np.array([0.3, 0.4]) * 2 / 1.0
                + np.array([6.0, 8.0]) * 2 / 10.5)
    np.testing.assert_allclose(out.grad_sum['w'], expected, rtol=1e-6)
    assert clip.sensitivity(Relation.REPLACE_ONE) == 4.0

  def test_normalized_rows_have_norm_r(self):
    clip = dpjax.clip_normalized(3.0)
    for row in ([1e-3, 0.0], [30.0, 40.0]):
      out = _clipped_sum(clip, {'w': jnp.array([row])}).grad_sum['w']
      assert np.linalg.norm(out) == pytest.approx(3.0, rel=1e-6)

  @pytest.mark.parametrize('gamma', [0.0, -1.0])
  def test_rejects_non_positive_gamma(self, gamma):
    with pytest.raises(ValueError, match='gamma'):
      dpjax.clip_automatic(1.0, gamma=gamma)


class TestDeclaredSpec:
  """A clipping is its ClipSpec: declared, immutable, still an optax tx."""

  def test_attributes_read_the_spec_and_cannot_be_patched(self):
    clip = dpjax.clip_l2_then_linf(1.0, 4.0)
    assert (clip.p, clip.linf_bound, clip.l2_bound) == (4.0, 0.5, 1.0)
    assert clip.spec.name == clip.name == 'l2_then_linf'
    with pytest.raises(AttributeError, match='immutable'):
      clip.p = 9.0
    with pytest.raises(dataclasses.FrozenInstanceError):
      clip.spec.p = 9.0
    assert isinstance(clip, optax.GradientTransformationExtraArgs)
    init, update = clip  # what optax.chain unpacks
    assert init is clip.init and update is clip.update

  def test_a_spec_of_the_wrong_kind_is_refused(self):
    flat = dpjax.clip_per_example(1.0)
    with pytest.raises(TypeError, match='GroupClipSpec'):
      batch_clipping.BatchClipping(flat.spec)

  def test_copies_and_replaced_specs_are_clippings(self):
    clip = dpjax.clip_per_layer({'a': 0.6, 'b': 0.8})
    assert copy.deepcopy(clip).spec == clip.spec
    wider = type(clip)(dataclasses.replace(clip.spec, l2_bound=2.0))
    assert wider.sensitivity() == 2.0 and clip.sensitivity() == 1.0

  @pytest.mark.parametrize('make', [
      lambda: dpjax.clip_per_example(0.7),
      lambda: dpjax.clip_automatic(0.7),
      lambda: dpjax.clip_normalized(0.7),
      lambda: dpjax.clip_per_layer({'a': 0.3, 'b': 0.6}),
      lambda: _adaptive({'a': 0.3, 'b': 0.6})])
  def test_clip_is_its_rule_on_norms(self, make):
    # The vmap clip and the route from norms apply the same factors.
    clip = make()
    grads = {'a': jnp.array([[3.0, 0.0, 4.0], [jnp.nan, 0, 0], [1, 1, 1]]),
             'b': jnp.ones((3, 2, 2)) * jnp.array([1.0, 0.1, 1e-3])[:, None,
                                                                      None]}
    mask = jnp.array([True, True, False])
    state = clip.init(grads)
    out, after = clip.clip(grads, state, mask)
    scales, after_norms = clip.scales_from_norms(
        clipping.per_leaf_sq_norms(grads), state, mask)
    by_norms = clipping.clip_by_scales(grads, scales)
    numbers = lambda t: [x for x in jax.tree.leaves(t)
                         if jnp.issubdtype(x.dtype, jnp.number)]
    for a, b in zip(numbers((out, after)), numbers((by_norms, after_norms))):
      np.testing.assert_array_equal(a, b)
