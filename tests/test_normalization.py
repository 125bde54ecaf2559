"""Tests for dpjax/normalization.py: every policy's privacy property."""


import dp_accounting
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as scipy_stats

import dpjax
from configs import default
from configs import mnist_bn_public
from dpjax import accounting
from dpjax import adaptive_clipping
from dpjax.data import idx
from dpjax import ghost
from dpjax import keys
from dpjax import normalization
from dpjax import per_example
from dpjax import models
from dpjax import plan as plan_lib
from dpjax import train

SHAPE = (4, 4, 1)


class TinyBN(nn.Module):
  """Two BatchNorms in sequence: the second sees the first's normalization."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(3)(x.mean((-3, -2)))


def _images(n, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n,) + SHAPE) * scale + 0.5, jnp.float32)


# Fixed keys: these tests compare runs draw for draw.
TEST_KEYS = dpjax.KeySchedule(0, 0)

@pytest.fixture(scope='module')
def tiny():
  model = TinyBN()
  variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'),
                                  jnp.zeros((1,) + SHAPE))
  return model, variables


def _normalizer(tiny, policy, public=True, **kwargs):
  model, variables = tiny
  plan = kwargs.pop('plan', None)
  config = normalization.NormalizationConfig(policy=policy, **kwargs)
  return normalization.make_normalizer(
      model, variables, config, plan=plan,
      public_images=np.asarray(_images(40, seed=9)) if public else None,
      public_key=TEST_KEYS.root(keys.PUBLIC_BATCH))


def test_reject_is_the_default_and_names_the_alternatives(tiny):
  model, variables = tiny
  with pytest.raises(ValueError) as err:
    normalization.make_normalizer(model, variables)
  message = str(err.value)
  assert 'batch_stats' in message
  for alternative in ("'public'", "'frozen'", "'privatized'", "'batch'",
                      "norm='group'"):
    assert alternative in message
  with pytest.raises(ValueError, match='batch_stats'):
    train.create_train_state(model, jax.random.key(0, impl='rbg'), SHAPE,
                             optax.sgd(0.1))


def test_non_private_runs_need_no_policy(tiny):
  norm = normalization.make_normalizer(*tiny, private=False)
  assert norm.policies == {'batch_stats': 'reject'}


@pytest.mark.parametrize('policy,match', [
    ('sometimes', 'must be one of'),
    ('cache:frozen', 'does not have'),
    ('batch_stats=public', 'must be one of'),
])
def test_bad_policy_strings(tiny, policy, match):
  with pytest.raises(ValueError, match=match):
    _normalizer(tiny, policy)


def test_per_collection_policies():
  assert normalization.parse_policy(
      'batch_stats:public', ['batch_stats', 'cache']) == {
          'batch_stats': 'public', 'cache': 'reject'}
  with pytest.raises(ValueError, match="accepts 'reject' or 'frozen'"):
    normalization.parse_policy('cache:public', ['cache'])


class WithCache(nn.Module):
  """A model with a non-BatchNorm collection it reads in the forward pass."""

  @nn.compact
  def __call__(self, x):
    shift = self.variable('cache', 'shift', jnp.zeros, x.shape[-1])
    return nn.Dense(3)((x - shift.value).reshape(x.shape[0], -1))


def test_frozen_other_collection_is_held_fixed():
  model = WithCache()
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE))
  variables = {**variables, 'cache': {'shift': jnp.full((1,), 0.25)}}
  with pytest.raises(ValueError, match="'cache'"):
    normalization.make_normalizer(model, variables)
  norm = normalization.make_normalizer(
      model, variables, normalization.NormalizationConfig(policy='frozen'))
  state = norm.init_state(variables)
  assert float(state['cache']['shift'][0]) == 0.25
  batch = {'image': _images(2), 'label': jnp.array([0, 1])}
  grads = _per_example(norm, variables['params'], state, batch, None)
  ref = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p, **state}, batch['image'][:1])[0], 0))(
          variables['params'])
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)
  loss_state, next_state = norm.step_state(variables['params'], state, None)
  assert loss_state is state and next_state is state


def test_public_policy_needs_public_data(tiny):
  with pytest.raises(ValueError, match='public_fraction'):
    _normalizer(tiny, 'public', public=False)


def test_batch_policy_allowed_only_with_batch_clipping(tiny):
  with pytest.raises(ValueError, match='requires batch clipping'):
    _normalizer(tiny, 'batch')
  model, variables = tiny
  norm = normalization.make_normalizer(
      model, variables, normalization.NormalizationConfig(policy='batch'),
      public_images=np.asarray(_images(8)), batch_clipping=True)
  assert norm.policies == {'batch_stats': 'batch'}


def test_batch_policy_refused_by_dpjax_train_without_batch_clipping(
    tmp_path):
  config = default.get_config()
  config.progress_bar = False
  config.model.name = 'resnet8'
  config.model.norm = 'batch'
  config.normalization.policy = 'batch'
  with pytest.raises(ValueError, match='requires batch clipping'):
    train.train_and_evaluate(config, str(tmp_path))


def test_batch_statistics_are_those_of_training_mode(tiny):
  """Equal to flax's own training-mode statistics, layer after layer."""
  model, variables = tiny
  x = _images(6, seed=1)
  stats = jax.jit(normalization.batch_statistics, static_argnums=0)(
      model, variables, x)
  momentum = 0.99  # nn.BatchNorm's default
  zero = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  _, updated = model.apply({'params': variables['params'], 'batch_stats': zero},
                           x, train=True, mutable=['batch_stats'])
  flax_stats = jax.tree.map(lambda s: s / (1 - momentum),
                            updated['batch_stats'])
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(flax_stats)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)


def _per_example(norm, params, model_state, batch, public):
  fn = jax.jit(per_example.per_example_grads(norm.example_loss(),
                                             has_aux=norm.has_aux))
  _, grads = fn(params, batch,
                dpjax.StepInputs(model_state=model_state, public=public))
  return grads


@pytest.mark.parametrize('stats_gradient', [False, True])
def test_public_policy_keeps_examples_independent(tiny, stats_gradient):
  """Changing private example j leaves example i's gradient unchanged."""
  model, variables = tiny
  norm = _normalizer(tiny, 'public', stats_gradient=stats_gradient)
  state = norm.init_state(variables)
  public = jnp.asarray(norm.public_batch(3))
  model_state, _ = norm.step_state(variables['params'], state, public)
  batch = {'image': _images(4, seed=2), 'label': jnp.array([0, 1, 2, 0])}
  changed = dict(batch, image=batch['image'].at[3].set(100.0))
  g1 = _per_example(norm, variables['params'], model_state, batch, public)
  g2 = _per_example(norm, variables['params'], model_state, changed, public)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(a[:3], b[:3])
    assert not np.allclose(a[3], b[3])

  # Training-mode BatchNorm over the private batch (what 'reject' refuses)
  # couples the examples: the same change moves every other gradient.
  def coupled_loss(params, images):
    logits, _ = model.apply({'params': params, **state}, images, train=True,
                            mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[0], batch['label'][0])

  c1 = jax.grad(coupled_loss)(variables['params'], batch['image'])
  c2 = jax.grad(coupled_loss)(variables['params'], changed['image'])
  assert not all(np.allclose(a, b) for a, b in
                 zip(jax.tree.leaves(c1), jax.tree.leaves(c2)))


def test_public_statistics_gradient_is_that_of_the_public_mix(tiny):
  """With stats_gradient, example i's gradient is that of BatchNorm over
  [public batch; example i] with statistics from the public rows only."""
  model, variables = tiny
  norm = _normalizer(tiny, 'public', stats_gradient=True)
  state = norm.init_state(variables)
  public = jnp.asarray(norm.public_batch(0))
  batch = {'image': _images(2, seed=4), 'label': jnp.array([1, 2])}
  grads = _per_example(norm, variables['params'], state, batch, public)

  def mix_loss(params, image, label):
    images = jnp.concatenate([public, image[None]])
    mask = jnp.arange(len(images)) < len(public)
    with normalization.batchnorm_interceptor(mask=mask):
      logits, _ = model.apply({'params': params, **state}, images, train=True,
                              mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits[-1], label)

  for i in range(2):
    ref = jax.grad(mix_loss)(variables['params'], batch['image'][i],
                             batch['label'][i])
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a[i], b, rtol=2e-3, atol=2e-5)


def _train_steps(tiny, policy, steps=3, physical_batch_size=None, mesh=None,
                 **kwargs):
  model, _ = tiny
  share = kwargs.get('stats_budget', 0.1) if policy == 'privatized' else None
  plan = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=0.5, expected_batch_size=8,
      steps=steps, stats_share=share), 64, pad_to_multiple_of=4,
                         keys=TEST_KEYS)
  norm = _normalizer(tiny, policy, plan=plan, **kwargs)
  tx = optax.chain(plan.noise(), optax.sgd(0.5))
  state = train.create_train_state(model, jax.random.key(0, impl='rbg'),
                                   SHAPE, tx, norm)
  start = jax.tree.map(jnp.copy, state)  # the step donates its input
  if mesh is not None:
    from dpjax import distributed  # pylint: disable=g-import-not-at-top
    state = distributed.put_replicated(state, mesh)
  step_fn = train.make_train_step(model, plan, normalizer=norm,
                                  stats_key=jax.random.key(2), mesh=mesh,
                                  physical_batch_size=physical_batch_size)
  images = _images(64, seed=5)
  labels = jnp.asarray(np.random.default_rng(5).integers(0, 3, 64))
  for step in range(steps):
    batch = plan.sampler.sample(step)
    state, _ = step_fn(state, images, labels, batch.indices, batch.mask,
                       norm.public_batch(step))
  return start, state


def _max_change(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_frozen_statistics_unchanged_by_training(tiny):
  start, end = _train_steps(tiny, 'frozen')
  assert _max_change(start.model_state, end.model_state) == 0.0
  # They are public statistics, not the initial values, and scale and bias
  # do train.
  assert _max_change(start.model_state, tiny[1]['batch_stats']) > 0
  bn_params = {k: v for k, v in end.params.items() if 'BatchNorm' in k}
  assert _max_change(bn_params, {k: start.params[k] for k in bn_params}) > 0


def test_frozen_without_public_data_keeps_the_initial_values(tiny):
  norm = _normalizer(tiny, 'frozen', public=False)
  state = norm.init_state(tiny[1])
  assert _max_change(state, {'batch_stats': tiny[1]['batch_stats']}) == 0.0
  assert norm.public_batch(0) is None


@pytest.mark.parametrize('policy', ['public', 'privatized'])
def test_public_and_privatized_statistics_move(tiny, policy):
  start, end = _train_steps(tiny, policy)
  assert _max_change(start.model_state, end.model_state) > 0


def _privatized(tiny, sigma=1.0, budget=0.2, clip=3.0, momentum=0.0):
  plan = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=sigma, expected_batch_size=16,
      steps=10, stats_share=budget), 1000, keys=TEST_KEYS)
  return plan, _normalizer(tiny, 'privatized', plan=plan, stats_budget=budget,
                           stats_clip_norm=clip, momentum=momentum)


def test_privatized_statistics_noise_std(tiny):
  """KS test: the released means carry N(0, (sigma_s C_s / B)^2) noise."""
  model, variables = tiny
  plan, norm = _privatized(tiny)
  sigma_g, sigma_s = accounting.split_noise_multiplier(1.0, 0.2)
  assert norm.stats_noise_std == pytest.approx(sigma_s * 3.0)
  state = norm.init_state(variables)
  center = normalization.stats_to_moments(state['batch_stats'])
  rows = jax.tree.map(lambda c: jnp.broadcast_to(c, (16,) + c.shape), center)
  total = norm.moment_sum(state, rows, jnp.ones(16, bool))
  update = jax.jit(norm.privatized_state)
  draws = []
  for i in range(300):
    new = update(state, total, jax.random.key(i))
    draws.append(np.concatenate([
        np.asarray(new['batch_stats'][k]['mean'] - state['batch_stats'][k]['mean'])
        for k in sorted(new['batch_stats'])]))
  draws = np.concatenate(draws)
  std = norm.stats_noise_std / 16
  assert scipy_stats.kstest(draws, 'norm', args=(0, std)).pvalue > 1e-3
  for wrong in (2 / 3, 3 / 2):
    assert scipy_stats.kstest(draws, 'norm',
                              args=(0, wrong * std)).pvalue < 1e-6


def test_privatized_statistics_ignore_padding_and_bound_each_example():
  center = {'layer': {'mean': jnp.zeros(3), 'meansq': jnp.ones(3)}}
  rows = {'layer': {'mean': jnp.array([[1.0, 0, 0], [jnp.nan, 0, 0],
                                       [1e9, 0, 0], [7.0, 7, 7]]),
                    'meansq': jnp.ones((4, 3))}}
  mask = jnp.array([True, True, True, False])
  out = normalization.privatize_moments(rows, mask, center, 2.0, 0.0, 4.0,
                                        jax.random.key(0))
  # Row 0 as it is, the NaN row dropped, the huge row clipped to norm 2, the
  # padding row ignored; divided by the public 4.
  np.testing.assert_allclose(out['layer']['mean'], [0.75, 0, 0], rtol=1e-6)


def test_privatized_release_costs_one_step_at_the_plan_sigma(tiny):
  """Gradient and statistics, released on one Poisson batch, are accounted
  as ONE Gaussian at the plan's sigma; the gradient alone at sigma_g would
  claim less: the ledger never under-reports."""
  plan, norm = _privatized(tiny, sigma=1.2, budget=0.3)
  sigma_g, sigma_s = norm.gradient_noise_multiplier, norm.stats_noise_multiplier
  assert (sigma_g ** -2 + sigma_s ** -2) ** -0.5 == pytest.approx(1.2)
  assert sigma_g > 1.2 and plan.grad_noise_multiplier == sigma_g
  assert plan.stats_noise_multiplier == sigma_s
  ledger = accounting.PrivacyLedger()
  for _ in range(plan.num_steps):
    ledger.record(plan.step_event())
  assert ledger.entries[0][0] == dp_accounting.PoissonSampledDpEvent(
      plan.sampling_rate, dp_accounting.GaussianDpEvent(1.2))
  gradient_only = accounting.epsilon(accounting.dpsgd_event(
      sigma_g, plan.sampling_rate, plan.num_steps), plan.config.delta)
  assert ledger.epsilon(plan.config.delta) == pytest.approx(plan.epsilon())
  assert ledger.epsilon(plan.config.delta) > gradient_only


def test_privatized_joint_sensitivity_is_one_over_sigma(tiny):
  """Adding one example moves (gradient sum / (sigma_g C), statistics sum /
  (sigma_s C_s)) by at most 1 / sigma, whatever the example."""
  plan, norm = _privatized(tiny, sigma=1.0, budget=0.25, clip=2.0)
  rng = np.random.default_rng(0)
  clip = plan.clipping
  for scale in (1e-3, 1.0, 1e6):
    grads = {'w': jnp.asarray(rng.normal(size=(5, 7)) * scale)}
    rows = {'l': {'mean': jnp.asarray(rng.normal(size=(5, 3)) * scale),
                  'meansq': jnp.asarray(rng.normal(size=(5, 3)) * scale)}}
    center = jax.tree.map(lambda r: jnp.zeros(r.shape[1:]), rows)
    with_last, without = jnp.ones(5, bool), jnp.arange(5) < 4

    def release(mask):
      g = clip.clip(grads, None, mask)[0].grad_sum['w'] / (
          norm.gradient_noise_multiplier * clip.l2_bound)
      s = normalization.privatize_moments(rows, mask, center, 2.0, 0.0, 1.0,
                                          jax.random.key(0))
      s = jnp.concatenate(jax.tree.leaves(s)) / norm.stats_noise_std
      return jnp.concatenate([g, s])

    moved = float(jnp.linalg.norm(release(with_last) - release(without)))
    assert moved <= 1.0 / plan.noise_multiplier * (1 + 1e-5)


def _group(n_real, pad_value):
  images = _images(5, seed=7).at[n_real:].set(pad_value)
  return {'image': images, 'label': jnp.array([0, 1, 2, 0, 1])}


def test_batch_group_loss_ignores_padding_rows(tiny):
  model, variables = tiny
  loss_fn = jax.jit(jax.value_and_grad(
      normalization.batchnorm_group_loss(model), has_aux=True))
  mask = jnp.arange(5) < 3
  state = dpjax.StepInputs(
      model_state={'batch_stats': variables['batch_stats']})
  outs = [loss_fn(variables['params'], _group(3, v), mask, state)
          for v in (0.0, 1e6, jnp.nan)]
  (loss, aux), grads = outs[0]
  for (l2, aux2), g2 in outs[1:]:
    assert float(l2) == pytest.approx(float(loss))
    for a, b in zip(jax.tree.leaves((aux, grads)), jax.tree.leaves((aux2, g2))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The statistics are those of the three real rows alone.
  real = _group(3, 0.0)['image'][:3]
  expected = normalization.batch_statistics(model, variables, real)
  got = normalization.moments_to_stats(aux['batch_moments'])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The mean has the public group size m = 5 as divisor.
  three = jax.tree.map(lambda x: x[:3], _group(3, 0.0))
  (loss3, _), _ = loss_fn(variables['params'], three, jnp.ones(3, bool), state)
  assert float(loss) == pytest.approx(float(loss3) * 3 / 5, rel=1e-5)


def test_batch_eval_statistics_use_each_batch_masked(tiny):
  model, variables = tiny
  norm = normalization.make_normalizer(
      model, variables, normalization.NormalizationConfig(
          policy='batch', eval_statistics='batch'), batch_clipping=True)
  images = _images(6, seed=8)
  apply = jax.jit(norm.eval_apply)
  mask = jnp.arange(6) < 4
  a = apply(variables, images, mask)
  b = apply(variables, images.at[4:].set(50.0), mask)
  np.testing.assert_allclose(a[:4], b[:4], rtol=1e-5, atol=1e-6)
  assert norm.public_batch(0) is None


@pytest.mark.parametrize('policy,eval_statistics', [
    ('public', 'public'), ('batch', 'public'), ('frozen', 'public')])
def test_evaluation_normalizes_with_the_statistics_the_policy_claims(
    tiny, policy, eval_statistics):
  """'public' (and 'batch' with public evaluation statistics): a fixed public
  batch's statistics at the parameters evaluated, never the stored ones
  (mnist_bn_public once evaluated with a running average of past weights'
  statistics); 'frozen': the stored ones."""
  model, variables = tiny
  norm = normalization.make_normalizer(
      model, variables, normalization.NormalizationConfig(
          policy=policy, eval_statistics=eval_statistics),
      public_images=np.asarray(_images(40, seed=9)),
      batch_clipping=policy == 'batch')
  params = jax.tree.map(lambda p: 3.0 * p, variables['params'])
  stored = jax.tree.map(lambda s: s + 5.0, variables['batch_stats'])
  evaluated = {'params': params, 'batch_stats': stored}
  images = _images(6, seed=4)
  got = jax.jit(norm.eval_apply)(evaluated, images, jnp.ones(6, bool))
  public = norm.public_images[:norm.config.public_batch_size]
  fresh = normalization.batch_statistics(model, evaluated, public)
  with_fresh = model.apply({'params': params, 'batch_stats': fresh}, images)
  with_stored = model.apply(evaluated, images)
  assert np.abs(with_fresh - with_stored).max() > 1e-2
  want = with_stored if policy == 'frozen' else with_fresh
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _mnist_fixture(directory, n_train=100, n_test=20):
  rng = np.random.default_rng(3)
  for split, n in (('train', n_train), ('t10k', n_test)):
    idx.write_idx(directory / f'{split}-images-idx3-ubyte',
                  rng.integers(0, 256, (n, 28, 28), np.uint8))
    idx.write_idx(directory / f'{split}-labels-idx1-ubyte',
                  rng.integers(0, 10, n).astype(np.uint8))
  return str(directory)


def _small(config, tmp_path):
  config.progress_bar = False
  config.data.manual_dir = _mnist_fixture(tmp_path)
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  config.data.public_fraction = 0.1
  config.model.width = 0.25
  config.privacy.steps = 2
  config.privacy.expected_batch_size = 16
  return config


@pytest.fixture
def fast_compile():
  """Non-partitionable threefry: the same distributions, compiled ~3x faster
  on CPU (model init and per-leaf noise dominate these tests' time)."""
  before = jax.config.jax_threefry_partitionable
  jax.config.update('jax_threefry_partitionable', False)
  yield
  jax.config.update('jax_threefry_partitionable', before)


def test_mnist_bn_public_config_runs(tmp_path, fast_compile):
  del fast_compile
  config = _small(mnist_bn_public.get_config(), tmp_path)
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['normalization'] == {
      'policies': {'batch_stats': 'public'}, 'public_batch_size': 10,
      'stats_gradient': True}
  assert summary['model'] == 'resnet8' and summary['public_examples'] == 10
  assert summary['dataset_size'] == 90  # the public slice left the private set
  assert summary['epsilon'] <= 3.0
  assert summary['noise_std_on_sum'] == pytest.approx(
      summary['noise_multiplier'] * summary['sensitivity'])


def _tinybn_config(monkeypatch, policy):
  """The default config, 3 steps of TinyBN under ``policy``."""
  monkeypatch.setattr(models, 'get_model', lambda *a, **k: TinyBN())
  config = default.get_config()
  config.progress_bar = False
  config.normalization.policy = policy
  config.privacy.steps = 3
  return config


def test_privatized_run_from_config_fields(monkeypatch, tmp_path):
  """dpjax-train with BatchNorm-privatized: summary states the true noise."""
  config = _tinybn_config(monkeypatch, 'privatized')
  config.data.public_fraction = 0.05
  summary = train.train_and_evaluate(config, str(tmp_path))
  norm = summary['normalization']
  assert norm['policies'] == {'batch_stats': 'privatized'}
  sigma = summary['noise_multiplier']
  assert (norm['gradient_noise_multiplier'] ** -2
          + norm['stats_noise_multiplier'] ** -2) ** -0.5 == pytest.approx(sigma)
  assert summary['noise_std_on_sum'] == pytest.approx(
      norm['gradient_noise_multiplier'] * summary['sensitivity'])
  assert norm['stats_noise_std_on_sum'] == pytest.approx(
      norm['stats_noise_multiplier'] * norm['stats_clip_norm'])
  assert summary['epsilon'] == pytest.approx(3.0, abs=1e-3)


def _bc_plan(steps=1, group_size=4):
  return dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=8,
      steps=steps, accountant='gdp', clipping=dpjax.ClippingConfig(
          mode='batch', group_size=group_size)), 64, keys=TEST_KEYS)


def test_batch_policy_moves_the_noisy_sum_by_at_most_2c(tiny):
  """Training-mode BatchNorm under batch clipping, end to end: replacing one
  example moves the noisy update by at most 2C / K (noise keys equal), and
  only through its own group."""
  model, variables = tiny
  plan = _bc_plan()
  norm = normalization.make_normalizer(
      model, variables, normalization.NormalizationConfig(
          policy='batch', eval_statistics='batch'), plan=plan,
      batch_clipping=True)
  step_fn = train.make_train_step(model, plan, normalizer=norm)
  batch = plan.sampler.sample(0)
  images = _images(64, seed=11)
  labels = jnp.asarray(np.random.default_rng(11).integers(0, 3, 64))
  changed = images.at[batch.indices[0]].set(1e4)

  def run(imgs):
    state = train.create_train_state(
        model, jax.random.key(0, impl='rbg'), SHAPE,
        optax.chain(plan.noise(), optax.sgd(1.0)), norm)
    start = jax.tree.map(jnp.copy, state.params)
    state, _ = step_fn(state, imgs, labels, batch.indices, batch.mask)
    assert state.model_state == {} or _max_change(
        state.model_state['batch_stats'], variables['batch_stats']) == 0.0
    return start, state.params

  start, a = run(images)
  _, b = run(changed)
  flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
  moved = float(jnp.linalg.norm(flat(a) - flat(b))) * plan.public_divisor
  assert 0 < moved <= plan.sensitivity * (1 + 1e-4)
  assert plan.sensitivity == 2.0
  assert _max_change(start, a) > 0


def test_batch_policy_needs_batch_clipping_and_privatized_refuses_it(tiny):
  with pytest.raises(ValueError, match='requires batch clipping'):
    _normalizer(tiny, 'batch')
  with pytest.raises(ValueError, match="clipping.mode='batch'"):
    normalization.make_normalizer(
        *tiny, normalization.NormalizationConfig(policy='privatized'),
        plan=_bc_plan(), batch_clipping=True)


def test_privatized_statistics_noised_once_over_physical_batches(tiny):
  """Physical batches sum the clipped moments; the state equals the one-call
  step's, so the statistics' noise is drawn once per logical step."""
  _, whole = _train_steps(tiny, 'privatized', steps=2)
  _, pieces = _train_steps(tiny, 'privatized', steps=2,
                           physical_batch_size=4)
  for a, b in zip(jax.tree.leaves((whole.params, whole.model_state)),
                  jax.tree.leaves((pieces.params, pieces.model_state))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)


def test_policies_run_on_a_device_mesh(tiny):
  """Once refused: the statistics policies under the sharded engine
  (1 device here; 2 and 8 in tests/test_distributed.py)."""
  from dpjax import distributed  # pylint: disable=g-import-not-at-top
  _, ref = _train_steps(tiny, 'privatized', steps=1)
  _, sharded = _train_steps(tiny, 'privatized', steps=1,
                            mesh=distributed.make_mesh(1))
  for a, b in zip(jax.tree.leaves((ref.params, ref.model_state)),
                  jax.tree.leaves((sharded.params, sharded.model_state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_private_batchnorm_trains_over_real_rows_of_each_piece(tiny):
  model, variables = tiny
  norm = normalization.make_normalizer(model, variables, private=False)
  tx = optax.chain(plan_lib.NonPrivatePlan().noise(), optax.sgd(0.1))
  state = train.create_train_state(model, jax.random.key(0, impl='rbg'),
                                   SHAPE, tx, norm)
  start = jax.tree.map(jnp.copy, state.model_state)
  step_fn = train.make_train_step(model, None, normalizer=norm,
                                  physical_batch_size=4)
  images = _images(12, seed=3)
  mask = np.arange(12) < 6  # the last piece is padding only
  state, metrics = step_fn(state, images, jnp.zeros(12, jnp.int32),
                           np.arange(12), mask)
  assert np.isfinite(float(metrics['loss']))
  leaves = jax.tree.leaves((state.params, state.model_state))
  assert all(np.all(np.isfinite(x)) for x in leaves)
  assert _max_change(start, state.model_state) > 0


def test_batch_policy_runs_from_config_fields(monkeypatch, tmp_path):
  """dpjax-train: BatchNorm-in-training-mode inside batch-clipping groups,
  running statistics from public batches for evaluation."""
  monkeypatch.setattr(models, 'get_model', lambda *a, **k: TinyBN())
  config = default.get_config()
  config.progress_bar = False
  config.normalization.policy = 'batch'
  config.data.public_fraction = 0.05
  config.privacy.steps = 2
  config.privacy.expected_batch_size = 32
  config.privacy.accountant = 'gdp'
  config.privacy.clipping.mode = 'batch'
  config.privacy.clipping.group_size = 8
  config.perf.physical_batch_size = 16
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['normalization'] == {
      'policies': {'batch_stats': 'batch'}, 'public_batch_size': 32,
      'eval_statistics': 'public'}
  assert summary['clipping_mode'] == 'batch' and summary['sensitivity'] == 2.0
  assert 0 < summary['test_accuracy'] <= 1


@pytest.mark.parametrize('policy,stats_gradient', [
    ('frozen', False), ('privatized', False), ('public', False),
    ('public', True)])
def test_policy_losses_on_the_ghost_routes_match_vmap(tiny, policy,
                                                      stats_gradient):
  """Inference-mode losses (given statistics) take the fast routes.

  Conv/Dense kernels get ghost norms and book-kept sums, BatchNorm scale and
  bias the vmap fallback, in one pass; 'public' with stats_gradient runs
  every layer on the public batch too, so no layer is owned and the route
  is vmap (route_refusal says so).
  """
  if policy == 'privatized':
    _, norm = _privatized(tiny)
  else:
    norm = _normalizer(tiny, policy, stats_gradient=stats_gradient)
  model, variables = tiny
  params = variables['params']
  public = norm.public_batch(0)
  args = (dpjax.StepInputs(
      model_state=norm.step_state(params, norm.init_state(variables),
                                  public)[0],
      public=None if public is None else jnp.asarray(public)),)
  images = np.array(_images(8, seed=3))
  images[1], images[2], images[7] = np.nan, images[2] * 1e30, np.nan
  batch = {'image': jnp.asarray(images), 'label': jnp.arange(8) % 3}
  mask = jnp.arange(8) < 7
  clip = adaptive_clipping.clip_quantile(
      1.0, rule='equal', groups='module', count_noise_std=1.0,
      expected_batch_size=8, key=0)
  state = clip.init(params)
  loss_fn = norm.example_loss()
  ref, out = (jax.jit(engine(loss_fn, clip, has_aux=norm.has_aux))(
      params, batch, mask, clip_state=state, args=args)
              for engine in (dpjax.clipped_grad, ghost.clipped_grad))
  for a, b in zip(jax.tree.leaves(out.grad_sum), jax.tree.leaves(ref.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  finite = np.isfinite(ref.stats.norms)
  np.testing.assert_allclose(out.stats.norms[finite], ref.stats.norms[finite],
                             rtol=1e-5)
  assert int(out.stats.num_nonfinite) == int(ref.stats.num_nonfinite) >= 1
  for a, b in zip(jax.tree.leaves(out.clip_state.counts),
                  jax.tree.leaves(ref.clip_state.counts)):
    assert float(a) == float(b)
  if norm.has_aux:  # the per-example moments the privatized policy releases
    for a, b in zip(jax.tree.leaves(out.stats.aux),
                    jax.tree.leaves(ref.stats.aux)):
      np.testing.assert_allclose(np.where(mask[:, None], a, 0),
                                 np.where(mask[:, None], b, 0), rtol=1e-6)
  example = jax.tree.map(lambda x: x[0], batch)
  owned = ghost.make_plan(loss_fn, params, example, args).layers
  through = policy == 'public' and stats_gradient
  assert len(owned) == (0 if through else 3)
  assert (ghost.route_refusal(clip, stats_through_public=through) is None) == (
      not through)


# ---------------------------------------------------------------------------
# privatized_once: statistics released once over the private set.


def _once(tiny, sigma=8.0, clip=2.0, steps=10, target_epsilon=None):
  plan = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=None if target_epsilon else 1.0,
      target_epsilon=target_epsilon, expected_batch_size=16, steps=steps,
      initial_noise_multiplier=sigma), 1000, keys=TEST_KEYS)
  return plan, _normalizer(tiny, 'privatized_once', plan=plan,
                           once_noise_multiplier=sigma, stats_clip_norm=clip)


def _flat_stats(state):
  moments = normalization.stats_to_moments(state['batch_stats'])
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(moments)])


def test_privatized_once_one_example_moves_the_sum_by_at_most_c(tiny):
  """Neighbouring private sets (one adversarial example added): the sums
  the release noises differ by at most the clip norm."""
  model, variables = tiny
  _, norm = _once(tiny, clip=2.0)
  state = norm.init_state(variables)
  base = np.asarray(_images(20, seed=1))

  def flat_sum(images):
    total = norm.once_moment_sum(variables['params'], state, images)
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(total)])

  without = flat_sum(base)
  for bad in (np.nan, np.inf, -np.inf, 1e30, 1e6, 0.0, 0.5):
    extra = np.full((1,) + SHAPE, bad, np.float32)
    moved = np.linalg.norm(flat_sum(np.concatenate([base, extra])) - without)
    assert moved <= 2.0 * (1 + 1e-5), (bad, moved)
  assert np.linalg.norm(flat_sum(np.concatenate(
      [base, np.full((1,) + SHAPE, 1e6, np.float32)])) - without) > 1.9


def test_privatized_once_chunks_and_padding_change_nothing(tiny, monkeypatch):
  model, variables = tiny
  _, norm = _once(tiny)
  state = norm.init_state(variables)
  images = np.asarray(_images(21, seed=2))
  whole = _flat_stats(norm.release_once(variables['params'], state, images,
                                        jax.random.key(1)))
  monkeypatch.setattr(normalization, 'ONCE_CHUNK', 8)  # 8 + 8 + 5 padded
  chunked = _flat_stats(norm.release_once(variables['params'], state, images,
                                          jax.random.key(1)))
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def _means(state):
  return np.concatenate([np.ravel(v['mean'])
                         for v in state['batch_stats'].values()])


def test_privatized_once_noise_std(tiny):
  """KS test: the released means are the clipped means plus
  N(0, (sigma C / n)^2)."""
  model, variables = tiny
  _, norm = _once(tiny, sigma=8.0, clip=2.0)
  assert norm.once_noise_std == pytest.approx(16.0)
  state = norm.init_state(variables)
  images = np.asarray(_images(50, seed=3))
  total = norm.once_moment_sum(variables['params'], state, images)
  exact = np.concatenate(
      [np.ravel(v['mean']) for v in total.values()]) / 50
  draws = np.concatenate([
      _means(norm.release_once(variables['params'], state, images,
                               jax.random.key(i))) - exact
      for i in range(100)])
  std = 16.0 / 50
  assert scipy_stats.kstest(draws, 'norm', args=(0, std)).pvalue > 1e-3
  for wrong in (2 / 3, 3 / 2):
    assert scipy_stats.kstest(draws, 'norm',
                              args=(0, wrong * std)).pvalue < 1e-6


def test_privatized_once_is_composed_into_epsilon_and_calibration(tiny):
  plan, _ = _once(tiny, sigma=4.0, steps=50)
  initial = dp_accounting.GaussianDpEvent(4.0)
  steps = accounting.dpsgd_event(1.0, plan.sampling_rate, 50)
  assert plan.epsilon() == pytest.approx(accounting.epsilon(
      dp_accounting.ComposedDpEvent([initial, steps]), plan.config.delta))
  assert plan.epsilon(0) == pytest.approx(
      accounting.epsilon(initial, plan.config.delta))
  assert plan.epsilon() > accounting.epsilon(steps, plan.config.delta)
  ledger = accounting.PrivacyLedger()
  plan.record_start(ledger)
  for t in range(50):
    plan.record_step(ledger, t)
  assert ledger.epsilon(plan.config.delta) == pytest.approx(plan.epsilon())
  with pytest.raises(ValueError, match='fresh ledger'):
    plan.record_start(ledger)
  # calibration spends the rest of the budget on the steps
  calibrated, _ = _once(tiny, sigma=4.0, steps=50, target_epsilon=2.0)
  alone = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, target_epsilon=2.0, expected_batch_size=16, steps=50),
      1000, keys=TEST_KEYS)
  assert calibrated.epsilon() == pytest.approx(2.0, abs=2e-3)
  assert calibrated.epsilon() <= 2.0
  assert calibrated.noise_multiplier > alone.noise_multiplier
  with pytest.raises(ValueError, match='alone costs epsilon'):
    _once(tiny, sigma=0.5, steps=50, target_epsilon=1.0)


def test_privatized_once_needs_its_release_in_the_plan(tiny):
  plan = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=16, steps=5),
      1000, keys=TEST_KEYS)
  with pytest.raises(ValueError, match='initial_noise_multiplier'):
    _normalizer(tiny, 'privatized_once', plan=plan)
  with pytest.raises(ValueError, match="mode='batch'"):
    dpjax.make_plan(dpjax.PrivacyConfig(
        clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=8, steps=1,
        accountant='gdp', initial_noise_multiplier=8.0,
        clipping=dpjax.ClippingConfig(mode='batch', group_size=4)), 64,
        keys=TEST_KEYS)


def test_privatized_once_run_from_config_fields(monkeypatch, tmp_path):
  """dpjax-train with privatized_once: the summary states the release's
  noise, and epsilon counts the release once, also after a resume."""
  config = _tinybn_config(monkeypatch, 'privatized_once')
  config.normalization.once_noise_multiplier = 4.0
  summary = train.train_and_evaluate(config, str(tmp_path))
  norm = summary['normalization']
  assert norm['policies'] == {'batch_stats': 'privatized_once'}
  assert norm['once_noise_std_on_sum'] == pytest.approx(
      4.0 * norm['stats_clip_norm'])
  assert summary['initial_noise_multiplier'] == 4.0
  assert summary['epsilon'] == pytest.approx(3.0, abs=1e-3)
  assert summary['epsilon'] <= 3.0
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again['epsilon'] == pytest.approx(summary['epsilon'])


def test_privatized_once_floors_each_variance_at_its_noise(tiny):
  model, variables = tiny
  _, norm = _once(tiny, sigma=8.0, clip=2.0)
  state = norm.init_state(variables)
  images = np.asarray(_images(50, seed=3))
  out = norm.release_once(variables['params'], state, images,
                          jax.random.key(0))
  var = np.concatenate([np.ravel(v['var'])
                        for v in out['batch_stats'].values()])
  assert var.min() >= 16.0 / 50 * (1 - 1e-6)
  assert (var == np.float32(16.0 / 50)).any()  # some were noise only


def test_privatized_once_never_releases_without_noise(tiny):
  model, variables = tiny
  _, norm = _once(tiny)
  silent = normalization.Normalizer(model=model, policies=norm.policies,
                                    config=norm.config)
  with pytest.raises(ValueError, match='un-noised'):
    silent.release_once(variables['params'], silent.init_state(variables),
                        np.asarray(_images(4)), jax.random.key(0))


def test_privatized_once_pld_calibration_names_the_release(tiny):
  with pytest.raises(ValueError, match='alone costs epsilon'):
    dpjax.make_plan(dpjax.PrivacyConfig(
        clip_norm=1.0, target_epsilon=0.45, expected_batch_size=50,
        steps=100, accountant='pld', initial_noise_multiplier=8.0), 1000,
        keys=TEST_KEYS)
