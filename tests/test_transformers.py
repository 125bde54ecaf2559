"""Tests for dpjax/transformers.py: the ViT and the decoder-only transformer."""

import flax
import jax
import jax.numpy as jnp
import pytest

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


def test_ghost_plan_finds_the_dense_and_conv_layers():
  """Today's fast route owns the Dense/Conv layers (the lead's change adds
  the rest); here only that the plan traces the model."""
  model = models.get_model('vit_tiny', 10, **TINY)
  x = jnp.ones((8, 8, 1))
  params = model.init(jax.random.key(0), x[None])['params']
  plan = ghost.make_plan(features.example_loss(model), params,
                         {'image': x, 'label': jnp.int32(0)})
  text = plan.describe()
  assert 'head' in text and 'patch_embed' in text
