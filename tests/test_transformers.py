"""Tests for dpjax/transformers.py: the ViT and the decoder-only transformer."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpjax

from dpjax import ghost
from dpjax import models
from dpjax.training import features

TINY = dict(dim=16, depth=1, num_heads=2, mlp_dim=16)
LAYER_LEAVES = {'kernel', 'bias', 'scale', 'embedding'}


def _leaf_names(tree):
  return {path[-1] for path in flax.traverse_util.flatten_dict(tree)}


@pytest.mark.parametrize('scale_norm', [False, True])
def test_vit_shapes_and_only_layer_parameters(scale_norm):
  model = models.get_model('vit_tiny', 10, scale_norm=scale_norm, **TINY)
  x = jnp.ones((3, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  assert model.apply(variables, x).shape == (3, 10)
  assert set(variables) == {'params'}
  assert _leaf_names(variables['params']) == LAYER_LEAVES
  assert ('encoder' in variables['params']) and (
      ('scale_norm1' in variables['params']['encoder']['block0'])
      == scale_norm)


def test_decoder_is_causal_and_pools():
  model = models.get_model('transformer_tiny', 7, vocab_size=7, pool='none',
                           max_length=12, **TINY)
  tokens = jnp.arange(12)[None] % 7
  variables = model.init(jax.random.key(0), tokens)
  assert _leaf_names(variables['params']) == LAYER_LEAVES
  logits = model.apply(variables, tokens)
  assert logits.shape == (1, 12, 7)
  changed = model.apply(variables, tokens.at[0, 8].set(0))
  # Positions before the change see the same prefix; position 8 does not.
  assert jnp.allclose(logits[0, :8], changed[0, :8], atol=1e-6)
  assert not jnp.allclose(logits[0, 8], changed[0, 8])
  last = models.get_model('transformer_tiny', 3, vocab_size=7, pool='last',
                          max_length=12, **TINY)
  assert last.apply(last.init(jax.random.key(0), tokens), tokens).shape == (
      1, 3)


def test_tied_output_uses_the_token_embedding():
  model = models.get_model('transformer_tiny', 7, vocab_size=7, pool='none',
                           tied_embedding=True, **TINY)
  tokens = jnp.zeros((1, 5), jnp.int32)
  variables = model.init(jax.random.key(0), tokens)
  assert 'head' not in variables['params']
  assert model.apply(variables, tokens).shape == (1, 5, 7)


def test_dropout_only_when_not_deterministic():
  model = models.get_model('transformer_tiny', 7, vocab_size=7,
                           dropout_rate=0.5, **TINY)
  tokens = jnp.arange(6)[None]
  variables = model.init(jax.random.key(0), tokens)
  plain = model.apply(variables, tokens)
  assert jnp.array_equal(plain, model.apply(variables, tokens))
  dropped = model.apply(variables, tokens, deterministic=False,
                        rngs={'dropout': jax.random.key(1)})
  assert not jnp.allclose(plain, dropped)


@pytest.mark.parametrize('name, options, match', [
    ('transformer_tiny', {}, 'vocab_size'),
    ('transformer_tiny', {'vocab_size': 5, 'pool': 'max'}, 'pool'),
    ('transformer_tiny', {'vocab_size': 5, 'tied_embedding': True},
     'tied_embedding'),
    ('vit_tiny', {'vocab_size': 5}, 'vocab_size'),
    ('vit_tiny', {'lora_rank': -1}, 'lora_rank'),
    ('tanh_cnn', {'depth': 2}, 'transformers'),
])
def test_bad_options_are_refused(name, options, match):
  with pytest.raises(ValueError, match=match):
    models.get_model(name, 10, **options)


def test_patch_size_must_divide_the_image():
  model = models.get_model('vit_tiny', 10, patch_size=3, **TINY)
  with pytest.raises(ValueError, match='patch_size=3'):
    model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))


def _model_and_example(name, lora_rank=0):
  if name == 'vit':
    model = models.get_model('vit_tiny', 10, lora_rank=lora_rank, **TINY)
    example = {'image': jnp.ones((8, 8, 1)), 'label': jnp.int32(0)}
  else:
    model = models.get_model('transformer_tiny', 7, vocab_size=7,
                             max_length=12, lora_rank=lora_rank,
                             pool='none' if name == 'lm' else 'mean', **TINY)
    example = {'tokens': jnp.arange(12) % 7,
               'label': jnp.arange(12) % 7 if name == 'lm' else jnp.int32(1)}
  field = 'image' if name == 'vit' else 'tokens'
  variables = model.init(jax.random.key(0), example[field][None])
  state = {k: v for k, v in variables.items() if k != 'params'}
  return model, variables['params'], state, example


@pytest.mark.parametrize('lora_rank', [0, 2])
@pytest.mark.parametrize('name', ['vit', 'classifier', 'lm'])
@pytest.mark.parametrize('norm_route', ['speed', 'memory'])
def test_every_parameter_takes_the_fast_route(name, lora_rank, norm_route):
  model, params, state, example = _model_and_example(name, lora_rank)
  loss_fn = features.example_loss(model, state)
  plan = ghost.make_plan(loss_fn, params, example, norm_route=norm_route)
  assert plan.fallback == (), plan.describe()
  owned = {i for l in plan.layers for _, i, _ in l.params}
  assert owned == set(range(len(jax.tree.leaves(params))))
  # What is skipped is frozen (LoRA's base weights): not parameters at all.
  assert all(why.startswith('its weights are not leaves of params')
             for _, why in plan.skipped) and bool(plan.skipped) == bool(
                 lora_rank)


@pytest.mark.parametrize('name', ['vit', 'lm'])
@pytest.mark.parametrize('norm_route', ['speed', 'memory'])
def test_fast_route_equals_vmap_on_the_zoo(name, norm_route):
  model, params, state, example = _model_and_example(name, lora_rank=2)
  # Adapters' B starts at zero: move every parameter off its init.
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape),
      params)
  loss_fn = features.example_loss(model, state)
  batch = jax.tree.map(lambda x: jnp.stack([x] * 4), example)
  field = 'image' if name == 'vit' else 'tokens'
  batch[field] = (batch[field] + jnp.arange(4).reshape(
      (4,) + (1,) * (batch[field].ndim - 1))) % (7 if name == 'lm' else 9)
  clip = dpjax.clip_per_example(0.01)
  mask = jnp.array([True, True, True, False])
  ref = jax.jit(dpjax.clipped_grad(loss_fn, clip))(params, batch, mask)
  out = jax.jit(ghost.clipped_grad(loss_fn, clip, norm_route=norm_route))(
      params, batch, mask)
  np.testing.assert_allclose(out.stats.norms, ref.stats.norms, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(out.grad_sum), jax.tree.leaves(ref.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
