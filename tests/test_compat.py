"""Tests for dpjax/_compat.py on the installed jax."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from dpjax import _compat


def _replicated_out(fn):
  mesh = jax.make_mesh((1,), ('d',), devices=jax.devices()[:1])
  return jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P())


def test_pcast_varying_makes_every_leaf_device_varying():
  tree = {'w': jnp.arange(3.0), 'b': jnp.ones(())}
  out = _replicated_out(lambda t: t)(tree)  # replicated in, replicated out
  assert out['w'].tolist() == [0.0, 1.0, 2.0]
  for leaf in tree:
    # A device-varying value cannot leave shard_map as replicated.
    with pytest.raises(ValueError, match='could not infer replication'):
      _replicated_out(lambda t, k=leaf: _compat.pcast_varying(t, 'd')[k])(tree)
