"""Small Flax Linen CNNs for DP-SGD on 28x28 and 8x8 images.

:class:`TanhCNN` is the end-to-end CNN of Tramer & Boneh 2021 ("Differentially
Private Learning Needs Better Features (or Much More Data)"), with the tanh
activations that Papernot et al. 2021 ("Tempered Sigmoid Activations for Deep
Learning with Differential Privacy") found better than ReLU under DP-SGD
because they keep activations, hence gradient norms, bounded.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax


class TanhCNN(nn.Module):
  """Conv(16, 8x8, /2) - pool - Conv(32, 4x4, /2) - pool - Dense(32) - Dense.

  26,010 parameters on 28x28x1 inputs (MNIST, Fashion-MNIST).
  """

  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.tanh

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(16, (8, 8), strides=2, padding=3)(x)
    x = nn.max_pool(self.activation(x), (2, 2), strides=(1, 1))
    x = nn.Conv(32, (4, 4), strides=2, padding='VALID')(x)
    x = nn.max_pool(self.activation(x), (2, 2), strides=(1, 1))
    x = x.reshape(x.shape[:-3] + (-1,))
    x = self.activation(nn.Dense(32)(x))
    return nn.Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
  """Conv(16, 3x3) - pool/2 - Dense(32) - Dense, for 8x8 digits."""

  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.tanh

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(16, (3, 3), padding='SAME')(x)
    x = nn.avg_pool(self.activation(x), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[:-3] + (-1,))
    x = self.activation(nn.Dense(32)(x))
    return nn.Dense(self.num_classes)(x)


class CifarTanhCNN(nn.Module):
  """The CIFAR-10 end-to-end tanh CNN of Tramer & Boneh 2021 (551k params).

  Four conv blocks of two 3x3 convs (32, 64, 128 channels, the last block a
  single conv stage) with 2x2 max-pooling, then a Dense classifier.
  """

  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.tanh

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for features in (32, 64, 128):
      x = self.activation(nn.Conv(features, (3, 3), padding=1)(x))
      x = self.activation(nn.Conv(features, (3, 3), padding=1)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[:-3] + (-1,))
    x = self.activation(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


MODELS: dict[str, type[nn.Module]] = {
    'tanh_cnn': TanhCNN,
    'small_cnn': SmallCNN,
    'cifar_tanh_cnn': CifarTanhCNN,
}


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'tanh': nn.tanh,
    'relu': nn.relu,
}


def get_model(name: str, num_classes: int,
              activation: str = 'tanh') -> nn.Module:
  """A model from :data:`MODELS` by name."""
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; known: {sorted(MODELS)}.')
  if activation not in ACTIVATIONS:
    raise ValueError(
        f'Unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}.')
  return MODELS[name](num_classes=num_classes,
                      activation=ACTIVATIONS[activation])
