"""Tests for dpjax/batch_loss.py: a batch loss as the loss of a batch of one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import batch_loss
from dpjax import ghost


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


MODEL = CNN()
IMAGES = jax.random.normal(jax.random.key(0), (7, 6, 6, 1))
BATCH = {'image': IMAGES, 'label': jnp.arange(7) % 3}
PARAMS = MODEL.init(jax.random.key(1), IMAGES[:1])['params']
MASK = jnp.arange(7) < 6


def _per_row(params, batch):
  logits = MODEL.apply({'params': params}, batch['image'])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['label'])


def mean_loss(params, batch):
  return jnp.mean(_per_row(params, batch))


def sum_loss(params, batch):
  return jnp.sum(_per_row(params, batch))


def one_example_loss(params, example):  # what users wrote before: x[None][0]
  logits = MODEL.apply({'params': params}, example['image'][None])[0]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, example['label'])


def _assert_same(out, ref, rtol=1e-6, atol=1e-7):
  for a, b in zip(jax.tree.leaves(out.grad_sum), jax.tree.leaves(ref.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
  np.testing.assert_allclose(out.stats.losses, ref.stats.losses, rtol=rtol,
                             atol=atol)
  np.testing.assert_allclose(out.stats.norms, ref.stats.norms, rtol=rtol,
                             atol=atol)


@pytest.mark.parametrize('loss', [mean_loss, sum_loss, _per_row],
                         ids=['mean', 'sum', 'vector'])
def test_mean_sum_and_vector_losses_give_the_one_example_gradient(loss):
  clip = dpjax.clip_per_example(0.5)
  ref = jax.jit(dpjax.clipped_grad(one_example_loss, clip))(
      PARAMS, BATCH, MASK)
  out = jax.jit(dpjax.clipped_grad(loss, clip, keep_batch_dim=True))(
      PARAMS, BATCH, MASK)
  _assert_same(out, ref)
  assert float(out.stats.losses[6]) == 0.0  # the padding row


def test_keep_batch_dim_is_batch_of_one():
  clip = dpjax.clip_per_example(0.5)
  out = dpjax.clipped_grad(mean_loss, clip, keep_batch_dim=True,
                           microbatch_size=3)(PARAMS, BATCH, MASK)
  ref = dpjax.clipped_grad(batch_loss.batch_of_one(mean_loss), clip)(
      PARAMS, BATCH, MASK)
  _assert_same(out, ref)


def test_ghost_engine_takes_a_batch_of_one():
  clip = dpjax.clip_per_example(0.5)
  loss = batch_loss.batch_of_one(mean_loss)
  ref = jax.jit(dpjax.clipped_grad(loss, clip))(PARAMS, BATCH, MASK)
  for route in ('speed', 'memory'):
    fn = ghost.clipped_grad(loss, clip, norm_route=route)
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape[1:], x.dtype), BATCH)
    assert ghost.make_plan(loss, PARAMS, example, ()).layers  # not fallback
    _assert_same(jax.jit(fn)(PARAMS, BATCH, MASK), ref, rtol=1e-4,
                 atol=1e-6)


def test_aux_is_passed_on_for_the_batch_of_one():
  def loss(params, batch):
    per_row = _per_row(params, batch)
    return jnp.mean(per_row), {'logit_sum': jnp.sum(
        MODEL.apply({'params': params}, batch['image']), axis=-1)}

  out = dpjax.clipped_grad(loss, dpjax.clip_per_example(1.0), has_aux=True,
                           keep_batch_dim=True)(PARAMS, BATCH, MASK)
  expected = jnp.sum(MODEL.apply({'params': PARAMS}, IMAGES), axis=-1)
  assert out.stats.aux['logit_sum'].shape == (7, 1)
  np.testing.assert_allclose(out.stats.aux['logit_sum'][:, 0], expected,
                             rtol=1e-5, atol=1e-6)


def test_a_loss_that_is_not_per_example_is_refused():
  def matrix_loss(params, batch):  # [batch, classes]: not reduced
    return MODEL.apply({'params': params}, batch['image'])

  with pytest.raises(ValueError, match=r'returned shape \(1, 3\).*scalar'):
    dpjax.clipped_grad(matrix_loss, dpjax.clip_per_example(1.0),
                       keep_batch_dim=True)(PARAMS, BATCH, MASK)
