"""Residual networks for DP training, each with a choice of normalization.

* :class:`ResNet` with :class:`BasicBlock`: ResNet-18 for CIFAR (He et al.
  2016, "Deep Residual Learning for Image Recognition"; BatchNorm by default,
  the model of Nguyen et al. 2023's batch clipping), ResNet-20 (He et al.'s
  CIFAR network, the model of Xiao et al. 2022's ModelMix) and ResNet-8 (one
  block per stage: a residual network small enough for CPU experiments).
* :class:`ResNet9`: the ResNet-9 of Klause et al. 2022 ("Differentially
  Private Training of Residual Networks with Scale Normalization"): GroupNorm
  with 32 groups, Mish, and optional ScaleNorm.
* :class:`WideResNet` (WRN-16-4): the pre-activation wide ResNet of De et al.
  2022 ("Unlocking High-Accuracy Differentially Private Image Classification
  through Scale"), with GroupNorm and weight-standardized convolutions.

``norm`` is 'none', 'group' or 'batch'. GroupNorm, weight standardization and
ScaleNorm act on one example at a time, so per-example clipping bounds one
example's influence as it is. BatchNorm couples the examples of a batch: its
statistics live in the ``batch_stats`` collection, and DP training decides
what they are computed from through a policy of :mod:`dpjax.normalization`
(privacy invariant 5: nothing data-dependent leaves a step unprotected).

ScaleNorm (Klause et al.) adds one normalization right after each residual
addition, before the activation: ``out = act(norm(block(x) + shortcut(x)))``.
Every model takes ``train`` (BatchNorm uses batch statistics when True) and a
``width`` multiplier of all channel counts (small widths for fast tests).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS: tuple[str, ...] = ('none', 'group', 'batch')
Activation = Callable[[jax.Array], jax.Array]


def group_count(features: int, num_groups: int) -> int:
  """GroupNorm groups for ``features`` channels: ``min(num_groups, features)``.

  Examples:
    >>> group_count(128, 32), group_count(16, 32)
    (32, 16)
  """
  groups = min(num_groups, features)
  if groups <= 0 or features % groups:
    raise ValueError(
        f'GroupNorm with num_groups={num_groups} cannot split {features}'
        ' channels evenly; choose model.num_groups dividing every channel'
        ' count (or a width multiplier that keeps them divisible).')
  return groups


def check_norm(norm: str) -> str:
  if norm not in NORMS:
    raise ValueError(f'model.norm must be one of {NORMS}, got {norm!r}.')
  return norm


def scaled_width(features: int, width: float) -> int:
  """``features * width`` rounded, at least 1."""
  return max(1, int(round(features * width)))


def normalization(norm: str, features: int, num_groups: int, train: bool,
                  affine: bool = True,
                  name: str | None = None) -> Callable[[jax.Array], jax.Array]:
  """The normalization layer ``norm`` for ``features`` channels (in a module).

  Call inside a compact method: the layer becomes a submodule of the caller.
  'batch' stores its statistics in ``batch_stats``.
  """
  check_norm(norm)
  if norm == 'none':
    return lambda x: x
  if norm == 'group':
    return nn.GroupNorm(num_groups=group_count(features, num_groups),
                        use_scale=affine, use_bias=affine, name=name)
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      use_scale=affine, use_bias=affine, name=name)


def standardize_weight(kernel: jax.Array, eps: float = 1e-4) -> jax.Array:
  """Zero mean, 1/fan_in variance over each output channel's fan-in.

  The variance-preserving form of weight standardization (Qiao et al. 2019;
  Brock et al. 2021, used by De et al. 2022).

  Examples:
    >>> k = jax.random.normal(jax.random.key(0), (3, 3, 4, 2)) + 5.0
    >>> w = standardize_weight(k)
    >>> [abs(round(float(v), 3)) for v in w.mean((0, 1, 2))]
    [0.0, 0.0]
    >>> [round(float(v) * 36, 2) for v in w.var((0, 1, 2))]
    [1.0, 1.0]
  """
  axes = tuple(range(kernel.ndim - 1))
  fan_in = 1
  for a in axes:
    fan_in *= kernel.shape[a]
  mean = jnp.mean(kernel, axes, keepdims=True)
  var = jnp.var(kernel, axes, keepdims=True)
  return (kernel - mean) * jax.lax.rsqrt(jnp.maximum(var * fan_in, eps))


class WSConv(nn.Conv):
  """``nn.Conv`` whose kernel is weight-standardized on every call."""

  def param(self, name, init_fn, *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    return standardize_weight(value) if name == 'kernel' else value


class BasicBlock(nn.Module):
  """Two 3x3 convs with a shortcut; post-activation (He et al. 2016).

  ``act(norm2(conv2(act(norm1(conv1(x))))) + shortcut(x))``, with ScaleNorm
  ``act(scale_norm(... + shortcut(x)))``.
  """

  features: int
  strides: int = 1
  norm: str = 'batch'
  num_groups: int = 32
  scale_norm: bool = False
  affine: bool = True
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def norm(name):
      return normalization(self.norm, self.features, self.num_groups, train,
                           self.affine, name)

    bias = self.norm == 'none'
    y = nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=bias,
                name='conv1')(x)
    y = self.activation(norm('norm1')(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=bias,
                name='conv2')(y)
    y = norm('norm2')(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=bias,
                  name='shortcut_conv')(x)
      x = norm('shortcut_norm')(x)
    y = y + x
    if self.scale_norm:
      y = norm('scale_norm')(y)
    return self.activation(y)


class ResNet(nn.Module):
  """A CIFAR ResNet: 3x3 stem (no max-pool), stages of basic blocks, avg-pool.

  ``stage_sizes=(2, 2, 2, 2), features=(64, 128, 256, 512)`` is ResNet-18;
  ``(3, 3, 3), (16, 32, 64)`` is ResNet-20 and ``(1, 1, 1), (16, 32, 64)``
  ResNet-8 (with 1x1-conv projection shortcuts, He et al.'s option B).
  """

  stage_sizes: tuple[int, ...]
  features: tuple[int, ...]
  num_classes: int = 10
  norm: str = 'batch'
  num_groups: int = 32
  scale_norm: bool = False
  affine: bool = True
  width: float = 1.0
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.scale_norm and self.norm == 'none':
      raise ValueError("model.scale_norm needs model.norm 'group' or 'batch'.")
    features = [scaled_width(f, self.width) for f in self.features]
    x = nn.Conv(features[0], (3, 3), padding=1, use_bias=self.norm == 'none',
                name='stem_conv')(x)
    x = normalization(self.norm, features[0], self.num_groups, train,
                      self.affine, 'stem_norm')(x)
    x = self.activation(x)
    for stage, (size, f) in enumerate(zip(self.stage_sizes, features)):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(f, strides, self.norm, self.num_groups, self.scale_norm,
                       self.affine, self.activation,
                       name=f'stage{stage + 1}_block{block + 1}')(x, train)
    x = jnp.mean(x, axis=(-3, -2))
    return nn.Dense(self.num_classes, name='head')(x)


def adaptive_max_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Max over ``size`` bins of the spatial axes (PyTorch's AdaptiveMaxPool2d).

  Bin i of an axis of length L covers ``[floor(i L / n), ceil((i + 1) L / n))``.

  Examples:
    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> adaptive_max_pool(x, (2, 2))[0, ..., 0].tolist()
    [[4.0, 5.0], [7.0, 8.0]]
  """
  h, w = x.shape[-3], x.shape[-2]

  def bins(length, n):
    return [(i * length // n, -(-(i + 1) * length // n)) for i in range(n)]

  rows = []
  for r0, r1 in bins(h, size[0]):
    cols = [jnp.max(x[..., r0:r1, c0:c1, :], axis=(-3, -2))
            for c0, c1 in bins(w, size[1])]
    rows.append(jnp.stack(cols, axis=-2))
  return jnp.stack(rows, axis=-3)


class ResNet9(nn.Module):
  """ResNet-9 as in Klause et al.'s code, with optional ScaleNorm.

  conv(64) - conv(128)+pool - res(2 x conv(128)) [+ScaleNorm] - conv(256)+pool
  - conv(256)+pool - res(2 x conv(256)) [+ScaleNorm] - adaptive max-pool 2x2 -
  Dense. Each conv is 3x3 without bias, then norm, then activation. Their
  ScaleNorm is a norm right after each residual addition (no activation
  follows it in this network). Defaults: GroupNorm with 32 groups, Mish.
  """

  num_classes: int = 10
  norm: str = 'group'
  num_groups: int = 32
  scale_norm: bool = False
  affine: bool = True
  width: float = 1.0
  activation: Activation = jax.nn.mish

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.scale_norm and self.norm == 'none':
      raise ValueError("model.scale_norm needs model.norm 'group' or 'batch'.")

    def block(x, features, name, pool=False):
      f = scaled_width(features, self.width)
      x = nn.Conv(f, (3, 3), padding=1, use_bias=self.norm == 'none',
                  name=f'{name}_conv')(x)
      x = normalization(self.norm, f, self.num_groups, train, self.affine,
                        f'{name}_norm')(x)
      x = self.activation(x)
      return nn.max_pool(x, (2, 2), strides=(2, 2)) if pool else x

    def scale_norm(x, name):
      if not self.scale_norm:
        return x
      return normalization(self.norm, x.shape[-1], self.num_groups, train,
                           self.affine, name)(x)

    x = block(x, 64, 'conv1')
    x = block(x, 128, 'conv2', pool=True)
    x = scale_norm(block(block(x, 128, 'res1a'), 128, 'res1b') + x,
                   'scale_norm1')
    x = block(x, 256, 'conv3', pool=True)
    x = block(x, 256, 'conv4', pool=True)
    x = scale_norm(block(block(x, 256, 'res2a'), 256, 'res2b') + x,
                   'scale_norm2')
    x = adaptive_max_pool(x, (2, 2))
    x = x.reshape(x.shape[:-3] + (-1,))
    return nn.Dense(self.num_classes, name='head')(x)


class WideBlock(nn.Module):
  """Pre-activation wide block: ``conv(act(norm(conv(act(norm(x))))))``.

  With ScaleNorm the sum with the shortcut is normalized once more.
  """

  features: int
  strides: int = 1
  norm: str = 'group'
  num_groups: int = 16
  scale_norm: bool = False
  affine: bool = True
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def norm(features, name):
      return normalization(self.norm, features, self.num_groups, train,
                           self.affine, name)

    bias = self.norm == 'none'
    out = self.activation(norm(x.shape[-1], 'norm1')(x))
    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = WSConv(self.features, (1, 1), self.strides, use_bias=bias,
                        name='shortcut_conv')(out)
    y = WSConv(self.features, (3, 3), self.strides, padding=1, use_bias=bias,
               name='conv1')(out)
    y = self.activation(norm(self.features, 'norm2')(y))
    y = WSConv(self.features, (3, 3), padding=1, use_bias=bias,
               name='conv2')(y)
    y = y + shortcut
    if self.scale_norm:
      y = norm(self.features, 'scale_norm')(y)
    return y


class WideResNet(nn.Module):
  """WRN-depth-k (Zagoruyko & Komodakis 2016) as De et al. 2022 train it.

  Three groups of (depth - 4) / 6 pre-activation blocks with 16k, 32k, 64k
  channels, weight-standardized convs, GroupNorm (16 groups), a final
  norm-activation and average pooling.
  """

  depth: int = 16
  widen_factor: int = 4
  num_classes: int = 10
  norm: str = 'group'
  num_groups: int = 16
  scale_norm: bool = False
  affine: bool = True
  width: float = 1.0
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n + 4, got {self.depth}.')
    if self.scale_norm and self.norm == 'none':
      raise ValueError("model.scale_norm needs model.norm 'group' or 'batch'.")
    blocks = (self.depth - 4) // 6
    x = WSConv(scaled_width(16, self.width), (3, 3), padding=1,
               name='stem_conv')(x)
    for group, base in enumerate((16, 32, 64)):
      f = scaled_width(base * self.widen_factor, self.width)
      for block in range(blocks):
        strides = 2 if group > 0 and block == 0 else 1
        x = WideBlock(f, strides, self.norm, self.num_groups, self.scale_norm,
                      self.affine, self.activation,
                      name=f'group{group + 1}_block{block + 1}')(x, train)
    x = normalization(self.norm, x.shape[-1], self.num_groups, train,
                      self.affine, 'final_norm')(x)
    x = jnp.mean(self.activation(x), axis=(-3, -2))
    return nn.Dense(self.num_classes, name='head')(x)


def resnet18(**kwargs) -> ResNet:
  return ResNet(stage_sizes=(2, 2, 2, 2), features=(64, 128, 256, 512),
                **kwargs)


def resnet8(**kwargs) -> ResNet:
  return ResNet(stage_sizes=(1, 1, 1), features=(16, 32, 64), **kwargs)


def resnet20(**kwargs) -> ResNet:
  return ResNet(stage_sizes=(3, 3, 3), features=(16, 32, 64), **kwargs)


def wrn16_4(**kwargs) -> WideResNet:
  return WideResNet(depth=16, widen_factor=4, **kwargs)


# name -> (constructor, default norm, default groups, default activation)
RESNETS: dict[str, tuple[Callable[..., nn.Module], str, int, str]] = {
    'resnet18': (resnet18, 'batch', 32, 'relu'),
    'resnet20': (resnet20, 'group', 16, 'relu'),
    'resnet8': (resnet8, 'group', 16, 'relu'),
    'resnet9': (ResNet9, 'group', 32, 'mish'),
    'wrn16_4': (wrn16_4, 'group', 16, 'relu'),
}
