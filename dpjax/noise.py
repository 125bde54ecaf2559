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


def noise_like_scaled(key: jax.Array, tree: PyTree, scale: PyTree,
                      noise_multiplier: float) -> PyTree:
  """N(0, (noise_multiplier * s)^2) noise shaped like ``tree``.

  ``scale`` is a scalar or a pytree prefix of ``tree`` with one std per group
  (see :meth:`dpjax.PerExampleClipping.noise_scale`).
  """
  scale_leaves = jax.tree.leaves(scale)
  keys = iter(jax.random.split(key, len(scale_leaves)))
  return jax.tree.map(
      lambda s, sub: gaussian_noise_like(next(keys), sub, noise_multiplier * s),
      scale, tree)


def add_gaussian_noise_from_state(
    noise_multiplier: float,
    clipping,
    expected_batch_size: float,
    key: jax.Array | int,
    relation=None,
) -> optax.GradientTransformationExtraArgs:
  """Gaussian noise scaled to the thresholds the clipped sum was built with.

  Like :func:`add_gaussian_noise`, for clipping whose thresholds live in its
  state (per-layer, adaptive) or whose noise is per group: ``update(grad_sum,
  state, params=None, *, clip_state)`` adds noise of std ``noise_multiplier *
  clipping.noise_scale(clip_state, relation)`` and divides by the public
  ``expected_batch_size``. Pass the ``clip_state`` the sum was clipped with
  (``ClippedGrad.clip_state``, before ``clipping.end_step``); ``optax.chain``
  forwards it.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dpjax
    >>> clip = dpjax.clip_per_layer({'a': 3.0, 'b': 4.0})
    >>> grads = {'a': jnp.zeros(2), 'b': jnp.zeros(2)}
    >>> noise = dpjax.add_gaussian_noise_from_state(0.0, clip, 1.0, key=0)
    >>> out, _ = noise.update(grads, noise.init(None),
    ...                       clip_state=clip.init(grads))
    >>> out['a'].tolist()
    [0.0, 0.0]

  Args:
    noise_multiplier: sigma >= 0, relative to ``clipping.noise_scale``.
    clipping: the :class:`dpjax.PerExampleClipping` that made the sum.
    expected_batch_size: the public divisor.
    key: PRNG key (or integer seed) of the first draw.
    relation: the neighbouring relation of the accountant (default
      add/remove).

  Returns:
    An optax ``GradientTransformationExtraArgs`` with
    :class:`GaussianNoiseState`.

  References:
    Abadi et al., 2016. Deep Learning with Differential Privacy.
    https://arxiv.org/abs/1607.00133
  """
  noise_multiplier = _validation.non_negative(
      'noise_multiplier', noise_multiplier,
      ' Use 0 only for a non-private baseline.')
  expected_batch_size = _validation.positive(
      'expected_batch_size', expected_batch_size,
      ' It is a public constant, not the realized batch size.')
  kwargs = {} if relation is None else {'relation': relation}
  first_key = as_key(key)

  def init_fn(params):
    del params
    return GaussianNoiseState(key=first_key)

  def update_fn(updates, state, params=None, *, clip_state=None,
                **extra_args):
    del params, extra_args
    if clip_state is None:
      raise ValueError(
          f'this noise is scaled to the thresholds in the {clipping.name!r}'
          ' clipping state: pass clip_state=ClippedGrad.clip_state to'
          ' update (optax.chain forwards it).')
    next_key, draw_key = jax.random.split(state.key)
    scale = clipping.noise_scale(clip_state, **kwargs)
    noise = noise_like_scaled(draw_key, updates, scale, noise_multiplier)
    noisy = jax.tree.map(
        lambda g, n: (g + n) / jnp.asarray(expected_batch_size, g.dtype),
        updates, noise)
    return noisy, GaussianNoiseState(key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class PrivateAggregateState(NamedTuple):
  """State of :func:`private_aggregate`: the clipping's and the noise key."""

  clip_state: Any
  noise: GaussianNoiseState


def private_aggregate(
    clipping,
    noise_multiplier: float,
    expected_batch_size: float,
    key: jax.Array | int,
    relation=None,
) -> optax.GradientTransformationExtraArgs:
  """Clip, noise and divide in one optax transform: one call, one DP step.

  ``update(per_example_grads, state, params=None, *, mask=None)`` clips with
  ``clipping`` (any mode, stateful or not), adds noise scaled to the
  thresholds used, divides by the public ``expected_batch_size`` and then
  advances the clipping's state once (``clipping.end_step``). Compose it with
  any optimizer: ``optax.chain(private_aggregate(...), optax.sgd(lr))``.
  (For models too large for all per-example gradients at once, use
  :func:`dpjax.clipped_grad` with :func:`add_gaussian_noise_from_state`.)

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dpjax
    >>> agg = dpjax.private_aggregate(dpjax.clip_per_example(1.0), 0.0, 2.0, 0)
    >>> tx = optax.chain(agg, optax.sgd(1.0))
    >>> grads = {'w': jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> updates, _ = tx.update(grads, tx.init({'w': jnp.zeros(2)}))
    >>> [round(float(v), 4) for v in updates['w']]
    [-0.45, -0.6]

  Args:
    clipping: a :class:`dpjax.PerExampleClipping`.
    noise_multiplier: sigma >= 0 (relative to ``clipping.noise_scale``).
    expected_batch_size: the public divisor.
    key: PRNG key (or integer seed) of the first noise draw.
    relation: the accountant's neighbouring relation (default add/remove).

  Returns:
    An optax ``GradientTransformationExtraArgs`` with
    :class:`PrivateAggregateState`.

  References:
    Abadi et al., 2016. Deep Learning with Differential Privacy.
    https://arxiv.org/abs/1607.00133
  """
  noise = add_gaussian_noise_from_state(
      noise_multiplier, clipping, expected_batch_size, key, relation)

  def init_fn(params):
    return PrivateAggregateState(clipping.init(params), noise.init(params))

  def update_fn(updates, state, params=None, *, mask=None, **extra_args):
    del extra_args
    out, clip_state = clipping.clip(updates, state.clip_state, mask)
    noisy, noise_state = noise.update(out.grad_sum, state.noise, params,
                                      clip_state=clip_state)
    return noisy, PrivateAggregateState(clipping.end_step(clip_state),
                                        noise_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
