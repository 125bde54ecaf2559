"""Small Flax Linen CNNs for DP-SGD on 28x28 and 8x8 images.

:class:`TanhCNN` is the end-to-end CNN of Tramer & Boneh 2021 ("Differentially
Private Learning Needs Better Features (or Much More Data)"), with the tanh
activations that Papernot et al. 2021 ("Tempered Sigmoid Activations for Deep
Learning with Differential Privacy") found better than ReLU under DP-SGD
because they keep activations, hence gradient norms, bounded.

:func:`get_model` also builds the residual networks of :mod:`dpjax.resnets`
(ResNet-18, ResNet-20, ResNet-8, ResNet-9, WRN-16-4, each with a choice of
normalization), the Flax NNX CNN of :mod:`dpjax.nnx_models` and the models
over scattering features of :mod:`dpjax.scatternet` (``scatter_linear``,
``scatter_cnn_tb``: Tramer & Boneh 2021's ScatterNet+linear and +CNN, and
``scatter_cnn``, dpjax's variant of the CNN for normalization studies; they take
the feature maps of ``config.data.features='scatternet'``), and the
transformers of :mod:`dpjax.transformers` (``vit_tiny``, ``vit_small``: a
ViT, Dosovitskiy et al. 2021; ``transformer_tiny``, ``transformer_small``: a
decoder-only transformer over token sequences, Radford et al. 2019).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from dpjax import nnx_models
from dpjax import resnets
from dpjax import scatternet
from dpjax import transformers


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
    'mish': jax.nn.mish,
    'gelu': nn.gelu,
    'silu': nn.silu,
    'elu': nn.elu,
}

# Residual networks with a choice of normalization (dpjax/resnets.py), and a
# Flax NNX CNN behind flax's Linen bridge (dpjax/nnx_models.py).
MODEL_NAMES: tuple[str, ...] = tuple(MODELS) + tuple(resnets.RESNETS) + (
    'nnx_cnn',) + tuple(scatternet.MODELS) + tuple(transformers.MODELS)
# The scattering models' defaults: Tramer & Boneh's GroupNorm of the features
# (27 groups, no scale or bias).
SCATTER_DEFAULT_NORM, SCATTER_DEFAULT_GROUPS = 'group', 27


def get_model(name: str, num_classes: int, activation: str | None = None, *,
              norm: str | None = None, num_groups: int | None = None,
              scale_norm: bool = False, width: float = 1.0,
              affine: bool = True, **transformer_options) -> nn.Module:
  """A Linen model by name (see :data:`MODEL_NAMES`).

  Args:
    name: 'tanh_cnn', 'small_cnn', 'cifar_tanh_cnn', 'resnet18', 'resnet20',
      'resnet8', 'resnet9', 'wrn16_4', 'nnx_cnn', 'scatter_linear',
      'scatter_cnn', 'scatter_cnn_tb', 'vit_tiny', 'vit_small', 'transformer_tiny' or
      'transformer_small'.
    num_classes: size of the output layer.
    activation: a key of :data:`ACTIVATIONS`; None: the model's default (tanh
      for the CNNs, relu for the ResNets, mish for ResNet-9).
    norm: residual and scattering networks only: 'none', 'group' or 'batch'
      (None: the model's default; 'batch' puts statistics in
      ``batch_stats``, which DP training handles by a
      :mod:`dpjax.normalization` policy).
    num_groups: GroupNorm groups (None: the model's default).
    scale_norm: residual networks and ``scatter_cnn``: a norm after each
      residual addition.
    width: residual networks and ``scatter_cnn``: multiplier of every
      channel count.
    affine: residual and scattering networks: learned scale and bias in the
      norms.
    **transformer_options: transformers only, any of
      :data:`dpjax.transformers.OPTIONS` (depth, dim, num_heads, patch_size,
      max_length, vocab_size, pool, dropout_rate, lora_rank, ...; None: the
      model's default).

  Returns:
    A ``flax.linen.Module``; the residual networks take ``train``.
  """
  if name not in MODEL_NAMES:
    raise ValueError(f'Unknown model {name!r}; known: {sorted(MODEL_NAMES)}.')
  if activation is not None and activation not in ACTIVATIONS:
    raise ValueError(
        f'Unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}.')
  given = sorted(k for k, v in transformer_options.items() if v is not None)
  if name in transformers.MODELS:
    if norm not in (None, 'none') or width != 1.0 or not affine:
      raise ValueError(
          f'model {name!r} normalizes with LayerNorm and is sized by model.dim;'
          f' it has no norm, width or affine options (got norm={norm!r},'
          f' width={width!r}, affine={affine!r}).')
    return transformers.build(
        name, num_classes, activation and ACTIVATIONS[activation],
        scale_norm, **transformer_options)
  if given:
    raise ValueError(f'options {given} belong to the transformers'
                     f' {sorted(transformers.MODELS)}, not to {name!r}.')
  if name in resnets.RESNETS:
    build, default_norm, default_groups, default_activation = (
        resnets.RESNETS[name])
    norm = resnets.check_norm(default_norm if norm is None else norm)
    options: dict[str, Any] = dict(
        num_classes=num_classes, norm=norm, scale_norm=scale_norm,
        num_groups=default_groups if num_groups is None else num_groups,
        width=width, affine=affine,
        activation=ACTIVATIONS[activation or default_activation])
    return build(**options)
  if name in scatternet.MODELS:
    return _scatter_model(name, num_classes, activation, norm=norm,
                          num_groups=num_groups, scale_norm=scale_norm,
                          width=width, affine=affine)
  if norm not in (None, 'none') or scale_norm or width != 1.0 or not affine:
    raise ValueError(
        f'model {name!r} has no normalization or width options (got norm='
        f'{norm!r}, scale_norm={scale_norm!r}, width={width!r}); use one of'
        f' {sorted(resnets.RESNETS)}.')
  activation = ACTIVATIONS[activation or 'tanh']
  if name == 'nnx_cnn':
    return nnx_models.NnxCNNLinen(num_classes=num_classes,
                                  activation=activation)
  return MODELS[name](num_classes=num_classes, activation=activation)


def _scatter_model(name: str, num_classes: int, activation: str | None, *,
                   norm: str | None, num_groups: int | None, scale_norm: bool,
                   width: float, affine: bool) -> nn.Module:
  """A model of :mod:`dpjax.scatternet` (refusing options it lacks)."""
  build, is_cnn = scatternet.MODELS[name]
  options: dict[str, Any] = dict(
      num_classes=num_classes,
      norm=resnets.check_norm(SCATTER_DEFAULT_NORM if norm is None else norm),
      num_groups=SCATTER_DEFAULT_GROUPS if num_groups is None else num_groups,
      affine=affine)
  if is_cnn:
    options.update(scale_norm=scale_norm, width=width,
                   activation=ACTIVATIONS[activation or 'tanh'])
  elif scale_norm or width != 1.0 or activation is not None:
    raise ValueError(
        f'model {name!r} is fixed beyond its feature normalization: it has'
        f' no scale_norm, width or activation (got scale_norm={scale_norm!r},'
        f" width={width!r}, activation={activation!r}); 'scatter_cnn' has"
        ' them.')
  return build(**options)
