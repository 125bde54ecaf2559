"""Data augmentation as pure JAX functions on ONE example image.

Each augmentation is ``augment(key, image) -> image`` on an image [H, W, C]
(no batch axis), so it runs inside a per-example loss under ``vmap`` and
``jit``, and augmentation multiplicity (De et al. 2022, "Unlocking
High-Accuracy Differentially Private Image Classification through Scale":
average the gradients of K augmentations of an example before clipping) maps
it over K keys.

They are registered by name in :data:`dpjax.augmult.AUGMENTATIONS`
(``config.augmult.augmentations``: 'crop', 'flip', 'crop_flip').

Privacy invariant: an augmentation depends on its own example and a key
only, never on other examples, so per-example clipping still bounds each
example's influence.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Augment = Callable[[jax.Array, jax.Array], jax.Array]


def random_crop(key: jax.Array, image: jax.Array, padding: int = 4) -> jax.Array:
  """Zero-pads by ``padding`` on each side, then crops back to [H, W].

  Examples:
    >>> image = jnp.arange(16.0).reshape(4, 4, 1)
    >>> out = random_crop(jax.random.key(0), image, padding=1)
    >>> out.shape
    (4, 4, 1)
    >>> bool(jnp.array_equal(random_crop(jax.random.key(0), image, 0), image))
    True
  """
  if padding < 0:
    raise ValueError(f'padding must be >= 0, got {padding}.')
  h, w = image.shape[0], image.shape[1]
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  dy, dx = jax.random.randint(key, (2,), 0, 2 * padding + 1)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, image.shape[2]))


def random_flip(key: jax.Array, image: jax.Array) -> jax.Array:
  """Mirrors the image left-right with probability 1/2.

  Examples:
    >>> image = jnp.arange(4.0).reshape(1, 4, 1)
    >>> flips = [random_flip(jax.random.key(i), image)[0, :, 0].tolist()
    ...          for i in range(20)]
    >>> sorted(set(map(tuple, flips)))
    [(0.0, 1.0, 2.0, 3.0), (3.0, 2.0, 1.0, 0.0)]
  """
  return jnp.where(jax.random.bernoulli(key), image[:, ::-1], image)


def crop_and_flip(key: jax.Array, image: jax.Array,
                  padding: int = 4) -> jax.Array:
  """:func:`random_crop` then :func:`random_flip`, with independent keys.

  The standard CIFAR augmentation (He et al. 2016; De et al. 2022).
  """
  crop_key, flip_key = jax.random.split(key)
  return random_flip(flip_key, random_crop(crop_key, image, padding))
