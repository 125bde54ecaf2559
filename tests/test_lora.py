"""Tests for dpjax/lora.py: frozen layers with low-rank adapters."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from dpjax import lora
from dpjax import models
from dpjax.training import features

TINY = dict(dim=16, depth=1, num_heads=2, mlp_dim=16, vocab_size=7,
            max_length=8)


def _pair(rank=2):
  base = models.get_model('transformer_tiny', 3, **TINY)
  adapted = models.get_model('transformer_tiny', 3, lora_rank=rank,
                             lora_alpha=4.0, **TINY)
  tokens = jnp.arange(16).reshape(2, 8) % 7
  pretrained = base.init(jax.random.key(0), tokens)['params']
  variables = lora.from_pretrained(adapted.init(jax.random.key(1), tokens),
                                   pretrained)
  return base, adapted, pretrained, variables, tokens


def _paths(tree):
  return set(flax.traverse_util.flatten_dict(tree))


def test_lora_model_equals_the_pretrained_one_at_init():
  base, adapted, pretrained, variables, tokens = _pair()
  np.testing.assert_allclose(adapted.apply(variables, tokens),
                             base.apply({'params': pretrained}, tokens),
                             atol=1e-6)


def test_frozen_weights_are_not_parameters():
  _, _, pretrained, variables, _ = _pair()
  trained = _paths(variables['params'])
  assert all('_lora_' in '/'.join(p) or p[0] == 'head' for p in trained)
  # Every pretrained weight but the head is frozen, at the same path.
  assert _paths(variables[lora.FROZEN]) == {
      p for p in _paths(pretrained) if p[0] != 'head'}
  assert not _paths(variables[lora.FROZEN]) & trained


def test_only_adapters_and_head_get_gradients_and_they_move_the_output():
  _, adapted, _, variables, tokens = _pair()
  frozen = {lora.FROZEN: variables[lora.FROZEN]}

  def loss(params):
    return adapted.apply({'params': params, **frozen}, tokens).sum()

  grads = jax.grad(loss)(variables['params'])
  assert _paths(grads) == _paths(variables['params'])
  flat = flax.traverse_util.flatten_dict(grads)
  # B = 0 at init: A's gradient is zero, B's is not.
  assert any(jnp.any(g != 0) for p, g in flat.items() if p[-2].endswith('_b'))


def test_per_example_gradients_by_vmap_match_a_loop():
  _, adapted, _, variables, tokens = _pair()
  state = {lora.FROZEN: variables[lora.FROZEN]}
  params = jax.tree.map(lambda x: x + 0.1, variables['params'])  # B != 0
  loss_fn = features.example_loss(adapted, state)
  batch = {'tokens': tokens, 'label': jnp.array([0, 2])}
  out = dpjax.clipped_grad(loss_fn, dpjax.clip_per_example(1e6))(
      params, batch, jnp.ones(2, bool))
  loop = [jax.grad(loss_fn)(params, jax.tree.map(lambda x: x[i], batch))
          for i in range(2)]
  expected = jax.tree.map(lambda a, b: a + b, *loop)
  for got, want in zip(jax.tree.leaves(out.grad_sum),
                       jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_vit_lora_freezes_patch_embedding_and_norms():
  model = models.get_model('vit_tiny', 4, dim=16, depth=1, num_heads=2,
                           mlp_dim=16, lora_rank=2)
  variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
  assert {'patch_embed', 'pos_embed', 'encoder'} <= set(
      variables[lora.FROZEN])
  assert set(variables['params']) == {'encoder', 'head'}


def test_from_pretrained_refuses_another_architecture():
  _, adapted, _, _, tokens = _pair()
  other = models.get_model('transformer_tiny', 3, **dict(TINY, dim=8,
                                                          num_heads=2))
  with pytest.raises(ValueError, match='same architecture'):
    lora.from_pretrained(adapted.init(jax.random.key(1), tokens),
                         other.init(jax.random.key(0), tokens)['params'])
