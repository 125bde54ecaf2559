"""A batch loss as a per-example loss: the loss of a batch of one.

dpjax's engines differentiate a loss of ONE example and vectorize it with
``jax.vmap`` (:mod:`dpjax.per_example`). Training code already has the loss of
a BATCH, ``loss(params, batch) -> scalar`` (a mean or a sum over the rows) or
a ``[batch]`` vector. :func:`batch_of_one` turns it into the per-example loss
by calling it on a batch of one row, the example with a leading axis of size
1, as jax_privacy's ``keep_batch_dim=True`` does, so nobody rewrites the
model call as ``model.apply(p, x[None])[0]``.

Mean or sum: for a batch of one, the mean and the sum of the rows' losses are
the same number, so a mean-reducing and a sum-reducing batch loss give the
same per-example gradient. How the clipped sum is scaled is decided
elsewhere, once: the noise transform divides it by the public expected batch
size (privacy invariant 3), never by the realized batch size, whatever the
loss divides by. What does change the meaning is a loss whose rows are not
independent (batch statistics, a normalization by a count over the batch):
a batch of one then computes something else than the batch did. BatchNorm in
training mode belongs to :mod:`dpjax.normalization`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

LossFn = Callable[..., Any]


def _one_example_value(value: Any) -> jax.Array:
  """The scalar loss of a batch of one: a scalar or a [1] vector."""
  value = jnp.asarray(value)
  if value.shape not in ((), (1,)):
    raise ValueError(
        f'the batch loss returned shape {value.shape} for a batch of one'
        ' example; return a scalar (the mean or the sum over the batch) or a'
        ' [batch] vector of per-example losses.')
  return jnp.reshape(value, ())


def batch_of_one(batch_loss: LossFn, has_aux: bool = False) -> LossFn:
  """The per-example loss of ``batch_loss``: its value on a batch of one row.

  Returns ``fn(params, example, *args) = batch_loss(params, example[None],
  *args)``, where ``example[None]`` gives every leaf of the example a
  leading axis of size 1, reduced to a scalar. Feed it to any engine
  (:func:`dpjax.clipped_grad`, :func:`dpjax.ghost.clipped_grad`,
  ``plan.clipped_grad``); ``dpjax.clipped_grad(..., keep_batch_dim=True)``
  applies it for you.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dpjax.batch_loss import batch_of_one
    >>> def mean_loss(w, batch):                     # a loss of a BATCH
    ...   return jnp.mean((batch['x'] @ w - batch['y']) ** 2)
    >>> one = batch_of_one(mean_loss)                 # a loss of ONE example
    >>> float(one(jnp.ones(2), {'x': jnp.array([1.0, 2.0]), 'y': 1.0}))
    4.0

  Args:
    batch_loss: ``batch_loss(params, batch, *args)`` returning a scalar (the
      mean or sum over the batch's rows) or a ``[batch]`` vector, or
      ``(value, aux)`` with ``has_aux``. Its rows must not interact.
    has_aux: whether ``batch_loss`` returns ``(value, aux)``; ``aux`` is
      passed on as the loss returned it for the batch of one (leading axis
      1 kept).

  Returns:
    ``fn(params, example, *args) -> scalar`` (``(scalar, aux)`` with
    ``has_aux``) for ONE example without a batch axis.

  References:
    Abadi et al., 2016. Deep Learning with Differential Privacy.
    https://arxiv.org/abs/1607.00133 (the per-example gradients DP-SGD clips).
  """

  def fn(params, example, *args):
    batch = jax.tree.map(lambda x: jnp.asarray(x)[None], example)
    out = batch_loss(params, batch, *args)
    if has_aux:
      value, aux = out
      return _one_example_value(value), aux
    return _one_example_value(out)

  return fn
