"""A small Vision Transformer and a decoder-only transformer, for DP-SGD.

:class:`ViT` follows Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words:
Transformers for Image Recognition at Scale"): non-overlapping patches
embedded by a strided ``nn.Conv``, learned position embeddings, pre-LN
encoder blocks and a mean-pooled head (no class token, as in their
global-average-pooling variant). :class:`DecoderTransformer` is a GPT-style
causal language model (Vaswani et al. 2017, "Attention Is All You Need";
the pre-LN block order and final LayerNorm of Radford et al. 2019, GPT-2),
with an untied output layer by default.

Every parameter is the kernel, bias, scale or embedding of an ``nn.Dense``,
``nn.DenseGeneral`` (the projections of ``nn.MultiHeadDotProductAttention``),
``nn.Conv``, ``nn.Embed`` or ``nn.LayerNorm``, each used once: no bare
``self.param``, so every layer is one the per-example fast routes
(:mod:`dpjax.ghost`) can own. Position embeddings are therefore written as
``nn.Embed(num_positions, d)(arange(T))``.

``scale_norm`` adds a LayerNorm after each residual addition (the ScaleNorm
of Klause et al. 2022, as in :mod:`dpjax.resnets`). ``dropout_rate`` drops
activations and attention weights when called with ``deterministic=False``
and a ``'dropout'`` rng; DP training gives each example its own key
(:mod:`dpjax.training.features`). ``lora_rank > 0`` freezes every layer but
the head and adds LoRA adapters to every dense layer and attention
projection (:mod:`dpjax.lora`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax import lora

Activation = Callable[[jax.Array], jax.Array]

# GPT-2's initialization of token and position embeddings.
_EMBED_INIT = nn.initializers.normal(0.02)
POOLS = ('none', 'last', 'mean')


class Block(nn.Module):
  """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  scale_norm: bool = False
  activation: Activation = nn.gelu
  lora_rank: int = 0
  lora_alpha: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    layers = lora.Layers(self.lora_rank, self.lora_alpha)
    norm = layers.module(nn.LayerNorm)

    def drop(y):
      return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)

    y = layers.self_attention(norm(name='ln1')(x), self.num_heads,
                              self.dropout_rate, 'attn', mask=mask,
                              deterministic=deterministic)
    x = x + drop(y)
    if self.scale_norm:
      x = norm(name='scale_norm1')(x)
    y = self.activation(layers.dense(norm(name='ln2')(x), self.mlp_dim,
                                     'mlp_in'))
    x = x + drop(layers.dense(y, x.shape[-1], 'mlp_out'))
    if self.scale_norm:
      x = norm(name='scale_norm2')(x)
    return x


class _Encoder(nn.Module):
  """``depth`` blocks and the final LayerNorm."""

  depth: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float
  scale_norm: bool
  activation: Activation
  lora_rank: int
  lora_alpha: float

  @nn.compact
  def __call__(self, x, mask, deterministic):
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, self.dropout_rate,
                self.scale_norm, self.activation, self.lora_rank,
                self.lora_alpha, name=f'block{i}')(x, mask, deterministic)
    layers = lora.Layers(self.lora_rank, self.lora_alpha)
    return layers.module(nn.LayerNorm)(name='ln_f')(x)


class ViT(nn.Module):
  """Patch embedding, position embedding, pre-LN blocks, mean-pool, head.

  Images [..., H, W, C] with H and W multiples of ``patch_size``.
  """

  num_classes: int = 10
  patch_size: int = 4
  dim: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout_rate: float = 0.0
  scale_norm: bool = False
  activation: Activation = nn.gelu
  lora_rank: int = 0
  lora_alpha: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    height, width = x.shape[-3:-1]
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f'patch_size={p} does not divide the {height}x{width}'
                       ' images; choose a divisor.')
    layers = lora.Layers(self.lora_rank, self.lora_alpha)
    x = layers.module(nn.Conv)(self.dim, (p, p), strides=p, padding='VALID',
                               name='patch_embed')(x)
    x = x.reshape(x.shape[:-3] + (-1, self.dim))
    num_patches = x.shape[-2]
    x = x + layers.module(nn.Embed)(num_patches, self.dim,
                                    embedding_init=_EMBED_INIT,
                                    name='pos_embed')(jnp.arange(num_patches))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = _Encoder(self.depth, self.num_heads, self.mlp_dim, self.dropout_rate,
                 self.scale_norm, self.activation, self.lora_rank,
                 self.lora_alpha, name='encoder')(x, None, deterministic)
    return nn.Dense(self.num_classes, name='head')(x.mean(-2))


class DecoderTransformer(nn.Module):
  """Token and position embeddings, causal pre-LN blocks, LayerNorm, output.

  Tokens [..., T] (T <= ``max_length``). ``pool``: 'none' returns logits at
  every position ([..., T, num_classes], a language model: position t
  predicts token t + 1); 'last' those of the last position (which sees the
  whole sequence; sequence classification); 'mean' the mean over positions.

  ``tied_embedding=True`` computes the output with the token embedding's
  transpose (``embed.attend``, as GPT-2 does) instead of an untied
  ``nn.Dense``; the embedding is then used twice, so it takes the
  per-example (vmap) route for its gradient norm.
  """

  num_classes: int
  vocab_size: int
  max_length: int = 64
  dim: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  pool: str = 'last'
  dropout_rate: float = 0.0
  scale_norm: bool = False
  tied_embedding: bool = False
  activation: Activation = nn.gelu
  lora_rank: int = 0
  lora_alpha: float = 1.0

  @nn.compact
  def __call__(self, tokens: jax.Array,
               deterministic: bool = True) -> jax.Array:
    length = tokens.shape[-1]
    if length > self.max_length:
      raise ValueError(f'sequences of {length} tokens exceed max_length='
                       f'{self.max_length}; raise model.max_length.')
    layers = lora.Layers(self.lora_rank, self.lora_alpha)
    embed = layers.module(nn.Embed)(self.vocab_size, self.dim,
                                    embedding_init=_EMBED_INIT,
                                    name='tok_embed')
    x = embed(tokens) + layers.module(nn.Embed)(
        self.max_length, self.dim, embedding_init=_EMBED_INIT,
        name='pos_embed')(jnp.arange(length))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = _Encoder(self.depth, self.num_heads, self.mlp_dim, self.dropout_rate,
                 self.scale_norm, self.activation, self.lora_rank,
                 self.lora_alpha, name='decoder')(
                     x, nn.make_causal_mask(tokens), deterministic)
    if self.pool == 'last':
      x = x[..., -1, :]
    elif self.pool == 'mean':
      x = x.mean(-2)
    if self.tied_embedding:
      return embed.attend(x)
    return nn.Dense(self.num_classes, name='head')(x)


# name -> (class, default options); config.model options override them.
MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    'vit_tiny': (ViT, dict(patch_size=4, dim=64, depth=2, num_heads=4,
                           mlp_dim=128)),
    'vit_small': (ViT, dict(patch_size=4, dim=192, depth=6, num_heads=3,
                            mlp_dim=384)),
    'transformer_tiny': (DecoderTransformer, dict(
        dim=64, depth=2, num_heads=4, mlp_dim=128, max_length=64)),
    'transformer_small': (DecoderTransformer, dict(
        dim=256, depth=4, num_heads=4, mlp_dim=1024, max_length=256)),
}

# The config.model fields that reach these models (None: the default).
OPTIONS: tuple[str, ...] = (
    'patch_size', 'dim', 'depth', 'num_heads', 'mlp_dim', 'max_length',
    'vocab_size', 'pool', 'dropout_rate', 'tied_embedding', 'lora_rank',
    'lora_alpha')


def build(name: str, num_classes: int, activation: Activation | None = None,
          scale_norm: bool = False, **options) -> nn.Module:
  """Model ``name`` of :data:`MODELS` with ``options`` (None: default)."""
  cls, defaults = MODELS[name]
  fields = set(cls.__dataclass_fields__) - {'parent', 'name'}
  options = {k: v for k, v in options.items() if v is not None}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f'model {name!r} has no options {unknown}; it takes'
                     f' {sorted(fields & set(OPTIONS))}.')
  options = {**defaults, **options, 'num_classes': num_classes,
             'scale_norm': scale_norm}
  if activation is not None:
    options['activation'] = activation
  if cls is DecoderTransformer:
    _check_decoder(name, options)
  lora.Layers(options.get('lora_rank', 0), options.get('lora_alpha', 1.0))
  return cls(**options)


def _check_decoder(name: str, options: dict[str, Any]) -> None:
  if options.get('vocab_size') is None:
    raise ValueError(f'model {name!r} needs model.vocab_size (the number of'
                     ' token ids of the data).')
  if options.get('pool', 'last') not in POOLS:
    raise ValueError(f"model.pool must be one of {POOLS}, got"
                     f" {options['pool']!r}.")
  if options.get('tied_embedding'):
    if options['num_classes'] != options['vocab_size']:
      raise ValueError(
          f"model.tied_embedding outputs vocab_size={options['vocab_size']}"
          f" logits but the data has {options['num_classes']} classes; untie"
          ' it (tied_embedding=False).')
    if options.get('lora_rank'):
      raise ValueError('model.tied_embedding with lora_rank > 0 would freeze'
                       ' the output layer; set tied_embedding=False.')
