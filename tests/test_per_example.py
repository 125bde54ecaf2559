"""Tests for dpjax/per_example.py: per-example gradients and the clipped sum."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import models
from dpjax import per_example


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[:-3] + (-1,))
    return nn.Dense(3)(nn.tanh(nn.Dense(16)(x)))


def _setup(model, image_shape, batch_size=6, seed=0):
  key_x, key_p = jax.random.split(jax.random.key(seed))
  images = jax.random.normal(key_x, (batch_size,) + image_shape)
  labels = jnp.arange(batch_size) % 3
  params = model.init(key_p, images[:1])['params']

  def loss_fn(p, example):
    logits = model.apply({'params': p}, example['image'][None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, example['label'])

  return params, {'image': images, 'label': labels}, loss_fn


def _loop_grads(loss_fn, params, batch):
  """The reference: one jax.grad per example, no vmap."""
  size = len(batch['label'])
  grads = [jax.grad(loss_fn)(params, jax.tree.map(lambda x: x[i], batch))
           for i in range(size)]
  return jax.tree.map(lambda *g: jnp.stack(g), *grads)


MODELS = [
    ('mlp', MLP(), (4, 4, 1)),
    ('small_cnn', models.SmallCNN(num_classes=3), (8, 8, 1)),
    ('tanh_cnn', models.TanhCNN(num_classes=3), (28, 28, 1)),
]


@pytest.mark.parametrize('name,model,shape', MODELS)
def test_per_example_grads_match_one_example_loop(name, model, shape):
  del name
  params, batch, loss_fn = _setup(model, shape)
  _, grads = jax.jit(dpjax.per_example_grads(loss_fn))(params, batch)
  expected = _loop_grads(loss_fn, params, batch)
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name,model,shape', MODELS[:2])
def test_clipped_sum_matches_loop(name, model, shape):
  del name
  params, batch, loss_fn = _setup(model, shape)
  clip_norm = 0.5
  fn = jax.jit(dpjax.clipped_grad(loss_fn, dpjax.clip_per_example(clip_norm)))
  out = fn(params, batch, None)
  per_ex = _loop_grads(loss_fn, params, batch)
  norms = np.sqrt(sum(np.sum(np.reshape(g, (len(batch['label']), -1)) ** 2, 1)
                      for g in jax.tree.leaves(per_ex)))
  scale = np.minimum(1.0, clip_norm / norms)
  expected = jax.tree.map(
      lambda g: np.tensordot(scale, np.asarray(g), axes=1), per_ex)
  for g, e in zip(jax.tree.leaves(out.grad_sum), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.stats.norms, norms, rtol=1e-4)
  losses = [loss_fn(params, jax.tree.map(lambda x: x[i], batch))
            for i in range(len(batch['label']))]
  np.testing.assert_allclose(out.stats.losses, losses, rtol=1e-5)
  assert int(out.stats.num_clipped) == int(np.sum(norms > clip_norm))


@pytest.mark.parametrize('microbatch_size', [1, 2, 4, 5, 7, 100])
def test_result_does_not_depend_on_microbatch_size(microbatch_size):
  params, batch, loss_fn = _setup(MLP(), (4, 4, 1), batch_size=7)
  clip = dpjax.clip_per_example(0.3)
  mask = jnp.array([True] * 6 + [False])
  whole = jax.jit(dpjax.clipped_grad(loss_fn, clip))(params, batch, mask)
  chunked = jax.jit(dpjax.clipped_grad(
      loss_fn, clip, microbatch_size=microbatch_size))(params, batch, mask)
  for a, b in zip(jax.tree.leaves(whole.grad_sum),
                  jax.tree.leaves(chunked.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(whole.stats.norms, chunked.stats.norms,
                             rtol=1e-5)
  np.testing.assert_allclose(whole.stats.losses, chunked.stats.losses,
                             rtol=1e-5)
  assert chunked.stats.norms.shape == (7,)


@pytest.mark.parametrize('microbatch_size', [None, 2])
def test_padding_rows_change_nothing(microbatch_size):
  params, batch, loss_fn = _setup(MLP(), (4, 4, 1), batch_size=4)
  fn = jax.jit(dpjax.clipped_grad(loss_fn, dpjax.clip_per_example(1.0),
                                  microbatch_size=microbatch_size))
  base = fn(params, batch, None)
  # Three padding rows holding garbage (NaN, huge values, valid-looking data).
  junk = jnp.stack([jnp.full((4, 4, 1), jnp.nan), jnp.full((4, 4, 1), 1e30),
                    batch['image'][0]])
  padded = {'image': jnp.concatenate([batch['image'], junk]),
            'label': jnp.concatenate([batch['label'], jnp.array([0, 1, 2])])}
  mask = jnp.arange(7) < 4
  out = fn(params, padded, mask)
  for a, b in zip(jax.tree.leaves(base.grad_sum),
                  jax.tree.leaves(out.grad_sum)):
    np.testing.assert_array_equal(a, b) if microbatch_size is None else (
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7))
  assert int(out.stats.num_nonfinite) == 0
  np.testing.assert_array_equal(out.stats.losses[4:], 0.0)


@pytest.mark.parametrize('microbatch_size', [None, 3])
def test_nan_example_is_zeroed_and_counted(microbatch_size):
  params, batch, loss_fn = _setup(MLP(), (4, 4, 1), batch_size=5)
  fn = jax.jit(dpjax.clipped_grad(loss_fn, dpjax.clip_per_example(1.0),
                                  microbatch_size=microbatch_size))
  poisoned = dict(batch, image=batch['image'].at[2].set(jnp.nan))
  out = fn(params, poisoned, None)
  assert int(out.stats.num_nonfinite) == 1
  assert all(bool(jnp.all(jnp.isfinite(g)))
             for g in jax.tree.leaves(out.grad_sum))
  keep = jnp.arange(5) != 2
  expected = fn(params, batch, keep)
  for a, b in zip(jax.tree.leaves(out.grad_sum),
                  jax.tree.leaves(expected.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_has_aux_returns_per_example_aux():
  params, batch, loss_fn = _setup(MLP(), (4, 4, 1), batch_size=5)

  def loss_with_aux(p, example):
    loss = loss_fn(p, example)
    return loss, {'double': 2 * loss}

  out = jax.jit(dpjax.clipped_grad(
      loss_with_aux, dpjax.clip_per_example(1.0), has_aux=True,
      microbatch_size=2))(params, batch, None)
  np.testing.assert_allclose(out.stats.aux['double'], 2 * out.stats.losses,
                             rtol=1e-6)


def test_loss_args_are_broadcast():
  def loss_fn(w, example, scale):
    return scale * jnp.sum(w * example)

  fn = dpjax.clipped_grad(loss_fn, dpjax.clip_per_example(100.0))
  out = fn(jnp.ones(2), jnp.ones((3, 2)), None, args=(2.0,))
  np.testing.assert_allclose(out.grad_sum, [6.0, 6.0])


def test_rejects_mismatched_leading_sizes():
  fn = dpjax.clipped_grad(lambda w, ex: jnp.sum(w * ex['x']) + ex['y'],
                          dpjax.clip_per_example(1.0))
  with pytest.raises(ValueError, match='same leading'):
    fn(jnp.ones(2), {'x': jnp.ones((3, 2)), 'y': jnp.ones(4)}, None)


@pytest.mark.parametrize('size,microbatch_size', [
    (8232, 4096), (8192, 4096), (7, 2), (7, 100), (1, 1), (4097, 4096),
    (100, 33)])
def test_chunks_cover_the_batch_with_less_than_one_row_each_of_padding(
    size, microbatch_size):
  num_chunks, rows = per_example.chunking(size, microbatch_size)
  assert rows <= microbatch_size
  assert num_chunks == -(-size // microbatch_size)
  assert size <= num_chunks * rows < size + num_chunks


def test_a_poisson_batch_is_not_padded_up_to_a_whole_microbatch():
  """8232 rows in microbatches of at most 4096: 3 x 2744, not 3 x 4096."""
  fn = dpjax.clipped_grad(lambda w, ex: jnp.sum(ex['x'] * w),
                          dpjax.clip_per_example(1.0), microbatch_size=4096)
  jaxpr = str(jax.make_jaxpr(fn)(jnp.ones(2), {'x': jnp.ones((8232, 2))},
                                 None))
  assert 'f32[3,2744,2]' in jaxpr
  assert 'f32[3,4096,2]' not in jaxpr


@pytest.mark.parametrize('bad', [0, -2, 1.5, True])
def test_rejects_bad_microbatch_size(bad):
  with pytest.raises(ValueError, match='microbatch_size'):
    dpjax.clipped_grad(lambda w, ex: 0.0, dpjax.clip_per_example(1.0),
                       microbatch_size=bad)


def _engines():
  from dpjax import batch_clipping, distributed, ghost  # pylint: disable=g-import-not-at-top
  clip = dpjax.clip_per_example(1.0)
  loss = lambda w, ex: jnp.sum(jnp.tanh(ex['x'] @ w))
  group = batch_clipping.group_loss_from_example_loss(loss, 1)
  return {
      'vmap': dpjax.clipped_grad(loss, clip),
      'ghost': ghost.clipped_grad(loss, clip),
      'groups': batch_clipping.batch_clipped_grad(
          group, batch_clipping.clip_groups_of(clip, 1)),
      'sharded': distributed.clipped_grad(loss, clip, distributed.make_mesh(1)),
  }


@pytest.mark.parametrize('engine', ['vmap', 'ghost', 'groups', 'sharded'])
def test_a_padded_batch_cannot_reach_clipping_without_its_mask(engine):
  """The README's API, mask forgotten: an error, not example 0 counted 4x."""
  fn = _engines()[engine]
  sampler = dpjax.PoissonSampler(20, 4, pad_to_multiple_of=8,
                                 key=jax.random.key(1))
  data = {'x': jnp.asarray(np.random.default_rng(0).normal(size=(20, 3)),
                           jnp.float32)}
  padded = sampler.sample(0)
  assert padded.size < 8  # there are padding rows, repeating example 0
  batch = padded.take(data)
  w = jnp.ones(3)
  with pytest.raises(TypeError, match="needs the batch's mask"):
    fn(w, batch.examples)
  with pytest.raises(ValueError, match='carries its own mask'):
    fn(w, batch, batch.mask)
  out = fn(w, batch)
  explicit = fn(w, batch.examples, batch.mask)
  np.testing.assert_allclose(out.grad_sum, explicit.grad_sum, rtol=1e-6)
  real = jax.tree.map(lambda x: x[padded.indices[:padded.size]], data)
  np.testing.assert_allclose(out.grad_sum, fn(w, real, None).grad_sum,
                             rtol=1e-5, atol=1e-6)
  # What the mask prevents: the padding rows counted as example 0.
  assert not np.allclose(fn(w, batch.examples, None).grad_sum, out.grad_sum)


@pytest.mark.parametrize('microbatch_size', [None, 2])
def test_param_mask_cuts_every_row_before_clipping(microbatch_size):
  params, batch, loss_fn = _setup(MLP(), (4, 4, 1), batch_size=5)
  rng = np.random.default_rng(0)
  param_mask = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) < 0.5),
                            params)
  clip = dpjax.clip_per_example(0.1)
  out = jax.jit(dpjax.clipped_grad(loss_fn, clip,
                                   microbatch_size=microbatch_size))(
                                       params, batch, None,
                                       param_mask=param_mask)
  # The reference: each row's gradient cut to the mask, then clipped.
  _, grads = dpjax.per_example.per_example_grads(loss_fn)(params, batch)
  cut = jax.tree.map(lambda g, m: np.where(m, g, 0.0), grads, param_mask)
  expected, _ = clip.clip(cut, clip.init(params), None)
  for a, b, m in zip(jax.tree.leaves(out.grad_sum),
                     jax.tree.leaves(expected.grad_sum),
                     jax.tree.leaves(param_mask)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(a)[~np.asarray(m)] == 0.0)
  with pytest.raises(ValueError, match='param_mask must have the structure'):
    dpjax.clipped_grad(loss_fn, clip)(params, batch, None,
                                      param_mask=jnp.ones(3, bool))
