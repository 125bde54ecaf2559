"""The Gaussian mechanism on a clipped sum, as an optax transform.

Implements the noise step of DP-SGD (Abadi et al. 2016). It owns two privacy
invariants (DESIGN.md, 2 and 3):

* noise with std ``noise_multiplier * l2_sensitivity`` is added to the SUM of
  clipped gradients, exactly once per call, and a call is one logical step: the
  engine sums every microbatch, accumulation step and device first;
* the noisy sum is divided by a PUBLIC constant, the expected batch size
  (q * N under Poisson sampling), never by the realized batch size, which is
  data-dependent and would leak through the update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpjax import _validation

PyTree = Any


class GaussianNoiseState(NamedTuple):
  """The PRNG key of the next draw; split once per update."""

  key: jax.Array


def as_key(key: jax.Array | int) -> jax.Array:
  """A PRNG key from a key or an integer seed."""
  if isinstance(key, int):
    return jax.random.key(key)
  return key


def gaussian_noise_like(key: jax.Array, tree: PyTree, std: float) -> PyTree:
  """Independent N(0, std^2) noise shaped like ``tree`` (drawn in float32)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noise = [
      (std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
      for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, noise)


def add_gaussian_noise(
    noise_multiplier: float,
    l2_sensitivity: float,
    expected_batch_size: float,
    key: jax.Array | int,
) -> optax.GradientTransformation:
  """Adds Gaussian noise to a clipped gradient SUM and divides by a public size.

  ``update(grad_sum, state)`` returns
  ``(grad_sum + N(0, (noise_multiplier * l2_sensitivity)^2 I)) /
  expected_batch_size``. Each call draws fresh noise from a key split off the
  state's key, so one call is one draw: call it once per logical step.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dpjax
    >>> noise = dpjax.add_gaussian_noise(
    ...     noise_multiplier=0.0, l2_sensitivity=1.0, expected_batch_size=4.0,
    ...     key=0)
    >>> out, _ = noise.update({'w': jnp.array([2.0, 4.0])}, noise.init(None))
    >>> out['w'].tolist()
    [0.5, 1.0]

  Args:
    noise_multiplier: sigma >= 0; the noise std relative to the sensitivity.
    l2_sensitivity: sensitivity of the sum under the relation the accountant
      uses (e.g. ``clipping.sensitivity()``).
    expected_batch_size: the public divisor, q * N for Poisson sampling.
    key: PRNG key (or integer seed) of the first draw.

  Returns:
    An optax ``GradientTransformation`` with :class:`GaussianNoiseState`.

  References:
    Abadi et al., 2016. Deep Learning with Differential Privacy.
    https://arxiv.org/abs/1607.00133
  """
  noise_multiplier = _validation.non_negative(
      'noise_multiplier', noise_multiplier,
      ' Use 0 only for a non-private baseline.')
  l2_sensitivity = _validation.positive('l2_sensitivity', l2_sensitivity)
  expected_batch_size = _validation.positive(
      'expected_batch_size', expected_batch_size,
      ' It is the public constant q * N, not the realized batch size.')
  std = noise_multiplier * l2_sensitivity
  first_key = as_key(key)

  def init_fn(params):
    del params
    return GaussianNoiseState(key=first_key)

  def update_fn(updates, state, params=None):
    del params
    next_key, draw_key = jax.random.split(state.key)
    noise = gaussian_noise_like(draw_key, updates, std)
    noisy = jax.tree.map(
        lambda g, n: (g + n) / jnp.asarray(expected_batch_size, g.dtype),
        updates, noise)
    return noisy, GaussianNoiseState(key=next_key)

  return optax.GradientTransformation(init_fn, update_fn)
