"""LoRA: low-rank adapters on frozen pretrained layers (Hu et al. 2022).

"LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022) replaces a
pretrained dense layer ``y = x W + b`` by ``y = x W + b + (alpha / r) x A B``
with ``W, b`` frozen, ``A`` [d_in, r] and ``B`` [r, d_out] trained and ``B``
zero at initialization, so the adapted model starts equal to the pretrained
one. Yu et al. 2022 ("Differentially Private Fine-tuning of Language
Models") found that DP-SGD on the adapters alone matches or beats private
full fine-tuning: the noise covers r (d_in + d_out) coordinates per layer
instead of d_in d_out.

Here the frozen weights live in their own collection, :data:`FROZEN`, never
in ``'params'``: a run keeps them in ``TrainState.model_state`` (their
:mod:`dpjax.normalization` policy is ``'frozen'``: constant, never updated),
so they are never leaves of the tree the DP engine differentiates, clips
and noises. ``A`` and ``B`` are two ``nn.Dense`` calls, so the fast routes
(:mod:`dpjax.ghost`) compute adapter-only per-example norms.

:class:`Layers` builds a model's layers either trainable (rank 0) or frozen
with adapters; :func:`from_pretrained` fills a LoRA model's frozen collection
(and any trainable layer of the same name and shape, e.g. the head) from a
pretrained model's parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any

FROZEN = 'frozen'


def frozen(module_cls: type[nn.Module]) -> type[nn.Module]:
  """``module_cls`` with its parameters kept in the :data:`FROZEN` collection.

  The module computes as usual, reading its 'params' from ``FROZEN`` (and
  creating them there at ``init``), so its weights get no gradient.
  """
  return nn.map_variables(
      module_cls, ('params', FROZEN),
      trans_in_fn=lambda v: {'params': v.get(FROZEN, {}), FROZEN: {}},
      trans_out_fn=lambda v: {'params': {}, FROZEN: v.get('params', {})},
      init=True, mutable=False)


def _axes(axis: int | Sequence[int]) -> tuple[int, ...]:
  return (axis,) if isinstance(axis, int) else tuple(axis)


def lora_dense(x: jax.Array, features: int | Sequence[int], *, name: str,
               rank: int, alpha: float, axis: int | Sequence[int] = -1,
               use_bias: bool = True) -> jax.Array:
  """A frozen ``nn.DenseGeneral`` named ``name`` plus its low-rank update.

  Called inside a compact method. The frozen layer's variables sit at the
  same path as a pretrained ``nn.Dense``/``nn.DenseGeneral`` of that name
  (its kernel keeps flax's [*in, *out] layout); the adapters are the
  ``nn.Dense`` layers ``{name}_lora_a`` (lecun-normal) and
  ``{name}_lora_b`` (zero), applied to the contracted axes flattened.
  """
  axes = _axes(axis)
  if sorted(a % x.ndim for a in axes) != list(range(x.ndim - len(axes),
                                                    x.ndim)):
    raise ValueError(f'lora_dense contracts trailing axes only, got axis='
                     f'{axis!r} for inputs of rank {x.ndim}.')
  out_shape = (features,) if isinstance(features, int) else tuple(features)
  base = frozen(nn.DenseGeneral)(out_shape, axis=axes, use_bias=use_bias,
                                 name=name)(x)
  flat = x.reshape(x.shape[:x.ndim - len(axes)] + (-1,))
  low = nn.Dense(rank, use_bias=False, name=f'{name}_lora_a')(flat)
  update = nn.Dense(math.prod(out_shape), use_bias=False,
                    kernel_init=nn.initializers.zeros,
                    name=f'{name}_lora_b')(low)
  return base + (alpha / rank) * update.reshape(base.shape)


class LoRASelfAttention(nn.Module):
  """Multi-head self-attention with frozen projections and LoRA adapters.

  The frozen variables have the layout of ``nn.MultiHeadDotProductAttention``
  (``query``, ``key``, ``value``: [d, heads, d / heads]; ``out``: [heads,
  d / heads, d]), so a pretrained attention layer maps onto it by name.
  """

  num_heads: int
  rank: int
  alpha: float
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f'attention width {dim} is not divisible by'
                       f' num_heads={self.num_heads}.')
    heads = (self.num_heads, dim // self.num_heads)
    q, k, v = (lora_dense(x, heads, name=n, rank=self.rank, alpha=self.alpha)
               for n in ('query', 'key', 'value'))
    use_dropout = not deterministic and self.dropout_rate > 0
    y = nn.dot_product_attention(
        q, k, v, mask=mask, dropout_rate=self.dropout_rate,
        dropout_rng=self.make_rng('dropout') if use_dropout else None,
        deterministic=not use_dropout)
    return lora_dense(y, dim, axis=(-2, -1), name='out', rank=self.rank,
                      alpha=self.alpha)


@dataclasses.dataclass(frozen=True)
class Layers:
  """How a model builds its layers: trainable (``rank=0``) or LoRA.

  With ``rank > 0`` every dense layer and attention projection is frozen
  with adapters (:func:`lora_dense`) and every other layer (embeddings,
  norms, patch convolutions) is frozen whole (:func:`frozen`); only layers
  built directly (the head) stay trainable.
  """

  rank: int = 0
  alpha: float = 1.0

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or (
        self.rank < 0):
      raise ValueError(f'lora_rank must be an integer >= 0 (0: no LoRA), got'
                       f' {self.rank!r}.')
    if not self.alpha > 0:
      raise ValueError(f'lora_alpha must be > 0, got {self.alpha!r}.')

  def module(self, module_cls: type[nn.Module]) -> type[nn.Module]:
    """``module_cls``, frozen under LoRA."""
    return frozen(module_cls) if self.rank else module_cls

  def dense(self, x: jax.Array, features: int, name: str) -> jax.Array:
    if not self.rank:
      return nn.Dense(features, name=name)(x)
    return lora_dense(x, features, name=name, rank=self.rank,
                      alpha=self.alpha)

  def self_attention(self, x: jax.Array, num_heads: int, dropout_rate: float,
                     name: str, *, mask: jax.Array | None,
                     deterministic: bool) -> jax.Array:
    if not self.rank:
      return nn.MultiHeadDotProductAttention(
          num_heads, dropout_rate=dropout_rate, name=name)(
              x, mask=mask, deterministic=deterministic)
    return LoRASelfAttention(num_heads, self.rank, self.alpha, dropout_rate,
                             name=name)(x, mask=mask,
                                        deterministic=deterministic)


def from_pretrained(variables: PyTree, pretrained: PyTree) -> PyTree:
  """``variables`` with the pretrained parameters put where they belong.

  Every leaf of ``variables[FROZEN]`` is taken from ``pretrained`` (the
  pretrained model's 'params') at the same path; a missing path or another
  shape is an error. A trainable leaf of ``variables['params']`` is taken
  from ``pretrained`` where the path and shape match (a head of the same
  size) and keeps its initial value otherwise (adapters, a new head).
  Without a :data:`FROZEN` collection (full fine-tuning) only the second rule
  applies.
  """
  source = flax.traverse_util.flatten_dict(flax.core.unfreeze(pretrained))
  out = dict(variables)
  if FROZEN in variables:
    frozen_flat = flax.traverse_util.flatten_dict(variables[FROZEN])
    for path, leaf in frozen_flat.items():
      if path not in source or jnp.shape(source[path]) != jnp.shape(leaf):
        found = jnp.shape(source[path]) if path in source else 'nothing'
        raise ValueError(
            f"frozen weight {'/'.join(path)} {jnp.shape(leaf)}: the pretrained"
            f' parameters hold {found} there; pretrain the same architecture'
            ' (same model options except lora_rank).')
      frozen_flat[path] = jnp.asarray(source[path], jnp.result_type(leaf))
    out[FROZEN] = flax.traverse_util.unflatten_dict(frozen_flat)
  params = flax.traverse_util.flatten_dict(variables['params'])
  for path, leaf in params.items():
    if path in source and jnp.shape(source[path]) == jnp.shape(leaf):
      params[path] = jnp.asarray(source[path], jnp.result_type(leaf))
  out['params'] = flax.traverse_util.unflatten_dict(params)
  return out
