"""Per-example PRNG keys (dropout) that follow the example, not its row.

A loss with randomness (dropout, stochastic depth, noise layers) needs a key
per example. Splitting the step key into B keys by ROW would make an
example's mask depend on where it landed in the padded batch, in which
microbatch, on which device: a run would change with a performance flag. Here
each example's key is ``fold_in(step_key, index)`` with ``index`` its
position in the DATASET, the rule :mod:`dpjax.augmult` uses for views, so the
key is the same whatever the batch's padding, microbatching or sharding.

The step key comes from the run's key schedule (:mod:`dpjax.keys`): stream
:data:`dpjax.keys.DROPOUT` at the logical step (``keys.for_step``), passed to
the engine in :class:`dpjax.StepInputs` (``dropout_key``). It is a secret
stream of its own, so no dropout mask shares bits with the noise or the
sampler (privacy invariant 6). The dataset index travels with the example:
:func:`with_indices` pairs the data with ``arange(N)`` before the sampler's
``take``, so a sampled batch carries the indices of its rows.

The wrapper works on every engine that calls ``loss_fn(params, example,
*args)`` per example (:func:`dpjax.clipped_grad` by vmap,
:func:`dpjax.ghost.clipped_grad`): it changes the loss, not the engine.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from dpjax import per_example

PyTree = Any
LossFn = Callable[..., Any]


class Indexed(NamedTuple):
  """Examples with their dataset indices (a pytree with a leading axis).

  Attributes:
    examples: the user's examples (any pytree of arrays).
    index: [N] int32, each row's position in the dataset.
  """

  examples: PyTree
  index: Any


def with_indices(data: PyTree) -> Indexed:
  """``data`` (arrays with a leading example axis) paired with ``arange(N)``.

  Sample it like the data itself: ``sampler.sample(t).take(with_indices(
  data))`` is a :class:`dpjax.Batch` whose rows carry their indices.
  """
  n = per_example.batch_size_of(data)
  return Indexed(data, np.arange(n, dtype=np.int32))


def example_key(step_key: jax.Array, index: jax.Array) -> jax.Array:
  """The key of the example with dataset index ``index`` at this step."""
  return jax.random.fold_in(step_key, index)


def with_example_keys(loss_fn: LossFn, field: str = 'dropout_key') -> LossFn:
  """Gives ``loss_fn`` its own key per example, folded from its dataset index.

  Returns ``fn(params, example, inputs, *args) = loss_fn(params,
  example.examples, fold_in(inputs.<field>, example.index), *args)`` for an
  :class:`Indexed` example and a :class:`dpjax.StepInputs` ``inputs``, so
  two examples get different keys and an example gets the same key in any
  row, microbatch or device.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import dpjax
    >>> from dpjax import example_keys, keys
    >>> def loss(w, ex, key):                 # ONE example and its own key
    ...   mask = jax.random.bernoulli(key, 0.5, w.shape)
    ...   return jnp.sum(w * mask * ex)
    >>> fn = dpjax.clipped_grad(example_keys.with_example_keys(loss),
    ...                         dpjax.clip_per_example(10.0))
    >>> data = example_keys.with_indices(jnp.ones((6, 4)))
    >>> schedule = dpjax.KeySchedule(seed=0, secret_seed=1)
    >>> inputs = dpjax.StepInputs(dropout_key=schedule.key(keys.DROPOUT, 0))
    >>> out = fn(jnp.ones(4), data, None, args=(inputs,))
    >>> len(set(out.stats.losses.tolist())) > 1   # different masks per example
    True

  Args:
    loss_fn: ``loss_fn(params, example, key, *args)`` for ONE example (wrap
      a batch loss with :func:`dpjax.batch_loss.batch_of_one` first).
    field: the :class:`dpjax.StepInputs` field holding the step's key:
      ``'dropout_key'`` (stream ``keys.DROPOUT``) or ``'aug_key'``.

  Returns:
    The per-example loss ``fn(params, example, inputs, *args)``.
  """
  if field not in per_example.StepInputs._fields:
    raise ValueError(
        f'field={field!r} is not a field of dpjax.StepInputs; use one of'
        f' {per_example.StepInputs._fields}.')

  def fn(params, example, inputs, *args):
    if not isinstance(example, Indexed):
      raise TypeError(
          'per-example keys need each example\'s dataset index: sample from'
          ' dpjax.example_keys.with_indices(data), got examples of type'
          f' {type(example).__name__}.')
    step_key = getattr(inputs, field, None)
    if step_key is None:
      raise ValueError(
          f'the step passed no {field}: call the engine with'
          f' args=(dpjax.StepInputs({field}=keys.for_step(root, step)),).')
    key = example_key(step_key, example.index)
    return loss_fn(params, example.examples, key, *args)

  return fn
