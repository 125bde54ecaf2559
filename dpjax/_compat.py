"""The jax APIs that moved within dpjax's supported range (README).

One place decides which spelling the installed jax gets, so the rest of dpjax
is written against the newest jax and still runs on the oldest supported one
(the lower bounds in pyproject.toml, tested by .ci/run).
"""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any


def pcast_varying(tree: PyTree, axis_name: str) -> PyTree:
  """Casts every leaf of ``tree`` to device-varying along ``axis_name``.

  Inside ``jax.shard_map`` this keeps the transpose of a replicated input
  from summing gradients across devices (see dpjax.distributed).
  ``jax.lax.pcast(x, axis, to='varying')`` replaced ``jax.lax.pvary(x, axis)``
  after jax 0.8.0; both are the same cast.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('d',), devices=jax.devices()[:1])
    >>> f = jax.shard_map(lambda x: pcast_varying(x, 'd'), mesh=mesh,
    ...                   in_specs=P(), out_specs=P('d'))
    >>> f(jnp.ones(2)).tolist()
    [1.0, 1.0]
  """
  if hasattr(jax.lax, 'pcast'):
    cast = lambda x: jax.lax.pcast(x, axis_name, to='varying')
  else:
    cast = lambda x: jax.lax.pvary(x, axis_name)
  return jax.tree.map(cast, tree)
