"""Flax NNX models in dpjax: split into a pure function, train, merge back.

dpjax's engine differentiates a pure ``loss_fn(params, example)``. An NNX
module becomes one with ``nnx.split(model, nnx.Param, ...)``: the parameters
are a pytree that :func:`dpjax.clipped_grad` vectorizes over, the rest (graph
and any other state) is held fixed, and ``nnx.merge`` rebuilds the module
inside the loss. :func:`example_loss` does this; :class:`NnxCNNLinen` wraps the
same module for ``dpjax-train`` through flax's Linen bridge.

Privacy invariant: the same as any model's. The non-parameter state is held
fixed inside the per-example loss, so nothing data-dependent is carried across
examples; an NNX module with ``nnx.BatchStat`` variables must go through a
:mod:`dpjax.normalization` policy (via the bridge, its statistics land in the
Linen ``batch_stats`` collection, which the policies handle).

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import dpjax
  >>> model = NnxCNN(in_channels=1, num_classes=10, rngs=nnx.Rngs(0))
  >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  >>> loss_fn = example_loss(graphdef, rest)
  >>> grad_fn = jax.jit(dpjax.clipped_grad(loss_fn, dpjax.clip_per_example(1.0)))
  >>> batch = {'image': jnp.ones((4, 8, 8, 1)), 'label': jnp.arange(4)}
  >>> out = grad_fn(params, batch, None)  # None: every row is real
  >>> bool(optax.tree.norm(out.grad_sum) <= 4.0 + 1e-5)
  True
  >>> nnx.update(model, optax.apply_updates(params, out.grad_sum))
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
from flax import nnx
from flax.nnx import bridge
import jax
import jax.numpy as jnp

from dpjax import losses


class NnxCNN(nnx.Module):
  """Conv(16, 3x3) - act - avg-pool/2 - Conv(32, 3x3) - act - mean - Linear."""

  def __init__(self, in_channels: int, num_classes: int = 10, *,
               activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
               rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.head = nnx.Linear(32, num_classes, rngs=rngs)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.activation(self.conv1(x))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    x = self.activation(self.conv2(x))
    return self.head(jnp.mean(x, axis=(-3, -2)))


class NnxCNNLinen(nn.Module):
  """:class:`NnxCNN` as a Linen module (input channels read from the input)."""

  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = jnp.tanh

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return bridge.to_linen(NnxCNN, x.shape[-1], self.num_classes,
                           activation=self.activation, name='nnx')(x)


def example_loss(graphdef: nnx.GraphDef,
                 *rest: Any) -> Callable[[Any, dict[str, jax.Array]], Any]:
  """Cross-entropy of ONE example for the NNX model ``merge(graphdef, p, *rest)``.

  Args:
    graphdef: the graph of ``nnx.split(model, nnx.Param, ...)``.
    *rest: the non-parameter states of the same split, held fixed.

  Returns:
    ``loss_fn(params, {'image': [H, W, C], 'label': []}) -> scalar``, pure in
    ``params`` (an ``nnx.State``, a pytree), for :func:`dpjax.clipped_grad`.
  """

  def loss_fn(params, example):
    model = nnx.merge(graphdef, params, *rest)
    logits = model(example['image'][None])[0]
    return losses.cross_entropy(logits, example['label'])

  return loss_fn
