"""Tests for dpjax/pruning.py: masks, refusal, sensitivity, noise, training."""

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

import flax.linen as nn

import dpjax
from configs import default
from dpjax import ghost
from dpjax import pruning
from dpjax import train
from tests import strategies

Relation = dp_accounting.NeighboringRelation
TOL = 1e-5  # float32 rounding of g * C / ||g|| overshoots C by a few ulps



_PARAM_MASKS = st.fixed_dictionaries({
    'a': hnp.arrays(bool, (3,)), 'b': hnp.arrays(bool, (2, 2))})


def _linear_loss(w, ex, inputs=None):
  del inputs
  # Its per-example gradient is the example itself, so a batch of examples
  # is a batch of arbitrary per-example gradients (NaN, Inf, huge).
  return sum(jnp.sum(a * x) for a, x in zip(jax.tree.leaves(w),
                                            jax.tree.leaves(ex)))


def _clipped_sum(clip, grads, param_mask, mask=None, microbatch_size=None):
  fn = dpjax.clipped_grad(pruning.masked_loss(_linear_loss), clip,
                          microbatch_size=microbatch_size)
  params = jax.tree.map(lambda x: jnp.zeros(np.shape(x)[1:]), grads)
  return fn(params, grads, mask,
            args=(dpjax.StepInputs(param_mask=param_mask),)).grad_sum


def _dist(x, y):
  diff = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, x, y)
  return float(np.sqrt(sum(np.sum(d ** 2) for d in jax.tree.leaves(diff))))


def _assert_zero_off_mask(tree, param_mask):
  for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(param_mask)):
    np.testing.assert_array_equal(np.asarray(x)[~np.asarray(m)], 0.0)


def _params():
  return {'dense': {'kernel': jnp.arange(-6.0, 6.0).reshape(3, 4),
                    'bias': jnp.zeros(4)},
          'out': jnp.linspace(-1.0, 2.0, 8)}


def _count(mask):
  return sum(int(np.sum(m)) for m in jax.tree.leaves(mask))


class TestMasks:

  @pytest.mark.parametrize('keep', [0.05, 0.2, 0.5, 1.0])
  def test_top_k_keeps_exactly_k(self, keep):
    scores = pruning.random_scores(jax.random.key(0), _params())
    assert _count(pruning.top_k_mask(scores, keep)) == pruning.num_kept(
        24, keep)
    per_layer = pruning.top_k_mask(scores, keep, 'per_layer')
    for m, x in zip(jax.tree.leaves(per_layer), jax.tree.leaves(scores)):
      assert int(np.sum(m)) == pruning.num_kept(x.size, keep)

  def test_magnitude_keeps_largest_and_nan_last(self):
    scores = {'w': jnp.array([0.5, jnp.nan, -0.0, 3.0, 2.0])}
    mask = pruning.top_k_mask(scores, 0.6)
    assert mask['w'].tolist() == [True, False, False, True, True]
    mask = pruning.top_k_mask(pruning.magnitude_scores(
        {'w': jnp.array([0.1, -2.0, 0.5, 3.0])}), 0.5)
    assert mask['w'].tolist() == [False, True, False, True]

  def test_selection_changes_every_step_and_is_reproducible(self):
    pruner = pruning.make_pruner(pruning.PruningConfig(
        mode='select', keep_fraction=0.25, source='random'))

    def masks(seed, steps=4):
      params, state = pruner.init(_params(), jax.random.key(seed))
      out = []
      for _ in range(steps):
        state = jax.jit(pruner.update)(state, params)
        out.append(np.concatenate(
            [np.ravel(m) for m in jax.tree.leaves(state.mask)]))
      return out

    first, again, other = masks(0), masks(0), masks(1)
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(first, first[1:]):
      assert not np.array_equal(a, b)
      assert a.sum() == b.sum() == 6
    assert not np.array_equal(first[0], other[0])

  @pytest.mark.parametrize('source', ['random', 'magnitude_init'])
  def test_frozen_mask_never_changes(self, source):
    pruner = pruning.make_pruner(pruning.PruningConfig(
        mode='freeze', keep_fraction=0.5, source=source))
    params, state = pruner.init(_params(), jax.random.key(0))
    moved = jax.tree.map(lambda p: -3 * p + 1, params)
    after = pruner.update(pruner.update(state, moved), moved)
    for a, b in zip(jax.tree.leaves(state.mask), jax.tree.leaves(after.mask)):
      np.testing.assert_array_equal(a, b)
    assert _count(state.mask) == 12

  def test_public_gradient_uses_public_batch(self):
    # Loss depends on coordinate i only through public label i: the mask
    # follows the public data.
    def loss_fn(w, ex):
      return jnp.sum(w * ex['x'])

    pruner = pruning.make_pruner(pruning.PruningConfig(
        mode='select', keep_fraction=0.5, source='public_gradient',
        public_batch_size=4), loss_fn)
    public = {'x': jnp.tile(jnp.array([0.0, 5.0, 0.1, 4.0]), (4, 1))}
    w, state = pruner.init(jnp.zeros(4), jax.random.key(0), public)
    state = pruner.update(state, w, public)
    assert state.mask.tolist() == [False, True, False, True]

  def test_public_magnitude_pretrains_then_ranks(self):
    def loss_fn(w, ex):
      return 0.5 * jnp.sum((w - ex['target']) ** 2)

    pruner = pruning.make_pruner(pruning.PruningConfig(
        mode='freeze', keep_fraction=0.5, source='public_magnitude',
        public_pretrain_steps=200, public_learning_rate=0.1,
        public_batch_size=2), loss_fn)
    public = {'target': jnp.tile(jnp.array([0.1, -3.0, 2.0, 0.0]), (5, 1))}
    params, state = jax.jit(pruner.init)(
        jnp.array([1.0, 0.0, 0.0, 2.0]), jax.random.key(0), public)
    np.testing.assert_allclose(params, [0.1, -3.0, 2.0, 0.0], atol=1e-3)
    assert state.mask.tolist() == [False, True, True, False]


class TestRefusal:

  @pytest.mark.parametrize('source', [
      'gradient', 'private_gradient', 'train_gradient', 'private_magnitude',
      'train_loss'])
  def test_private_sources_are_refused(self, source):
    with pytest.raises(ValueError, match='private data without noise leaks'):
      pruning.PruningConfig(mode='select', keep_fraction=0.1, source=source)

  def test_refused_from_config_fields(self, tmp_path):
    config = default.get_config()
    config.pruning.mode = 'select'
    config.pruning.source = 'gradient'
    with pytest.raises(ValueError, match='private training set'):
      train.train_and_evaluate(config, str(tmp_path))

  def test_public_source_without_public_split_is_refused(self):
    pruner = pruning.make_pruner(pruning.PruningConfig(
        mode='freeze', keep_fraction=0.5, source='public_gradient'),
                                 lambda w, ex: jnp.sum(w * ex))
    with pytest.raises(ValueError, match='public_fraction > 0'):
      pruner.init(jnp.zeros(3), jax.random.key(0), None)

  @pytest.mark.parametrize('kwargs,match', [
      (dict(mode='prune'), 'pruning mode'),
      (dict(scope='layer'), 'pruning scope'),
      (dict(keep_fraction=0.0), 'keep_fraction'),
      (dict(keep_fraction=1.5), 'keep_fraction'),
      (dict(source='magnitude'), 'pruning source must be one of'),
      (dict(mode='freeze', source='magnitude_current'), 'magnitude_init'),
      (dict(mode='select', source='magnitude_init'), "mode='freeze'"),
      (dict(mode='freeze', source='public_magnitude'),
       'public_pretrain_steps'),
      (dict(public_pretrain_steps=5), "only used by source 'public_magnitude"),
  ])
  def test_bad_settings(self, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
      pruning.PruningConfig(**kwargs)

  def test_non_private_baseline_prunes_too(self, tmp_path):
    """The baseline of a pruned DP run: the same masks, no noise."""
    config = default.get_config()
    config.progress_bar = False
    config.privacy.enabled = False
    config.privacy.steps = 3
    config.pruning.mode = 'freeze'
    config.pruning.keep_fraction = 0.5
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary['epsilon'] == float('inf')
    assert summary['pruning']['keep_fraction'] == 0.5

  def test_modelmix_composes_with_its_epsilon_withheld(self, tmp_path):
    """Standard epsilon (ModelMix is post-processing); ModelMix's withheld:
    its analysis assumes every coordinate noised and mixed alike."""
    config = default.get_config()
    config.progress_bar = False
    config.privacy.steps = 3
    config.privacy.noise_multiplier = 1.0
    config.privacy.target_epsilon = None
    config.modelmix.enabled = True
    config.pruning.mode = 'freeze'
    config.pruning.keep_fraction = 0.5
    with pytest.warns(UserWarning, match='every coordinate noised'):
      summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary['epsilon_modelmix'] is None
    assert summary['epsilon'] > 0


class TestMaskedGradient:

  def test_mask_applies_before_clipping(self):
    """Mass on a masked coordinate does not clip the kept ones away."""
    grads = {'w': jnp.array([[1e6, 0.3, 0.4], [np.nan, 0.6, 0.0]])}
    out = _clipped_sum(dpjax.clip_per_example(1.0), grads,
                       {'w': jnp.array([False, True, True])})
    np.testing.assert_allclose(out['w'], [0.0, 0.9, 0.4], rtol=1e-6)

  @pytest.mark.parametrize('clip', [
      dpjax.clip_per_example(2.0), dpjax.clip_automatic(2.0),
      dpjax.clip_per_layer({'a': 1.0, 'b': 0.5})],
                           ids=['flat', 'automatic', 'per_layer'])
  def test_any_clipping_mode_clips_the_masked_gradient(self, clip):
    """Same sum as clipping gradients that are zero off the mask."""
    rng = np.random.default_rng(0)
    grads = {'a': rng.normal(size=(7, 3)).astype(np.float32),
             'b': rng.normal(size=(7, 2, 2)).astype(np.float32)}
    param_mask = {'a': np.array([True, False, True]),
                  'b': np.array([[False, True], [True, False]])}
    masked = jax.tree.map(lambda g, m: np.where(m, g, 0), grads, param_mask)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), grads)
    expected = dpjax.clipped_grad(_linear_loss, clip)(params, masked,
                                                      None).grad_sum
    out = _clipped_sum(clip, grads, param_mask, microbatch_size=3)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    _assert_zero_off_mask(out, param_mask)

  def test_update_takes_param_mask_through_optax_chain(self):
    tx = optax.chain(
        pruning.mask_updates(dpjax.add_gaussian_noise(1.0, 1.0, 2.0, key=0)),
        pruning.mask_updates(optax.sgd(1.0, momentum=0.9)))
    params = {'w': jnp.zeros(3)}
    param_mask = {'w': jnp.array([True, False, True])}
    updates, _ = tx.update({'w': jnp.ones(3)}, tx.init(params), params,
                           param_mask=param_mask)
    assert updates['w'][1] == 0.0 and updates['w'][0] != 0.0

  def test_missing_param_mask_is_an_error(self):
    tx = pruning.mask_updates(optax.sgd(1.0))
    with pytest.raises(ValueError, match='param_mask'):
      tx.update({'w': jnp.ones(2)}, tx.init({'w': jnp.ones(2)}))


class TestSensitivityWithMasks:
  """||f(D) - f(D')|| <= declared sensitivity, f = masked clipped sum."""

  CLIP = dpjax.clip_per_example(1.0)

  @settings(max_examples=40, deadline=None)
  @given(grads=strategies.batches(5), j=st.integers(0, 4), param_mask=_PARAM_MASKS)
  def test_add_remove(self, grads, j, param_mask):
    full = _clipped_sum(self.CLIP, grads, param_mask)
    removed = _clipped_sum(
        self.CLIP, jax.tree.map(lambda x: np.delete(x, j, 0), grads),
        param_mask)
    assert _dist(full, removed) <= self.CLIP.sensitivity() * (1 + TOL)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(full))
    _assert_zero_off_mask(full, param_mask)

  @settings(max_examples=40, deadline=None)
  @given(grads=strategies.batches(4), other=strategies.batches(1), j=st.integers(0, 3),
         param_mask=_PARAM_MASKS)
  def test_replace_one(self, grads, other, j, param_mask):
    replaced = jax.tree.map(lambda x, y: np.concatenate(
        [x[:j], y, x[j + 1:]]), grads, other)
    dist = _dist(_clipped_sum(self.CLIP, grads, param_mask),
                 _clipped_sum(self.CLIP, replaced, param_mask))
    assert dist <= self.CLIP.sensitivity(Relation.REPLACE_ONE) * (1 + TOL)

  @settings(max_examples=40, deadline=None)
  @given(grads=strategies.batches(5), j=st.integers(0, 4), mask=hnp.arrays(bool, (5,)),
         param_mask=_PARAM_MASKS)
  def test_padding_flip(self, grads, j, mask, param_mask):
    flipped = mask.copy()
    flipped[j] = ~flipped[j]
    dist = _dist(_clipped_sum(self.CLIP, grads, param_mask, mask),
                 _clipped_sum(self.CLIP, grads, param_mask, flipped))
    assert dist <= self.CLIP.sensitivity() * (1 + TOL)

  @pytest.mark.parametrize('bad', [np.nan, np.inf, 1e18, 1e30])
  def test_nan_and_huge_rows(self, bad):
    base = {'w': np.random.default_rng(0).normal(size=(8, 50)).astype(
        np.float32)}
    param_mask = {'w': np.arange(50) % 3 == 0}
    for column in (0, 1):  # on a kept and on a masked coordinate
      attacked = {'w': base['w'].copy()}
      attacked['w'][3, column:] = bad
      dist = _dist(_clipped_sum(self.CLIP, base, param_mask),
                   _clipped_sum(self.CLIP, attacked, param_mask))
      assert dist <= self.CLIP.sensitivity(Relation.REPLACE_ONE) * (1 + TOL)


class _TinyNet(nn.Module):
  """Two dense layers: the training tests compile in seconds."""

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(6)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


class TestMaskedNoise:

  SIGMA, SENS, BATCH, SIZE = 1.3, 0.7, 8.0, 20000

  def _noise(self, keep, key=1):
    noise = pruning.mask_updates(dpjax.add_gaussian_noise(
        self.SIGMA, self.SENS, self.BATCH, key))
    zeros = {'a': jnp.zeros(self.SIZE // 2), 'b': jnp.zeros((self.SIZE // 4,
                                                             2))}
    param_mask = pruning.top_k_mask(
        pruning.random_scores(jax.random.key(9), zeros), keep)
    out, _ = noise.update(zeros, noise.init(zeros), param_mask=param_mask)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    return flat(out), flat(param_mask)

  @pytest.mark.parametrize('keep', [0.05, 0.2, 0.5])
  def test_noise_only_on_selected_coordinates(self, keep):
    noise, selected = self._noise(keep)
    np.testing.assert_array_equal(noise[~selected], 0.0)
    std = self.SIGMA * self.SENS / self.BATCH
    assert stats.kstest(noise[selected] / std, 'norm').pvalue > 1e-3
    assert stats.kstest(noise[selected] / (1.5 * std), 'norm').pvalue < 1e-6

  def test_noise_norm_scales_with_sqrt_of_kept_fraction(self):
    full = np.linalg.norm(self._noise(1.0)[0])
    for keep in (0.05, 0.2, 0.5):
      ratio = np.linalg.norm(self._noise(keep)[0]) / full
      assert ratio == pytest.approx(np.sqrt(keep), rel=0.05)


class TestFastRoutes:
  """A pruner's mask given to the ghost/bookkeeping engine as ``param_mask``."""

  MODEL = _TinyNet()
  PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  CLIP = dpjax.clip_per_layer(clip_norm=0.5, groups='module')

  @classmethod
  def loss(cls, params, example):
    logits = cls.MODEL.apply({'params': params}, example['image'][None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           example['label'])

  def _batch(self, bad_row=None, value=np.nan):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 8, 8, 1)).astype(np.float32)
    if bad_row is not None:
      images[bad_row] = value
    return {'image': jnp.asarray(images), 'label': jnp.arange(6) % 10}

  def _mask(self, seed):
    config = pruning.PruningConfig(mode='freeze', keep_fraction=0.3)
    return pruning.make_pruner(config).init(
        self.PARAMS, jax.random.key(seed))[1].mask

  def test_matches_the_masked_loss_on_vmap(self):
    param_mask, batch = self._mask(0), self._batch(2)
    mask = jnp.arange(6) < 5
    masked = pruning.masked_loss(lambda p, ex, inputs: self.loss(p, ex))
    ref = dpjax.clipped_grad(masked, self.CLIP)(
        self.PARAMS, batch, mask,
        args=(dpjax.StepInputs(param_mask=param_mask),))
    out = ghost.clipped_grad(self.loss, self.CLIP)(
        self.PARAMS, batch, mask, param_mask=param_mask)
    for x, y in zip(jax.tree.leaves(out.grad_sum), jax.tree.leaves(ref.grad_sum)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    _assert_zero_off_mask(out.grad_sum, param_mask)
    assert int(out.stats.num_nonfinite) == int(ref.stats.num_nonfinite) == 1

  @settings(max_examples=15, deadline=None)
  @given(j=st.integers(0, 5), seed=st.integers(0, 2**16),
         value=st.sampled_from([np.nan, np.inf, 1e30, 0.5]))
  def test_sensitivity_add_remove(self, j, seed, value):
    fn = _GHOST_PRUNED
    param_mask, batch = self._mask(seed), self._batch(j, value)
    state = self.CLIP.init(self.PARAMS)
    with_j = fn(self.PARAMS, batch, jnp.ones(6, bool), state, param_mask)
    without = fn(self.PARAMS, batch, jnp.arange(6) != j, state, param_mask)
    assert _dist(with_j, without) <= float(
        self.CLIP.sensitivity(state=state)) * (1 + TOL)
    _assert_zero_off_mask(with_j, param_mask)


_GHOST_PRUNED = jax.jit(
    lambda params, batch, mask, state, param_mask: ghost.clipped_grad(
        TestFastRoutes.loss, TestFastRoutes.CLIP)(
            params, batch, mask, clip_state=state,
            param_mask=param_mask).grad_sum)


def _train(optimizer, pruning_config, steps=4, clipping=None,
           physical_batch_size=None, accountant='rdp'):
  """A few noisy DP steps of the small CNN; the params after each, the masks."""
  model = _TinyNet()
  params = train.create_train_state(
      model, jax.random.key(0), (8, 8, 1), optax.identity()).params
  plan = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=8,
      steps=steps, accountant=accountant,
      clipping=clipping or dpjax.ClippingConfig()), 64,
                         pad_to_multiple_of=8, params=params,
                         keys=dpjax.KeySchedule(0, 2))
  pruner = pruning.make_pruner(pruning_config)
  tx = pruning.masked_chain(plan.noise(), optimizer, pruning_config.mode)
  state = train.create_train_state(model, jax.random.key(0), (8, 8, 1), tx)
  _, pruning_state = pruner.init(state.params, jax.random.key(1))
  state = state.replace(pruning=pruning_state)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(64, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 64))
  step = train.make_train_step(model, plan, microbatch_size=8, pruner=pruner,
                               physical_batch_size=physical_batch_size)
  history = [jax.device_get(state.params)]
  masks = []
  for t in range(steps):
    batch = plan.sampler.sample(t)
    state, _ = step(state, images, labels, batch.indices, batch.mask)
    history.append(jax.device_get(state.params))
    masks.append(jax.device_get(state.pruning.mask))
  return history, masks


def _assert_only_mask_moved(history, mask):
  for p0, p1, m in zip(jax.tree.leaves(history[0]),
                       jax.tree.leaves(history[-1]), jax.tree.leaves(mask)):
    np.testing.assert_array_equal(p0.view(np.uint32)[~m],
                                  p1.view(np.uint32)[~m])
    assert np.all(p0[m] != p1[m])


class TestTraining:

  @pytest.mark.parametrize('optimizer', [
      optax.sgd(0.5, momentum=0.9), optax.adamw(0.05, weight_decay=0.1)],
                           ids=['momentum', 'adamw'])
  def test_frozen_coordinates_are_bit_identical(self, optimizer):
    history, masks = _train(optimizer, pruning.PruningConfig(
        mode='freeze', keep_fraction=0.2, source='random'))
    _assert_only_mask_moved(history, masks[-1])

  @pytest.mark.parametrize('clipping,physical,accountant', [
      (dpjax.ClippingConfig(mode='per_layer', layers='equal'), 8, 'rdp'),
      (dpjax.ClippingConfig(mode='adaptive', count_noise_std=2.0), 8, 'rdp'),
      (dpjax.ClippingConfig(mode='batch', group_size=2), None, 'gdp'),
  ], ids=['per_layer_physical', 'adaptive_physical', 'batch'])
  def test_freezing_composes_with_clipping_modes(self, clipping, physical,
                                                 accountant):
    history, masks = _train(
        optax.sgd(0.5, momentum=0.9), pruning.PruningConfig(
            mode='freeze', keep_fraction=0.2, source='magnitude_init'),
        steps=3, clipping=clipping, physical_batch_size=physical,
        accountant=accountant)
    _assert_only_mask_moved(history, masks[-1])

  @pytest.mark.parametrize('momentum', [None, 0.9])
  def test_selection_gradient_is_sparse_momentum_carries(self, momentum):
    """Plain SGD moves exactly the step's coordinates; momentum carries."""
    history, masks = _train(optax.sgd(0.5, momentum=momentum),
                            pruning.PruningConfig(
                                mode='select', keep_fraction=0.1,
                                source='random', scope='per_layer'))
    flat = lambda tree: np.concatenate([np.ravel(x) for x in
                                        jax.tree.leaves(tree)])
    ever = np.zeros_like(flat(masks[0]))
    for before, after, mask in zip(history, history[1:], masks):
      moved = flat(before) != flat(after)
      if momentum is None:
        np.testing.assert_array_equal(moved, flat(mask))
      else:
        np.testing.assert_array_equal(moved, ever | flat(mask))
      ever |= flat(mask)
    assert not np.array_equal(flat(masks[0]), flat(masks[1]))

  def test_runs_from_config_fields(self, tmp_path):
    config = default.get_config()
    config.progress_bar = False
    config.privacy.steps = 6
    config.eval_every_steps = 6
    config.data.public_fraction = 0.1
    config.pruning.mode = 'select'
    config.pruning.keep_fraction = 0.2
    config.pruning.source = 'public_gradient'
    config.pruning.public_batch_size = 32
    summary = train.train_and_evaluate(config, str(tmp_path))
    plan = dpjax.make_plan(train.privacy_config(config),
                           summary['dataset_size'])
    assert summary['epsilon'] == pytest.approx(plan.epsilon(), rel=1e-9)
    assert summary['sensitivity'] == plan.sensitivity
    assert summary['pruning']['mask_privacy'] == 'public data'
    assert summary['pruning']['num_updated_per_step'] == pruning.num_kept(
        summary['pruning']['num_params'], 0.2)


def test_composes_with_batchnorm_statistics(tmp_path):
  """Pruning with a BatchNorm policy (refused before the feature objects)."""
  config = default.get_config()
  config.progress_bar = False
  config.privacy.steps = 2
  config.pruning.mode = 'freeze'
  config.pruning.keep_fraction = 0.5
  config.model.name, config.model.norm = 'resnet8', 'batch'
  config.model.width = 0.25
  config.normalization.policy = 'frozen'
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['pruning']['keep_fraction'] == 0.5
  assert summary['normalization']['policies'] == {'batch_stats': 'frozen'}


def test_fast_routes_train_the_model_of_the_vmap_route(tmp_path):
  # The engine cuts each row's gradient to the mask before clipping, on
  # every route: the same noise gives the same model.
  results = {}
  for route in ('vmap', 'bookkeeping'):
    config = default.get_config()
    config.progress_bar = False
    config.privacy.steps = 3
    config.privacy.noise_seed = 7
    config.pruning.mode = 'freeze'
    config.pruning.keep_fraction = 0.5
    config.perf.grad_route = route
    results[route] = train.train_and_evaluate(config,
                                              str(tmp_path / route))
  vmap, fast = results['vmap'], results['bookkeeping']
  assert fast['test_loss'] == pytest.approx(vmap['test_loss'], rel=1e-4)
  assert fast['test_accuracy'] == pytest.approx(vmap['test_accuracy'],
                                                abs=2e-3)
