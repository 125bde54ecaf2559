"""Tests for dpjax/models.py."""

import jax
import jax.numpy as jnp
import pytest

from dpjax import models


@pytest.mark.parametrize('name,shape,params', [
    ('tanh_cnn', (28, 28, 1), 26010),
    ('small_cnn', (8, 8, 1), 8714),
    ('cifar_tanh_cnn', (32, 32, 3), 550570),
])
def test_shapes_and_sizes(name, shape, params):
  model = models.get_model(name, 10)
  variables = model.init(jax.random.key(0), jnp.zeros((2,) + shape))
  assert sum(x.size for x in jax.tree.leaves(variables)) == params
  assert model.apply(variables, jnp.zeros((3,) + shape)).shape == (3, 10)


def test_unknown_model_and_activation():
  with pytest.raises(ValueError, match='Unknown model'):
    models.get_model('resnet1000', 10)
  with pytest.raises(ValueError, match='Unknown activation'):
    models.get_model('tanh_cnn', 10, activation='swish')
