"""Tests for dpjax/example_keys.py: per-example keys from the dataset index."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import batch_loss
from dpjax import example_keys
from dpjax import ghost
from dpjax import keys


class DropoutMLP(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.tanh(nn.Dense(16)(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3)(x)


MODEL = DropoutMLP()
N = 10
DATA = {'x': jax.random.normal(jax.random.key(0), (N, 5)),
        'y': jnp.arange(N) % 3}
PARAMS = MODEL.init(jax.random.key(1), DATA['x'][:1], train=False)['params']
SCHEDULE = dpjax.KeySchedule(seed=0, secret_seed=123)
INPUTS = dpjax.StepInputs(dropout_key=SCHEDULE.key(keys.DROPOUT, step=4))


def batch_loss_with_key(params, batch, key):
  logits = MODEL.apply({'params': params}, batch['x'], rngs={'dropout': key})
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y']).mean()


LOSS = example_keys.with_example_keys(
    batch_loss.batch_of_one(batch_loss_with_key))
CLIP = dpjax.clip_per_example(0.7)


def _rows(order):
  """A batch of the examples ``order`` (dataset indices), with indices."""
  indexed = example_keys.with_indices(DATA)
  return jax.tree.map(lambda x: x[np.asarray(order)], indexed)


def test_two_examples_get_different_keys_and_masks():
  seen = []

  def loss(params, example, key):
    seen.append(key)
    return jnp.sum(params * example)

  fn = example_keys.with_example_keys(loss)
  indexed = example_keys.with_indices(jnp.ones((3, 2)))
  jax.vmap(fn, in_axes=(None, 0, None))(jnp.ones(2), indexed, INPUTS)
  key_data = np.asarray(jax.random.key_data(
      jax.vmap(example_keys.example_key, in_axes=(None, 0))(
          INPUTS.dropout_key, jnp.arange(3))))
  assert len({tuple(k) for k in key_data}) == 3
  # The engine's view: two copies of one example at different dataset
  # indices get different dropout masks, so different losses.
  same = {'x': jnp.tile(DATA['x'][:1], (2, 1)), 'y': jnp.zeros(2, int)}
  batch = example_keys.Indexed(same, jnp.array([0, 1], jnp.int32))
  out = jax.jit(dpjax.clipped_grad(LOSS, CLIP))(PARAMS, batch, None,
                                                args=(INPUTS,))
  assert float(out.stats.losses[0]) != float(out.stats.losses[1])


def test_the_key_follows_the_example_not_its_row_or_microbatch():
  order = [3, 7, 1, 8, 0, 5, 2]
  ref = jax.jit(dpjax.clipped_grad(LOSS, CLIP))(PARAMS, _rows(order), None,
                                                args=(INPUTS,))
  perm = [4, 2, 6, 0, 5, 1, 3]
  shuffled = [order[i] for i in perm]
  for m in (None, 2, 3):
    out = jax.jit(dpjax.clipped_grad(LOSS, CLIP, microbatch_size=m))(
        PARAMS, _rows(shuffled), None, args=(INPUTS,))
    np.testing.assert_allclose(out.stats.losses, ref.stats.losses[np.asarray(perm)],
                               rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out.grad_sum),
                    jax.tree.leaves(ref.grad_sum)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_padding_rows_do_not_change_the_real_rows_keys():
  padded = dpjax.Batch(_rows([4, 9, 0, 0]), np.array([1, 1, 0, 0], bool))
  fn = jax.jit(dpjax.clipped_grad(LOSS, CLIP))
  out = fn(PARAMS, padded, args=(INPUTS,))
  ref = fn(PARAMS, _rows([4, 9]), None, args=(INPUTS,))
  np.testing.assert_allclose(out.stats.losses[:2], ref.stats.losses,
                             rtol=1e-6)


def test_steps_give_different_masks():
  batch = _rows([2, 6])
  fn = jax.jit(dpjax.clipped_grad(LOSS, CLIP))
  out = [fn(PARAMS, batch, None, args=(dpjax.StepInputs(
      dropout_key=SCHEDULE.key(keys.DROPOUT, step)),)).stats.losses
         for step in (0, 1)]
  assert not np.allclose(out[0], out[1])


def test_ghost_engine_gives_the_same_keys():
  batch = _rows([3, 7, 1, 8, 0, 5])
  ref = jax.jit(dpjax.clipped_grad(LOSS, CLIP))(PARAMS, batch, None,
                                                args=(INPUTS,))
  fn = jax.jit(ghost.clipped_grad(LOSS, CLIP))
  out = fn(PARAMS, batch, None, args=(INPUTS,))
  np.testing.assert_allclose(out.stats.losses, ref.stats.losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out.grad_sum),
                  jax.tree.leaves(ref.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_misuse_is_refused():
  with pytest.raises(ValueError, match="field='noise_key'"):
    example_keys.with_example_keys(batch_loss_with_key, field='noise_key')
  with pytest.raises(TypeError, match='with_indices'):
    dpjax.clipped_grad(LOSS, CLIP)(PARAMS, DATA, None, args=(INPUTS,))
  with pytest.raises(ValueError, match='passed no dropout_key'):
    dpjax.clipped_grad(LOSS, CLIP)(PARAMS, _rows([1, 2]), None,
                                   args=(dpjax.StepInputs(),))
