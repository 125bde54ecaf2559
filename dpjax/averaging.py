"""Parameter averaging (EMA and Polyak) as optax transforms.

Averaging the iterates of DP-SGD: an exponential moving average (De et al.
2022, "Unlocking High-Accuracy Differentially Private Image Classification
through Scale", EMA 0.999) and the Polyak-Ruppert running mean (Polyak and
Juditsky 1992). Each is an optax transform placed LAST in the chain: it passes
the updates through unchanged and keeps, in its state, the average of the
parameters the step produces (``params + updates``), so that checkpoints carry
the averages with the optimizer state.

Privacy: averaging only reads parameters that DP-SGD already released, so it
is post-processing and costs no privacy; it never sees gradients or data.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpjax import _validation

PyTree = Any


class EmaParamsState(NamedTuple):
  """Exponential moving average of the parameters (float32)."""

  count: jax.Array
  ema: PyTree


class PolyakParamsState(NamedTuple):
  """Running mean of the parameters since ``start_step`` (float32)."""

  count: jax.Array
  polyak: PyTree


def _as_float32(tree: PyTree) -> PyTree:
  # A copy: averages sharing the parameters' buffers could not be donated.
  return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), tree)


def _new_params(params: PyTree, updates: PyTree) -> PyTree:
  if params is None:
    raise ValueError(
        'parameter averaging needs the parameters: call update(updates, state,'
        ' params) (flax TrainState.apply_gradients does).')
  return _as_float32(optax.apply_updates(params, updates))


def ema_params(decay: float, *, warmup: bool = True
               ) -> optax.GradientTransformation:
  """Keeps an exponential moving average of the parameters in its state.

  After the t-th update (t = 1, 2, ...) the average is
  ``ema = d_t * ema + (1 - d_t) * params_t`` with ``d_t = decay``, or, with
  ``warmup``, ``d_t = min(decay, (1 + t) / (10 + t))`` so early iterates, far
  from the optimum, fade quickly. Updates pass through unchanged: put this
  transform last in ``optax.chain``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from dpjax import averaging
    >>> tx = optax.chain(optax.sgd(1.0),
    ...                  averaging.ema_params(0.5, warmup=False))
    >>> params = {'w': jnp.array(0.0)}
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update({'w': jnp.array(-1.0)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> float(params['w']), float(averaging.averaged_params(state)['ema']['w'])
    (2.0, 1.25)

  Args:
    decay: the EMA coefficient in [0, 1); 0.999 in De et al. 2022.
    warmup: cap the coefficient at (1 + t) / (10 + t) at update t.

  Returns:
    An optax ``GradientTransformation`` with :class:`EmaParamsState`.

  References:
    De et al., 2022. Unlocking High-Accuracy Differentially Private Image
    Classification through Scale. https://arxiv.org/abs/2204.13650
  """
  decay = _validation.as_real('ema decay', decay)
  if not 0 <= decay < 1:
    raise ValueError(
        f'ema decay must lie in [0, 1), got {decay!r}. Typical: 0.999.')

  def init_fn(params):
    return EmaParamsState(jnp.zeros((), jnp.int32), _as_float32(params))

  def update_fn(updates, state, params=None):
    new = _new_params(params, updates)
    count = state.count + 1
    d = jnp.asarray(decay, jnp.float32)
    if warmup:
      t = count.astype(jnp.float32)
      d = jnp.minimum(d, (1 + t) / (10 + t))
    ema = jax.tree.map(lambda a, p: d * a + (1 - d) * p, state.ema, new)
    return updates, EmaParamsState(count, ema)

  return optax.GradientTransformation(init_fn, update_fn)


def polyak_params(start_step: int = 0) -> optax.GradientTransformation:
  """Keeps the running mean of the parameters from update ``start_step`` on.

  The average weighs equally every iterate produced by updates number
  ``start_step + 1, start_step + 2, ...`` (before that it is the current
  iterate). Updates pass through unchanged: put this transform last in
  ``optax.chain``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from dpjax import averaging
    >>> tx = optax.chain(optax.sgd(1.0), averaging.polyak_params())
    >>> params = {'w': jnp.array(0.0)}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update({'w': jnp.array(-1.0)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> float(averaging.averaged_params(state)['polyak']['w'])  # (1+2+3)/3
    2.0

  Args:
    start_step: number of updates to skip before averaging starts.

  Returns:
    An optax ``GradientTransformation`` with :class:`PolyakParamsState`.

  References:
    Polyak and Juditsky, 1992. Acceleration of Stochastic Approximation by
    Averaging. https://doi.org/10.1137/0330046
  """
  if isinstance(start_step, bool) or not isinstance(start_step, int) or (
      start_step < 0):
    raise ValueError(
        f'polyak start_step must be an integer >= 0, got {start_step!r}.')

  def init_fn(params):
    return PolyakParamsState(jnp.zeros((), jnp.int32), _as_float32(params))

  def update_fn(updates, state, params=None):
    new = _new_params(params, updates)
    count = state.count + 1
    weight = 1.0 / jnp.maximum(count - start_step, 1).astype(jnp.float32)
    polyak = jax.tree.map(lambda a, p: a + weight * (p - a), state.polyak, new)
    return updates, PolyakParamsState(count, polyak)

  return optax.GradientTransformation(init_fn, update_fn)


def averaged_params(opt_state: PyTree) -> dict[str, PyTree]:
  """The averages kept anywhere in an optax state, by name.

  Returns:
    ``{'ema': params, 'polyak': params}`` restricted to the averaging
    transforms present in ``opt_state`` (empty when there are none).
  """
  found = {}

  def visit(node):
    if isinstance(node, EmaParamsState):
      found['ema'] = node.ema
    elif isinstance(node, PolyakParamsState):
      found['polyak'] = node.polyak
    return node

  is_avg = lambda x: isinstance(x, (EmaParamsState, PolyakParamsState))
  jax.tree.map(visit, opt_state, is_leaf=is_avg)
  return found
