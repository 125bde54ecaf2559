"""Tests for dpjax/batch_clipping.py: BC engine, BN hook, ALC, BC plans."""

import dataclasses

import dp_accounting
import flax.linen as nn
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
from dpjax import accounting
from dpjax import batch_clipping
from dpjax import data as data_lib
from dpjax import models
from dpjax import pruning
from dpjax import sampling
from dpjax import train
from dpjax.training import run as run_lib

Relation = dp_accounting.NeighboringRelation
TOL = 1e-5


def _bc(clip_norm=1.0, group_size=2, layers=None):
  base = (dpjax.clip_per_example(clip_norm) if layers is None
          else dpjax.clip_per_layer(layers))
  return batch_clipping.clip_groups_of(base, group_size)


def _linear_group_loss(w, group, group_mask):
  """Its gradient is the masked mean of the rows: adversarial by design."""
  m = group.shape[0]
  return jnp.sum(jnp.where(group_mask, group @ w, 0.0)) / m


def _example_loss(params, example):
  logits = example['x'] @ params['w'] + params['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, example['y'])


def _data(n=12, seed=0):
  rng = np.random.default_rng(seed)
  return {'x': jnp.asarray(rng.normal(size=(n, 5)) * 3, jnp.float32),
          'y': jnp.asarray(rng.integers(0, 3, n))}


PARAMS = {'w': jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)),
                           jnp.float32), 'b': jnp.zeros(3)}


def _dist(x, y):
  return float(np.sqrt(sum(np.sum((np.asarray(a, np.float64) - b) ** 2)
                           for a, b in zip(jax.tree.leaves(x),
                                           jax.tree.leaves(y)))))


class TestEngine:

  @pytest.mark.parametrize('group_size', [1, 3, 12])
  def test_matches_clipping_each_groups_mean_gradient(self, group_size):
    clip_norm = 0.3
    bc = _bc(clip_norm, group_size)
    group_loss = batch_clipping.group_loss_from_example_loss(
        _example_loss, group_size)
    out = jax.jit(batch_clipping.batch_clipped_grad(group_loss, bc))(
        PARAMS, _data(), None)
    expected = jax.tree.map(jnp.zeros_like, PARAMS)
    data = _data()
    for k in range(12 // group_size):
      group = jax.tree.map(
          lambda x: x[k * group_size:(k + 1) * group_size], data)
      mean_loss = lambda p: jnp.mean(  # pylint: disable=cell-var-from-loop
          jax.vmap(_example_loss, (None, 0))(p, group))
      g = jax.grad(mean_loss)(PARAMS)
      norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))
      expected = jax.tree.map(
          lambda e, x: e + x * min(1.0, clip_norm / norm), expected, g)
    for a, b in zip(jax.tree.leaves(out.grad_sum), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert out.stats.norms.shape == (12 // group_size,)

  def test_group_size_one_is_per_example_clipping(self):
    group_loss = batch_clipping.group_loss_from_example_loss(_example_loss, 1)
    bc = jax.jit(batch_clipping.batch_clipped_grad(group_loss, _bc(0.5, 1)))
    ic = jax.jit(dpjax.clipped_grad(_example_loss, dpjax.clip_per_example(0.5)))
    for a, b in zip(jax.tree.leaves(bc(PARAMS, _data(), None).grad_sum),
                    jax.tree.leaves(ic(PARAMS, _data(), None).grad_sum)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  @pytest.mark.parametrize('microbatch_size', [2, 5])
  def test_result_does_not_depend_on_microbatching(self, microbatch_size):
    group_loss = batch_clipping.group_loss_from_example_loss(_example_loss, 2)
    whole = jax.jit(batch_clipping.batch_clipped_grad(group_loss, _bc(0.3, 2)))
    chunked = jax.jit(batch_clipping.batch_clipped_grad(
        group_loss, _bc(0.3, 2), microbatch_size=microbatch_size))
    for a, b in zip(jax.tree.leaves(whole(PARAMS, _data(), None).grad_sum),
                    jax.tree.leaves(chunked(PARAMS, _data(), None).grad_sum)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  def test_padding_rows_change_nothing_even_when_nan(self):
    group_loss = batch_clipping.group_loss_from_example_loss(_example_loss, 3)
    fn = jax.jit(batch_clipping.batch_clipped_grad(group_loss, _bc(1.0, 3)))
    data = _data()
    mask = jnp.arange(12) % 3 != 1  # one padding row per group
    mask = mask.at[9:].set(False)   # and a group of padding only
    garbage = dict(data, x=jnp.where(mask[:, None], data['x'], jnp.nan))
    huge = dict(data, x=jnp.where(mask[:, None], data['x'], 1e30))
    ref = fn(PARAMS, data, mask)
    for poisoned in (garbage, huge):
      out = fn(PARAMS, poisoned, mask)
      for a, b in zip(jax.tree.leaves(ref.grad_sum),
                      jax.tree.leaves(out.grad_sum)):
        np.testing.assert_array_equal(a, b)
      assert int(out.stats.num_nonfinite) == 0

  def test_param_mask_cuts_each_group_gradient_before_clipping(self):
    bc = _bc(clip_norm=0.5, group_size=3)
    group_loss = batch_clipping.group_loss_from_example_loss(_example_loss, 3)
    param_mask = {'w': jnp.asarray(np.arange(15).reshape(5, 3) % 2 == 0),
                  'b': jnp.array([True, False, True])}
    masked = lambda p, g, gm, pm: group_loss(
        pruning.mask_params(p, pm), g, gm)
    data, mask = _data(), jnp.arange(12) < 11
    out = batch_clipping.batch_clipped_grad(group_loss, bc)(
        PARAMS, data, mask, param_mask=param_mask)
    ref = batch_clipping.batch_clipped_grad(masked, bc)(
        PARAMS, data, mask, args=(param_mask,))
    assert _dist(out.grad_sum, ref.grad_sum) < 1e-6
    assert float(out.grad_sum['b'][1]) == 0.0

  def test_rejects_batch_not_multiple_of_group_size(self):
    fn = batch_clipping.batch_clipped_grad(_linear_group_loss, _bc(1.0, 5))
    with pytest.raises(ValueError, match='multiple of the group size'):
      fn(jnp.zeros(5), jnp.zeros((12, 5)), None)

  def test_rejects_plain_per_example_clipping(self):
    with pytest.raises(TypeError, match='clip_groups_of'):
      batch_clipping.batch_clipped_grad(_linear_group_loss,
                                        dpjax.clip_per_example(1.0))


_JITTED = {}


def _jitted_bc(group_size, layers, build):
  if (group_size, layers) not in _JITTED:
    _JITTED[group_size, layers] = build()
  return _JITTED[group_size, layers]


class TestSensitivity:

  def test_declared_sensitivity(self):
    assert _bc(1.5, 1).sensitivity() == 1.5
    assert _bc(1.5, 1).sensitivity(Relation.REPLACE_ONE) == 3.0
    # With m > 1 removing an example moves its group's vector anywhere in
    # the ball: 2C under add/remove too.
    assert _bc(1.5, 4).sensitivity() == 3.0
    assert _bc(1.5, 4).sensitivity(Relation.REPLACE_ONE) == 3.0

  @settings(max_examples=20, deadline=None)
  @given(rows=hnp.arrays(np.float32, (8, 3), elements=st.one_of(
      st.floats(-10, 10, width=32),
      st.sampled_from([1e30, -3e38, np.nan, np.inf, 0.0]))),
         other=hnp.arrays(np.float32, (3,), elements=st.floats(
             -1e6, 1e6, width=32)),
         j=st.integers(0, 7), group_size=st.sampled_from([1, 2, 4, 8]),
         layers=st.booleans())
  def test_replace_one_and_padding_flip(self, rows, other, j, group_size,
                                        layers):
    bc = _bc(1.0, group_size, {'w': 0.6, 'v': 0.8} if layers else None)

    def loss(p, group, group_mask):
      w = jnp.concatenate([p['w'], p['v']]) if layers else p
      return _linear_group_loss(w, group, group_mask)

    params = ({'w': jnp.zeros(2), 'v': jnp.zeros(1)} if layers
              else jnp.zeros(3))
    fn = _jitted_bc(group_size, layers, lambda: jax.jit(
        batch_clipping.batch_clipped_grad(loss, bc)))
    state = bc.init(params)
    base = fn(params, rows, None, clip_state=state).grad_sum
    replaced = rows.copy()
    replaced[j] = other
    out = fn(params, replaced, None, clip_state=state).grad_sum
    assert _dist(base, out) <= bc.sensitivity(Relation.REPLACE_ONE) * (1 + TOL)
    mask = np.ones(8, bool)
    mask[j] = False
    flipped = fn(params, rows, mask, clip_state=state).grad_sum
    assert _dist(base, flipped) <= bc.sensitivity() * (1 + TOL)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(flipped))


class BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, mask=None):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=False, momentum=0.0)(
        x, mask=None if mask is None else mask[:, None])
    return nn.Dense(3)(nn.relu(x))


class TestBatchNormHook:
  """BatchNorm in training mode inside the group loss (issue 6 builds on it)."""

  def _setup(self):
    model = BNNet()
    data = _data(8)
    variables = model.init(jax.random.key(0), data['x'])

    def group_loss(params, group, group_mask, batch_stats):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': batch_stats}, group['x'],
          mask=group_mask, mutable=['batch_stats'])
      losses = optax.softmax_cross_entropy_with_integer_labels(
          logits, group['y'])
      loss = jnp.sum(jnp.where(group_mask, losses, 0.0)) / group_mask.shape[0]
      return loss, updates['batch_stats']

    return model, data, variables, group_loss

  def test_group_gradient_and_statistics_use_the_groups_real_rows(self):
    model, data, variables, group_loss = self._setup()
    bc = _bc(100.0, 4)  # no clipping: compare raw group gradients
    fn = jax.jit(batch_clipping.batch_clipped_grad(group_loss, bc,
                                                   has_aux=True))
    mask = jnp.array([True, True, True, False] + [True] * 4)
    out = fn(variables['params'], data, mask,
             args=(variables['batch_stats'],))
    @jax.jit
    def direct(p, x, y):  # the group's loss on its real rows only
      def loss(p):
        logits, _ = model.apply({'params': p,
                                 'batch_stats': variables['batch_stats']},
                                x, mutable=['batch_stats'])
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
            logits, y)) / 4
      hidden = nn.Dense(6).apply({'params': p['Dense_0']}, x)
      return jax.grad(loss)(p), hidden.mean(0)

    expected = jax.tree.map(jnp.zeros_like, variables['params'])
    for k in range(2):
      real = np.asarray(mask[4 * k:4 * k + 4])
      x = data['x'][4 * k:4 * k + 4][real]
      y = data['y'][4 * k:4 * k + 4][real]
      grads, hidden_mean = direct(variables['params'], x, y)
      expected = jax.tree.map(jnp.add, expected, grads)
      np.testing.assert_allclose(out.stats.aux['BatchNorm_0']['mean'][k],
                                 hidden_mean, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(out.grad_sum), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The statistics come back per group, beside (never inside) the params.
    assert out.stats.aux['BatchNorm_0']['mean'].shape == (2, 6)

  def test_replacing_one_example_moves_the_sum_at_most_2c(self):
    _, data, variables, group_loss = self._setup()
    bc = _bc(0.05, 4)
    fn = jax.jit(batch_clipping.batch_clipped_grad(group_loss, bc,
                                                   has_aux=True))
    base = fn(variables['params'], data, None,
              args=(variables['batch_stats'],))
    for value in (1e4, -1e4, 0.0):
      changed = dict(data, x=data['x'].at[2].set(value))
      out = fn(variables['params'], changed, None,
               args=(variables['batch_stats'],))
      assert _dist(base.grad_sum, out.grad_sum) <= (
          bc.sensitivity(Relation.REPLACE_ONE) * (1 + TOL))


class TestShuffleSampler:

  def test_each_example_once_per_epoch(self):
    sampler = sampling.ShuffleSampler(103, 10, key=jax.random.key(3))
    assert sampler.steps_per_epoch == 10
    for epoch in range(3):
      seen = np.concatenate([sampler.sample(epoch * 10 + k).indices
                             for k in range(10)])
      assert len(seen) == len(set(seen.tolist())) == 100
    assert not np.array_equal(sampler.sample(0).indices,
                              sampler.sample(10).indices)
    np.testing.assert_array_equal(sampler.sample(7).indices,
                                  sampling.ShuffleSampler(103, 10, key=jax.random.key(3))
                                  .sample(7).indices)
    assert sampler.sample(5).mask.all()

  def test_rejects_batch_larger_than_dataset(self):
    with pytest.raises(ValueError, match='larger than the dataset'):
      sampling.ShuffleSampler(10, 11, key=jax.random.key(0))


BC_CONFIG = dpjax.PrivacyConfig(
    clip_norm=0.5, noise_multiplier=2.0, delta=1e-5, expected_batch_size=100,
    epochs=10, accountant='gdp',
    clipping=dpjax.plan.ClippingConfig(mode='batch', group_size=25))


class TestBatchPlan:

  def test_pieces_agree(self):
    plan = dpjax.make_plan(BC_CONFIG, 1000)
    assert isinstance(plan.sampler, sampling.ShuffleSampler)
    assert plan.relation == Relation.REPLACE_ONE
    assert plan.sensitivity == 1.0
    assert plan.noise_std == 2.0
    assert plan.public_divisor == 4
    assert plan.num_steps == 100
    mu = np.sqrt(10) / 2.0
    assert plan.epsilon() == pytest.approx(accounting.gdp_epsilon(mu, 1e-5))
    summary = plan.summary()
    assert summary['sampler'] == 'shuffle'
    assert summary['neighbouring_relation'] == 'replace_one'
    assert summary['accountant'] == 'gdp'
    assert summary['gdp_mu'] == pytest.approx(mu)

  def test_ledger_charges_one_gaussian_per_epoch(self):
    plan = dpjax.make_plan(dataclasses.replace(BC_CONFIG, epochs=2.5), 1000)
    ledger = accounting.PrivacyLedger()
    for step in range(plan.num_steps):
      plan.record_step(ledger, step)
    assert plan.num_steps == 25
    assert ledger.entries == [(dp_accounting.GaussianDpEvent(2.0), 3)]
    assert ledger.epsilon(1e-5, 'gdp') == pytest.approx(plan.epsilon())

  def test_noise_is_2c_sigma_over_k(self):
    plan = dpjax.make_plan(BC_CONFIG, 1000)
    out, _ = plan.noise().update({'w': jnp.zeros(20000)},
                                  plan.noise().init(None))
    assert float(np.std(out['w'])) == pytest.approx(2 * 0.5 * 2.0 / 4,
                                                    rel=0.03)

  def test_target_epsilon_matches_the_paper(self):
    config = dataclasses.replace(
        BC_CONFIG, noise_multiplier=None, target_epsilon=8.0, epochs=50)
    assert dpjax.make_plan(config, 1000).noise_multiplier == pytest.approx(
        4.24, abs=0.005)

  def test_per_example_clipping_never_gets_shuffling_or_gdp(self):
    for mode in ('flat', 'automatic', 'adaptive'):
      config = dataclasses.replace(
          BC_CONFIG, accountant='rdp',
          clipping=dpjax.plan.ClippingConfig(mode=mode))
      plan = dpjax.make_plan(config, 1000)
      assert isinstance(plan.sampler, sampling.PoissonSampler)
      assert isinstance(plan.step_event(), dp_accounting.PoissonSampledDpEvent)
      with pytest.raises(ValueError, match='accountant'):
        dpjax.make_plan(dataclasses.replace(config, accountant='gdp'), 1000)

  @pytest.mark.parametrize('change,match', [
      (dict(expected_batch_size=90), 'multiple of clipping.group_size'),
      (dict(accountant='prv'), 'accountant'),
      (dict(clipping=dpjax.plan.ClippingConfig(mode='flat', group_size=4)),
       'group_size'),
      (dict(clipping=dpjax.plan.ClippingConfig(mode='per_layer')), 'layers'),
      (dict(clipping=dpjax.plan.ClippingConfig(mode='flat', layers='alc')),
       'per_layer'),
      (dict(clipping=dpjax.plan.ClippingConfig(mode='adaptive',
                                               layers='alc')), 'public'),
      (dict(clipping=dpjax.plan.ClippingConfig(mode='batch',
                                               layer_noise='per_layer')),
       'per-layer thresholds'),
      (dict(clipping=dpjax.plan.ClippingConfig(mode='ghost')), 'mode'),
  ])
  def test_rejects_mismatched_settings(self, change, match):
    with pytest.raises(ValueError, match=match):
      dpjax.make_plan(dataclasses.replace(BC_CONFIG, **change), 1000)


class TestAlc:

  def test_thresholds_follow_public_gradient_norms(self):
    grads = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([0.5]),
             'c': jnp.zeros(3)}
    raw = batch_clipping.alc_clip_norms(grads, 2.0, rescale=False)
    np.testing.assert_allclose([raw['a'], raw['b'], raw['c']],
                               [2.0, 0.2, 2e-3], rtol=1e-5)
    scaled = batch_clipping.alc_clip_norms(grads, 2.0)
    assert sum(float(v) ** 2 for v in scaled.values()) == pytest.approx(4.0)
    assert float(scaled['a'] / scaled['b']) == pytest.approx(10.0, rel=1e-5)

  def test_schedule_decays_and_recomputes_each_epoch(self):
    public = _data(16, seed=5)
    alc = batch_clipping.LayerwiseThresholds(
        _example_loss, public, 1.0, steps_per_epoch=10, every_epoch=True,
        decay=0.9)
    assert [alc.due(s) for s in (0, 5, 10, 20, 21)] == [
        True, False, True, True, False]
    total = lambda t: np.sqrt(sum(float(v) ** 2 for v in jax.tree.leaves(t)))
    assert total(alc(PARAMS, 0)) == pytest.approx(1.0, rel=1e-5)
    assert total(alc(PARAMS, 20)) == pytest.approx(0.81, rel=1e-5)

  def test_needs_a_public_split(self):
    config = dataclasses.replace(BC_CONFIG, clipping=dpjax.plan.ClippingConfig(
        mode='batch', group_size=25, layers='alc'))
    plan = dpjax.make_plan(config, 1000)
    with pytest.raises(ValueError, match='public_fraction'):
      plan.layerwise_thresholds(_example_loss, None)

  def test_thresholds_never_depend_on_a_private_example(self):
    """The training driver's ALC thresholds, with one example changed."""
    splits = data_lib.load('digits', public_fraction=0.1,
                           key=jax.random.key(0))
    config = dataclasses.replace(BC_CONFIG, clipping=dpjax.plan.ClippingConfig(
        mode='batch', group_size=25, layers='alc'))
    plan = dpjax.make_plan(config, len(splits.train))
    model = models.SmallCNN()
    params = model.init(jax.random.key(0), splits.train.images[:1])['params']

    def thresholds_with(s):
      alc = run_lib.alc_feature(plan, model, s, None).schedule
      return [float(c) for c in jax.tree.leaves(alc(params, 0))]

    def change(ds, i):
      images = ds.images.copy()
      images[i] = 1.0 - images[i]
      return data_lib.ArrayDataset(images, ds.labels)

    ref = thresholds_with(splits)
    assert len(ref) == len(jax.tree.leaves(params))
    assert thresholds_with(splits._replace(train=change(splits.train, 3))
                           ) == ref
    assert thresholds_with(splits._replace(public=change(splits.public, 3))
                           ) != ref
