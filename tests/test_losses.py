"""Tests for dpjax/losses.py: labels outside the classes contribute nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import losses
from dpjax import models
from dpjax import train


def test_valid_labels_match_optax():
  logits = jax.random.normal(jax.random.key(0), (5, 4))
  labels = jnp.array([0, 1, 2, 3, 1])
  np.testing.assert_allclose(
      losses.cross_entropy(logits, labels),
      optax.softmax_cross_entropy_with_integer_labels(logits, labels),
      rtol=1e-6)


def test_invalid_labels_have_zero_loss_and_zero_gradient():
  """optax gives label K a NaN loss with a used gradient, -1 class K-1."""
  logits = jnp.array([[1.0, 2.0, 3.0]] * 4)
  labels = jnp.array([3, -1, 100, 1])
  out = losses.cross_entropy(logits, labels)
  assert out[:3].tolist() == [0.0, 0.0, 0.0] and out[3] > 0
  grads = jax.grad(lambda z: losses.cross_entropy(z, labels).sum())(logits)
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(grads[:3], 0.0)
  assert np.abs(grads[3]).sum() > 0


def test_example_loss_of_the_training_program_validates_labels():
  model = models.SmallCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  loss_fn = train.example_loss(model)
  image = jnp.ones((8, 8, 1))
  for label in (10, -1):
    loss, grads = jax.value_and_grad(loss_fn)(
        params, {'image': image, 'label': jnp.asarray(label)})
    assert float(loss) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  assert float(loss_fn(params, {'image': image, 'label': jnp.asarray(3)})) > 0
