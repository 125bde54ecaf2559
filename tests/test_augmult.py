"""Tests for dpjax/augmult.py: views averaged before clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax.linen as nn

import dpjax
from dpjax import augmult
from dpjax import train


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[:-3] + (-1,))
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


MODEL = MLP()
SHAPE = (4, 4, 1)


def _setup(batch_size=6):
  rng = np.random.default_rng(0)
  batch = {
      'image': jnp.asarray(rng.normal(size=(batch_size,) + SHAPE),
                           jnp.float32),
      'label': jnp.arange(batch_size) % 3,
      'index': jnp.arange(batch_size) + 100,
  }
  params = MODEL.init(jax.random.key(0), batch['image'][:1])['params']
  return params, batch, train.example_loss(MODEL)


def _identity(key, image):
  del key
  return image


def _clipped(loss_fn, params, batch, clip_norm, key=None):
  fn = jax.jit(dpjax.clipped_grad(loss_fn, dpjax.clip_per_example(clip_norm)))
  return fn(params, batch, None, args=(dpjax.StepInputs(aug_key=key),))


def test_one_identity_view_is_plain_dp_sgd():
  params, batch, loss_fn = _setup()
  plain = _clipped(loss_fn, params, batch, 0.5)
  avg = augmult.average_over_views(loss_fn, _identity, 1)
  out = _clipped(avg, params, batch, 0.5, jax.random.key(3))
  for a, b in zip(jax.tree.leaves(out.grad_sum),
                  jax.tree.leaves(plain.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out.stats.norms, plain.stats.norms, rtol=1e-6)


def test_views_are_averaged_before_clipping():
  """The clipped row is clip(mean of view gradients), not mean of clips."""
  params, batch, loss_fn = _setup()
  num_views, clip_norm, key = 4, 0.05, jax.random.key(1)
  augment = augmult.get_augmentation(('flip', 'shift'))
  avg = augmult.average_over_views(loss_fn, augment, num_views)
  out = _clipped(avg, params, batch, clip_norm, key)

  grad = jax.jit(jax.grad(loss_fn))
  rows_before, rows_after = [], []
  for i in range(len(batch['label'])):
    ex = jax.tree.map(lambda x, i=i: x[i], batch)
    keys = jax.random.split(augmult.example_key(key, ex['index']), num_views)
    images = jax.vmap(augment, in_axes=(0, None))(keys, ex['image'])
    views = [grad(params, dict(ex, image=image)) for image in images]
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(v)])
            for v in views]
    mean = np.mean(flat, axis=0)
    rows_before.append(mean * min(1, clip_norm / np.linalg.norm(mean)))
    rows_after.append(np.mean(
        [f * min(1, clip_norm / np.linalg.norm(f)) for f in flat], axis=0))
  expected = np.sum(rows_before, axis=0)
  got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out.grad_sum)])
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  assert not np.allclose(got, np.sum(rows_after, axis=0), rtol=1e-3)
  # One example still moves the sum by at most the clip norm.
  assert max(np.linalg.norm(r) for r in rows_before) <= clip_norm * (1 + 1e-6)
  assert dpjax.clip_per_example(clip_norm).sensitivity() == clip_norm


def test_views_depend_on_the_example_not_its_row():
  """Same example in another batch position (or padding): the same views."""
  params, batch, loss_fn = _setup()
  avg = augmult.average_over_views(
      loss_fn, augmult.get_augmentation(('flip', 'shift')), 3)
  key = jax.random.key(2)
  perm = np.array([3, 0, 5, 1, 4, 2])
  a = _clipped(avg, params, batch, 0.5, key)
  b = _clipped(avg, params, jax.tree.map(lambda x: x[perm], batch), 0.5, key)
  np.testing.assert_allclose(b.stats.norms, a.stats.norms[perm], rtol=1e-6)


def test_train_step_with_views_runs_and_uses_step_keys():
  params, batch, _ = _setup()
  del params
  plan = dpjax.make_plan(dpjax.PrivacyConfig(
      clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=4, steps=2),
                         100)
  aug = augmult.AugMult(augmult.get_augmentation(('shift',)), 2,
                        jax.random.key(0))
  images = jnp.concatenate([batch['image']] * 20)
  labels = jnp.concatenate([batch['label']] * 20)
  indices, mask = np.arange(8, dtype=np.int32), np.arange(8) < 6
  results = []
  for views in (None, aug):
    state = train.create_train_state(
        MODEL, jax.random.key(0), SHAPE,
        optax.chain(plan.noise(), optax.sgd(1.0)))
    step = train.make_train_step(MODEL, plan, augmult=views)
    state, metrics = step(state, images, labels, indices, mask)
    assert np.isfinite(float(metrics['loss']))
    results.append(state.params)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])))
  assert diff > 0  # the views changed the gradient
  assert not np.array_equal(jax.random.key_data(aug.step_key(0)),
                            jax.random.key_data(aug.step_key(1)))


def test_augmentations_keep_shape_and_content():
  image = jnp.arange(16.0).reshape(4, 4, 1)
  flips = {tuple(np.ravel(augmult.random_flip(jax.random.key(s), image)))
           for s in range(20)}
  assert flips == {tuple(np.ravel(image)), tuple(np.ravel(image[:, ::-1]))}
  for s in range(10):
    shifted = augmult.random_shift(jax.random.key(s), image)
    assert shifted.shape == image.shape
    # A shift by at most one pixel keeps the 2x2 centre inside the view.
    assert set(np.ravel(image[1:3, 1:3])) <= set(np.ravel(shifted))


def test_bad_settings():
  with pytest.raises(ValueError, match="unknown augmentation.*'rotate'"):
    augmult.get_augmentation(('flip', 'rotate'))
  with pytest.raises(ValueError, match='num_views'):
    augmult.average_over_views(lambda p, e: 0.0, _identity, 0)
  avg = augmult.average_over_views(lambda p, e: 0.0, _identity, 2)
  with pytest.raises(ValueError, match="'index'"):
    avg(None, {'image': jnp.zeros((2, 2, 1))}, jax.random.key(0))


def test_group_views_average_each_examples_views():
  # A group loss without coupling: views of the group == the group of views.
  from dpjax import batch_clipping  # pylint: disable=g-import-not-at-top
  params, batch, loss_fn = _setup(6)
  shift = lambda key, image: image + jax.random.normal(key, image.shape)
  inputs = dpjax.StepInputs(aug_key=jax.random.key(3))
  mask = jnp.arange(6) < 5
  def group(p, rows, rows_mask, inputs):  # a mean over its rows
    values = jax.vmap(loss_fn, in_axes=(None, 0, None))(p, rows, inputs)
    return jnp.sum(jnp.where(rows_mask, values, 0.0)) / rows_mask.shape[0]

  over_views = augmult.views_of_group(group, shift, 3)(params, batch, mask,
                                                       inputs)
  per_example = batch_clipping.group_loss_from_example_loss(
      augmult.average_over_views(loss_fn, shift, 3), 6)(params, batch, mask,
                                                        inputs)
  np.testing.assert_allclose(over_views, per_example, rtol=1e-5)
  with pytest.raises(ValueError, match='num_views'):
    augmult.views_of_group(group, shift, 0)


@pytest.mark.parametrize('private', [True, False])
def test_views_with_batchnorm_in_training_mode(monkeypatch, tmp_path,
                                               private):
  """Formerly refused: views inside batch-clipping groups with BatchNorm in
  training mode (policy 'batch'), and the non-private BatchNorm baseline."""
  # pylint: disable=g-import-not-at-top
  import sys
  import os
  from dpjax import models
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import default

  class TinyBN(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      return nn.Dense(10)(jnp.mean(nn.relu(x), axis=(-3, -2)))

  monkeypatch.setattr(models, 'get_model', lambda *a, **k: TinyBN())
  config = default.get_config()
  config.progress_bar = False
  config.privacy.steps = 2
  config.privacy.expected_batch_size = 32
  config.augmult.num_views = 2
  config.normalization.policy = 'batch' if private else 'frozen'
  config.data.public_fraction = 0.05
  if private:
    config.privacy.accountant = 'gdp'
    config.privacy.clipping.mode = 'batch'
    config.privacy.clipping.group_size = 8
  else:
    config.privacy.enabled = False
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(summary['test_loss'])
  assert 0 < summary['test_accuracy'] <= 1
