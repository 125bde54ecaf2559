"""Tests for dpjax/resnets.py and dpjax/nnx_models.py (through get_model)."""

import pickle

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from configs import cifar10_scalenorm
from configs import cifar10_scalenorm_cpu
from dpjax import models
from dpjax import nnx_models
from dpjax import normalization
from dpjax import per_example
from dpjax import resnets
from dpjax import train

RBG = dict(impl='rbg')  # model init compiles ~5x faster than with threefry


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name,params', [
    ('resnet18', 11_173_962),
    ('resnet20', 272_474),
    ('resnet8', 78_042),
    ('resnet9', 2_447_946),
    ('wrn16_4', 2_748_906),
])
def test_full_size_parameter_counts(name, params):
  model = models.get_model(name, 10)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  assert _count(shapes['params']) == params
  assert ('batch_stats' in shapes) == (name == 'resnet18')


@pytest.mark.parametrize('norm,types', [
    ('none', set()),
    ('group', {'GroupNorm'}),
    ('batch', {'BatchNorm'}),
])
def test_norm_choice(norm, types):
  model = models.get_model('resnet8', 10, norm=norm, width=0.25)
  x = jnp.zeros((1, 8, 8, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  kinds = set()

  def trace(variables):
    kinds.update(k for k, _, _ in _record_calls(model, variables, x).values())
    return 0

  jax.eval_shape(trace, shapes)
  assert {k for k in kinds if 'Norm' in k} == types
  assert ('batch_stats' in shapes) == (norm == 'batch')


def test_bad_model_options():
  with pytest.raises(ValueError, match='model.norm'):
    models.get_model('resnet20', 10, norm='layer')
  with pytest.raises(ValueError, match='scale_norm'):
    jax.eval_shape(models.get_model('resnet20', 10, norm='none',
                                    scale_norm=True).init,
                   jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match='num_groups=5'):
    jax.eval_shape(models.get_model('resnet20', 10, num_groups=5).init,
                   jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match='no normalization or width'):
    models.get_model('tanh_cnn', 10, norm='group')


def _record_calls(model, variables, x):
  """path -> (module type, input, output) of every module call."""
  calls = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      calls['/'.join(context.module.path)] = (
          type(context.module).__name__, args[0], out)
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, x)
  return calls


def test_scale_norm_sits_after_the_residual_add_before_the_activation():
  block = resnets.BasicBlock(8, strides=2, norm='group', num_groups=4,
                             scale_norm=True)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  variables = jax.jit(block.init)(jax.random.key(1, **RBG), x)
  calls = _record_calls(block, variables, x)
  kind, scale_in, scale_out = calls['scale_norm']
  assert kind == 'GroupNorm'
  sum_in = calls['norm2'][2] + calls['shortcut_norm'][2]
  np.testing.assert_allclose(scale_in, sum_in, rtol=1e-6)
  np.testing.assert_allclose(block.apply(variables, x), nn.relu(scale_out),
                             rtol=1e-6)
  # Without ScaleNorm the activation takes the sum itself.
  plain = resnets.BasicBlock(8, strides=2, norm='group', num_groups=4)
  del variables['params']['scale_norm']
  np.testing.assert_allclose(plain.apply(variables, x), nn.relu(sum_in),
                             rtol=1e-6)


def test_resnet9_scale_norm_follows_each_residual_add():
  model = models.get_model('resnet9', 10, width=0.125, num_groups=4,
                           scale_norm=True)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(0, **RBG), x)
  calls = _record_calls(model, variables, x)
  for i in (1, 2):
    kind, scale_in, _ = calls[f'scale_norm{i}']
    assert kind == 'GroupNorm'
    residual_out = jax.nn.mish(calls[f'res{i}b_norm'][2])
    shortcut = calls[f'res{i}a_conv'][1]
    np.testing.assert_allclose(scale_in, residual_out + shortcut, rtol=1e-5,
                               atol=1e-6)
  # As in the authors' ResNet-9, no activation follows it.
  np.testing.assert_array_equal(calls['conv3_conv'][1],
                                calls['scale_norm1'][2])


def _per_example_check(loss_fn, params, batch, *args):
  grads = jax.jit(per_example.per_example_grads(loss_fn))(params, batch, *args)[1]
  one = jax.jit(jax.grad(loss_fn))
  for i in range(len(batch['label'])):
    example = jax.tree.map(lambda x: x[i], batch)
    ref = one(params, example, *args)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a[i], b, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize('name,options', [
    ('resnet18', dict(width=1 / 16)),  # BatchNorm, under the frozen policy
    ('resnet20', dict(width=0.25, num_groups=4)),  # resnet8's code too
    ('resnet9', dict(width=1 / 16, num_groups=4, scale_norm=True)),
    ('wrn16_4', dict(width=1 / 8, num_groups=4, scale_norm=True)),
    ('nnx_cnn', {}),
])
def test_per_example_gradients_match_a_loop(name, options):
  model = models.get_model(name, 10, **options)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  batch = {'image': x, 'label': jnp.array([1, 5, 9])}
  variables = jax.jit(model.init)(jax.random.key(0, **RBG), x[:1])
  if 'batch_stats' in variables:
    norm = normalization.make_normalizer(
        model, variables, normalization.NormalizationConfig(policy='frozen'))
    loss_fn = norm.example_loss()
    _per_example_check(loss_fn, variables['params'], batch,
                       dpjax.StepInputs(model_state=norm.init_state(variables)))
  else:
    _per_example_check(train.example_loss(model), variables['params'], batch)


def test_nnx_model_split_merge_per_example_and_training():
  """An NNX module trained by dpjax's engine through nnx.split / nnx.merge."""
  model = nnx_models.NnxCNN(in_channels=1, num_classes=2, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss_fn = nnx_models.example_loss(graphdef, rest)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 64)
  images = rng.normal(size=(64, 8, 8, 1)).astype(np.float32) + (
      2.0 * labels - 1)[:, None, None, None]
  data = {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}
  _per_example_check(loss_fn, params, jax.tree.map(lambda x: x[:3], data))

  plan = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=0.5, expected_batch_size=32, steps=15),
                         64)
  grad_fn = jax.jit(dpjax.clipped_grad(loss_fn, plan.clipping))
  tx = optax.chain(plan.noise(), optax.sgd(0.5))
  opt_state = tx.init(params)
  start = float(jnp.mean(jax.vmap(loss_fn, (None, 0))(params, data)))
  for step in range(plan.num_steps):
    batch = plan.sampler.sample(step)
    out = grad_fn(params, jax.tree.map(lambda x: x[batch.indices], data),
                  batch.mask)
    updates, opt_state = tx.update(out.grad_sum, opt_state, params)
    params = optax.apply_updates(params, updates)
  end = float(jnp.mean(jax.vmap(loss_fn, (None, 0))(params, data)))
  assert end < 0.7 * start
  nnx.update(model, params)
  np.testing.assert_allclose(
      model(data['image'][:2]),
      nnx.merge(graphdef, params, rest)(data['image'][:2]), rtol=1e-6)


@pytest.fixture
def fast_compile():
  """Non-partitionable threefry: the same distributions, compiled ~3x faster
  on CPU (model init and per-leaf noise dominate this test's time)."""
  before = jax.config.jax_threefry_partitionable
  jax.config.update('jax_threefry_partitionable', False)
  yield
  jax.config.update('jax_threefry_partitionable', before)


def test_cifar10_scalenorm_config_runs(tmp_path, fast_compile):
  """Seed 5's config, shrunk: a few steps on a CIFAR-format fixture."""
  del fast_compile
  raw = tmp_path / 'raw'
  raw.mkdir()
  rng = np.random.default_rng(0)
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    with open(raw / name, 'wb') as f:
      pickle.dump({b'labels': rng.integers(0, 10, 8).tolist(),
                   b'data': rng.integers(0, 256, (8, 3072), np.uint8)}, f)
  config = cifar10_scalenorm.get_config()
  assert (config.model.name, config.model.norm, config.model.scale_norm,
          config.model.activation, config.optimizer.name) == (
              'resnet9', 'group', True, 'mish', 'nadam')
  assert (config.privacy.clip_norm, config.privacy.expected_batch_size,
          config.privacy.target_epsilon) == (1.5, 1024, 8.0)
  config.progress_bar = False
  config.data.manual_dir = str(raw)
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  config.model.width = 1 / 16
  config.privacy.expected_batch_size = 8
  config.privacy.steps = 2
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['dataset'] == 'cifar10' and summary['dataset_size'] == 40
  assert summary['epsilon'] <= 8.0 and summary['accountant'] == 'rdp'
  assert 'normalization' not in summary  # GroupNorm needs no policy


def test_cifar10_scalenorm_cpu_config_is_the_recipe_at_a_quarter_width():
  gpu, cpu = cifar10_scalenorm.get_config(), cifar10_scalenorm_cpu.get_config()
  for field in ('name', 'norm', 'num_groups', 'scale_norm', 'activation'):
    assert cpu.model[field] == gpu.model[field], field
  assert (cpu.privacy.clip_norm, cpu.privacy.target_epsilon,
          cpu.optimizer.name, cpu.optimizer.learning_rate) == (
              gpu.privacy.clip_norm, gpu.privacy.target_epsilon,
              gpu.optimizer.name, gpu.optimizer.learning_rate)
  assert cpu.model.width == 0.25 and cpu.eval_size < 10000

  def size(width):
    model = models.get_model('resnet9', 10, norm='group', num_groups=32,
                             scale_norm=True, width=width)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3)))
    return sum(x.size for x in jax.tree.leaves(shapes))

  assert size(cpu.model.width) < size(1.0) / 12  # ~1/16 of the compute
