"""The Gaussian mechanism on a clipped sum, as an optax transform.

Implements the noise step of DP-SGD (Abadi et al. 2016). It owns two privacy
invariants (DESIGN.md, 2 and 3):

* noise with std ``noise_multiplier * l2_sensitivity`` is added to the SUM of
  clipped gradients, exactly once per call, and a call is one logical step: the
  engine sums every microbatch, accumulation step and device first;
* the noisy sum is divided by a PUBLIC constant, the expected batch size
  (q * N under Poisson sampling), never by the realized batch size, which is
  data-dependent and would leak through the update.

Draw t uses the key ``keys.for_step(key, t)`` of the transform's stream root
(:mod:`dpjax.keys`), so the draws of a run are enumerable and a resumed run
draws the same noise. With ``secure=True`` each coordinate is the sum of four
independent Gaussian draws divided by two (Holohan & Braghin 2021; what
Opacus' ``secure_mode`` does): the same distribution, without the gaps in
the floating-point representation of one sampled Gaussian that Jin et al.
(2022) exploit to tell which of two neighbouring sums was noised.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpjax import _validation
from dpjax import keys as keys_lib

PyTree = Any
SECURE_DRAWS = 4  # summed, then divided by sqrt(SECURE_DRAWS) = 2


class GaussianNoiseState(NamedTuple):
  """The stream root of the noise and the number of draws made so far.

  Draw t uses ``keys.for_step(key, count)``; ``key`` never changes.
  """

  key: jax.Array
  count: jax.Array


def as_key(key: jax.Array | int) -> jax.Array:
  """A PRNG key from a key or an integer seed chosen by the caller."""
  if isinstance(key, int):
    return jax.random.key(key)
  return key


def standard_normal(key: jax.Array, shape, secure: bool = False) -> jax.Array:
  """N(0, 1) in float32; ``secure``: (z1 + z2 + z3 + z4) / 2 (Holohan 2021)."""
  if not secure:
    return jax.random.normal(key, shape, jnp.float32)
  draws = jax.random.normal(key, (SECURE_DRAWS,) + tuple(shape), jnp.float32)
  return jnp.sum(draws, axis=0) / jnp.sqrt(jnp.float32(SECURE_DRAWS))


def gaussian_noise_like(key: jax.Array, tree: PyTree, std: float,
                        secure: bool = False) -> PyTree:
  """Independent N(0, std^2) noise shaped like ``tree`` (drawn in float32)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noise = [
      (std * standard_normal(k, x.shape, secure)).astype(x.dtype)
      for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, noise)


def _noisy_mean(updates: PyTree, noise: PyTree,
                expected_batch_size: float) -> PyTree:
  return jax.tree.map(
      lambda g, n: (g + n) / jnp.asarray(expected_batch_size, g.dtype),
      updates, noise)


def add_gaussian_noise(
    noise_multiplier: float,
    l2_sensitivity: float,
    expected_batch_size: float,
    key: jax.Array | int,
    secure: bool = False,
) -> optax.GradientTransformation:
  """Adds Gaussian noise to a clipped gradient SUM and divides by a public size.

  ``update(grad_sum, state)`` returns
  ``(grad_sum + N(0, (noise_multiplier * l2_sensitivity)^2 I)) /
  expected_batch_size``. Call t draws with ``keys.for_step(key, t)``, so one
  call is one draw: call it once per logical step.

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
    key: the noise stream's root key (``KeySchedule.root(keys.NOISE)``), or
      an integer seed of the caller's. Keep it secret: with it, the noise can
      be subtracted from the released update.
    secure: draw each coordinate as a sum of four Gaussians (Holohan &
      Braghin 2021), against floating-point attacks (Jin et al. 2022).

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
  root = as_key(key)

  def init_fn(params):
    del params
    return GaussianNoiseState(*keys_lib.init_stream(root))

  def update_fn(updates, state, params=None):
    del params
    draw_key = keys_lib.for_step(state.key, state.count)
    noise = gaussian_noise_like(draw_key, updates, std, secure)
    return (_noisy_mean(updates, noise, expected_batch_size),
            state._replace(count=state.count + 1))

  return optax.GradientTransformation(init_fn, update_fn)


def noise_like_scaled(key: jax.Array, tree: PyTree, scale: PyTree,
                      noise_multiplier: float, secure: bool = False) -> PyTree:
  """N(0, (noise_multiplier * s)^2) noise shaped like ``tree``.

  ``scale`` is a scalar or a pytree prefix of ``tree`` with one std per group
  (see :meth:`dpjax.PerExampleClipping.noise_scale`).
  """
  scale_leaves = jax.tree.leaves(scale)
  keys = iter(jax.random.split(key, len(scale_leaves)))
  return jax.tree.map(
      lambda s, sub: gaussian_noise_like(next(keys), sub, noise_multiplier * s,
                                         secure),
      scale, tree)


def add_gaussian_noise_from_state(
    noise_multiplier: float,
    clipping,
    expected_batch_size: float,
    key: jax.Array | int,
    relation=None,
    secure: bool = False,
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
    key: the noise stream's root key (or an integer seed); keep it secret.
    relation: the neighbouring relation of the accountant (default
      add/remove).
    secure: sum-of-four-Gaussians draws (see :func:`add_gaussian_noise`).

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
  root = as_key(key)

  def init_fn(params):
    del params
    return GaussianNoiseState(*keys_lib.init_stream(root))

  def update_fn(updates, state, params=None, *, clip_state=None,
                **extra_args):
    del params, extra_args
    if clip_state is None:
      raise ValueError(
          f'this noise is scaled to the thresholds in the {clipping.name!r}'
          ' clipping state: pass clip_state=ClippedGrad.clip_state to'
          ' update (optax.chain forwards it).')
    draw_key = keys_lib.for_step(state.key, state.count)
    scale = clipping.noise_scale(clip_state, **kwargs)
    noise = noise_like_scaled(draw_key, updates, scale, noise_multiplier,
                              secure)
    return (_noisy_mean(updates, noise, expected_batch_size),
            state._replace(count=state.count + 1))

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
    secure: bool = False,
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
    key: the noise stream's root key (or an integer seed); keep it secret.
    relation: the accountant's neighbouring relation (default add/remove).
    secure: sum-of-four-Gaussians draws (see :func:`add_gaussian_noise`).

  Returns:
    An optax ``GradientTransformationExtraArgs`` with
    :class:`PrivateAggregateState`.

  References:
    Abadi et al., 2016. Deep Learning with Differential Privacy.
    https://arxiv.org/abs/1607.00133
  """
  noise = add_gaussian_noise_from_state(
      noise_multiplier, clipping, expected_batch_size, key, relation, secure)

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


def divide_by_count() -> optax.GradientTransformationExtraArgs:
  """The non-private baseline's aggregate: the gradient sum over ``count``.

  ``update(grad_sum, state, params=None, *, count)`` divides by the REALIZED
  number of real rows, which only a non-private run may do (a private one
  divides by the public expected batch size, :func:`add_gaussian_noise`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dpjax import noise
    >>> tx = noise.divide_by_count()
    >>> out, _ = tx.update({'w': jnp.array([2.0, 4.0])}, tx.init(None), count=4)
    >>> out['w'].tolist()
    [0.5, 1.0]
  """

  def update_fn(updates, state, params=None, *, count, **extra_args):
    del params, extra_args
    count = jnp.maximum(count, 1)
    return jax.tree.map(lambda g: g / count.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state,
                                               update_fn)
