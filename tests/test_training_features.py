"""Tests for dpjax/training/features.py: the per-example loss of token
inputs and per-example dropout keys."""

import jax
import jax.numpy as jnp
import numpy as np

import dpjax
from dpjax import keys
from dpjax import losses
from dpjax import models
from dpjax.training import features

TINY = dict(dim=16, depth=1, num_heads=2, mlp_dim=16, vocab_size=7,
            max_length=6)


def _model(**options):
  return models.get_model('transformer_tiny', 7, **dict(TINY, **options))


def test_language_model_loss_is_the_mean_over_positions():
  model = _model(pool='none')
  tokens = jnp.arange(6) % 7
  params = model.init(jax.random.key(0), tokens[None])['params']
  example = {'tokens': tokens, 'label': jnp.roll(tokens, -1)}
  logits = model.apply({'params': params}, tokens[None])[0]
  expected = losses.cross_entropy(logits, example['label']).mean()
  assert jnp.allclose(features.example_loss(model)(params, example), expected)


def _dropout_losses(model, params, tokens, index, mask, microbatch=None):
  inputs = dpjax.StepInputs(dropout_key=keys.KeySchedule(0, 1).key(
      keys.DROPOUT, 3))
  fn = dpjax.clipped_grad(features.example_loss(model),
                          dpjax.clip_per_example(1e6),
                          microbatch_size=microbatch)
  batch = {'tokens': tokens, 'label': jnp.zeros(len(index), jnp.int32),
           'index': jnp.asarray(index, jnp.int32)}
  return fn(params, batch, jnp.asarray(mask), args=(inputs,))


def test_dropout_masks_follow_the_example_not_its_row():
  model = _model(dropout_rate=0.5)
  tokens = jnp.tile(jnp.arange(6)[None], (4, 1))  # four identical sequences
  params = model.init(jax.random.key(0), tokens)['params']
  out = _dropout_losses(model, params, tokens, [0, 1, 2, 3], [True] * 4)
  losses_ = np.asarray(out.stats.losses)
  # Same tokens, different dataset indices: different masks.
  assert len(set(losses_.round(6).tolist())) == 4
  # Rows permuted, padded and cut into microbatches: each example's loss
  # (hence its mask) and the clipped sum are unchanged.
  order = [2, 0, 3, 1]
  padded = jnp.concatenate([tokens[jnp.array(order)], tokens[:2]])
  moved = _dropout_losses(model, params, padded, order + [9, 9],
                          [True] * 4 + [False] * 2, microbatch=4)
  np.testing.assert_allclose(np.asarray(moved.stats.losses)[:4],
                             losses_[order], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out.grad_sum),
                  jax.tree.leaves(moved.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_vmap_matches_a_loop_with_the_same_keys():
  model = _model(dropout_rate=0.3)
  tokens = jnp.arange(18).reshape(3, 6) % 7
  params = model.init(jax.random.key(0), tokens)['params']
  out = _dropout_losses(model, params, tokens, [5, 6, 7], [True] * 3)
  loss_fn = features.example_loss(model)
  inputs = dpjax.StepInputs(dropout_key=keys.KeySchedule(0, 1).key(
      keys.DROPOUT, 3))
  loop = [loss_fn(params, {'tokens': tokens[i], 'label': jnp.int32(0),
                           'index': jnp.int32(5 + i)}, inputs)
          for i in range(3)]
  np.testing.assert_allclose(out.stats.losses, loop, rtol=1e-5)


def test_dropout_feature_draws_the_step_key_from_its_stream():
  schedule = keys.KeySchedule(0, 1)
  feature = features.DropoutFeature(schedule.root(keys.DROPOUT))
  state = type('State', (), {'step': jnp.int32(4)})()
  _, fields = feature.prepare(state, None)
  assert feature.needs_index
  assert jnp.array_equal(jax.random.key_data(fields['dropout_key']),
                         jax.random.key_data(schedule.key(keys.DROPOUT, 4)))
