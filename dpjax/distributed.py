"""Data-parallel DP-SGD over many devices and hosts with ``jax.shard_map``.

Data parallelism for DP-SGD (Abadi et al. 2016) as in jax_privacy's
data-parallel engine (De et al. 2022): every device computes the clipped
per-example gradients of its shard of the padded Poisson batch, the clipped
SUMS are added across devices (``psum``), and the noise is drawn once per
logical step from the one replicated noise key, so 1, 2 or 8 devices release
the same mechanism: the Gaussian mechanism on the sum over the whole batch.

Privacy invariant owned here (DESIGN.md, 2): however many devices, the noise
is added once, to the sum over all of them, with the sensitivity of one
example. Two traps this module closes:

* ``jax.shard_map``, not jit auto-sharding: with jax 0.10.2 auto-sharded
  ``vmap(grad)`` of convolutions returned wrong per-example kernel gradients
  for the second device's examples, with no error;
* inside ``shard_map`` replicated parameters are cast to device-varying
  (``jax.lax.pcast(..., to='varying')``, via dpjax._compat): otherwise the
  transpose of the replicated broadcast sums the gradients ACROSS devices
  before the per-example clipping, which then clips the wrong vectors.

Multi-host: every host builds the same (seed, step) batch (sampling is a pure
function of them) and places only its own devices' shards
(:func:`put_sharded`); see docs/SCALE.md.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpjax import _compat
from dpjax import clipping as clipping_lib
from dpjax import per_example
from dpjax import sampling

PyTree = Any
DATA_AXIS = 'data'


def make_mesh(num_devices: int = 0, *, devices=None,
              axis_name: str = DATA_AXIS) -> jax.sharding.Mesh:
  """A 1-D mesh of ``num_devices`` devices (0: all of them) on ``axis_name``.

  The axis is ``Auto``: ``jax.make_mesh`` defaults to Explicit axes in jax
  0.10.2, under which replicated arguments of a jitted step change type.

  Examples:
    >>> from dpjax import distributed
    >>> mesh = distributed.make_mesh(1)
    >>> dict(mesh.shape)
    {'data': 1}
  """
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(num_devices, bool) or not isinstance(num_devices, int) or (
      num_devices < 0):
    raise ValueError(
        f'num_devices must be an integer >= 0 (0: all), got {num_devices!r}.')
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(
        f'num_devices={n} but only {len(devices)} devices are visible'
        f' ({devices[0].platform}). On CPU, set'
        f' XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax is'
        ' imported; with several hosts, call jax.distributed.initialize()'
        ' first.')
  return jax.make_mesh((n,), (axis_name,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


def batch_multiple(num_devices: int, physical_batch_size: int | None,
                   pad_to_multiple_of: int) -> int:
  """The multiple padded batches must have so that no row is dropped.

  A padded batch is cut into physical batches of ``physical_batch_size`` rows
  (when set), and each of those into ``num_devices`` equal shards.
  """
  if physical_batch_size is not None:
    if physical_batch_size % num_devices:
      raise ValueError(
          f'perf.physical_batch_size={physical_batch_size} does not split into'
          f' {num_devices} equal device shards; use a multiple of'
          f' {num_devices}.')
    return physical_batch_size
  return math.lcm(pad_to_multiple_of, num_devices)


def _check_divisible(size: int, mesh, axis_name: str,
                     rows_multiple: int = 1) -> None:
  n = mesh.shape[axis_name]
  if size % (n * rows_multiple):
    unit = n * rows_multiple
    raise ValueError(
        f'a batch of {size} rows does not split into {n} equal device shards'
        + (f' of whole groups of {rows_multiple}' if rows_multiple > 1 else '')
        + f'; pad it to a multiple of {unit} (the training program sets the'
        " sampler's pad_to_multiple_of so).")


def sharded(engine: Callable[..., per_example.ClippedGrad],
            mesh: jax.sharding.Mesh, *, rows_multiple: int = 1,
            axis_name: str = DATA_AXIS) -> Callable[..., Any]:
  """ANY clipped-gradient engine with the batch's rows split over ``mesh``.

  ``engine(params, batch, clip_state, inputs) -> ClippedGrad`` is the
  protocol of :mod:`dpjax.engines`. Each device runs it on its own rows
  (``rows_multiple`` of them at least: a batch-clipping group never straddles
  two devices) with parameters, clip state and ``inputs`` (any pytree)
  replicated; the clipped sums, the clip state's numeric increments
  (adaptive counts) and the counts are summed across devices, per-row
  statistics come back sharded like the batch. So the result is the
  engine's on one device, and the noise, added afterwards, is drawn once.

  Args:
    engine: the engine to shard.
    mesh: a mesh with an ``axis_name`` axis (:func:`make_mesh`).
    rows_multiple: rows per device must be a multiple of this.
    axis_name: the data-parallel mesh axis.

  Returns:
    ``run(params, batch, clip_state, inputs) -> ClippedGrad``, the same
    protocol; ``batch`` is a :class:`dpjax.Batch`. Call it under jit.

  References:
    De et al., 2022. Unlocking High-Accuracy Differentially Private Image
    Classification through Scale. https://arxiv.org/abs/2204.13650
  """

  def local(params, examples, mask, clip_state, inputs):
    out = engine(_compat.pcast_varying(params, axis_name),
                 sampling.Batch(examples, mask),
                 clip_state, inputs)
    psum = lambda x: jax.lax.psum(x, axis_name)
    new_state = clipping_lib.add_state_increment(clip_state, jax.tree.map(
        psum, clipping_lib.state_increment(clip_state, out.clip_state)))
    stats = out.stats._replace(num_nonfinite=psum(out.stats.num_nonfinite),
                               num_clipped=psum(out.stats.num_clipped))
    return per_example.ClippedGrad(psum(out.grad_sum), new_state, stats)

  def run(params, batch, clip_state, inputs):
    examples, mask = per_example.examples_and_mask(
        batch, per_example.MASK_REQUIRED)
    size = per_example.batch_size_of(examples)
    _check_divisible(size, mesh, axis_name, rows_multiple)
    mask = clipping_lib.as_mask(mask, size)
    rows = P(axis_name)
    stats_spec = per_example.PerExampleStats(rows, rows, P(), P(), rows)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(), rows, rows, P(), P()),
        out_specs=per_example.ClippedGrad(P(), P(), stats_spec))(
            params, examples, mask, clip_state, inputs)

  return run


def clipped_grad(
    loss_fn: Callable[..., Any],
    clipping: clipping_lib.PerExampleClipping,
    mesh: jax.sharding.Mesh,
    *,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    axis_name: str = DATA_AXIS,
) -> Callable[..., per_example.ClippedGrad]:
  """:func:`dpjax.clipped_grad` with the batch sharded over ``mesh``.

  Same signature and result as :func:`dpjax.clipped_grad`'s function:
  ``fn(params, batch, mask, *, clip_state=None, args=(), param_mask=None)``:
  the vmap engine under :func:`sharded`. Rows of ``batch`` are split evenly over the
  ``axis_name`` devices (the batch size must be a multiple of their number);
  each device clips its rows' gradients (microbatched by ``microbatch_size``
  rows per device).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import dpjax
    >>> from dpjax import distributed
    >>> def loss(w, ex):
    ...   return 0.5 * (ex['x'] @ w - ex['y']) ** 2
    >>> fn = distributed.clipped_grad(loss, dpjax.clip_per_example(1.0),
    ...                               distributed.make_mesh(1))
    >>> batch = {'x': jnp.ones((4, 3)), 'y': jnp.zeros(4)}
    >>> out = jax.jit(fn)(jnp.ones(3), batch, jnp.arange(4) < 3)
    >>> [round(g, 4) for g in out.grad_sum.tolist()]
    [1.7321, 1.7321, 1.7321]

  Args:
    loss_fn: ``loss_fn(params, example, *args)`` for ONE example.
    clipping: the per-example clipping transform.
    mesh: a mesh with a ``axis_name`` axis (:func:`make_mesh`).
    microbatch_size: rows per vectorized chunk on each device.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis_name: the data-parallel mesh axis.

  Returns:
    A function returning :class:`dpjax.ClippedGrad`; call it under jit.
  """
  local_fn = per_example.clipped_grad(
      loss_fn, clipping, microbatch_size=microbatch_size, has_aux=has_aux)
  run = sharded(
      lambda params, batch, clip_state, inputs: local_fn(
          params, batch, clip_state=clip_state, args=inputs[0],
          param_mask=inputs[1]),
      mesh, axis_name=axis_name)

  def fn(params, batch, mask=per_example.MASK_REQUIRED, *, clip_state=None,
         args=(), param_mask=None):
    examples, mask = per_example.examples_and_mask(batch, mask)
    per_example.check_param_mask(params, param_mask)
    if clip_state is None:
      clip_state = clipping.init(params)
    mask = clipping_lib.as_mask(mask, per_example.batch_size_of(examples))
    return run(params, sampling.Batch(examples, mask), clip_state,
               (tuple(args), param_mask))

  return fn


def summed_grad(
    sum_fn: Callable[..., tuple[jax.Array, PyTree]],
    mesh: jax.sharding.Mesh,
    *,
    axis_name: str = DATA_AXIS,
) -> Callable[..., tuple[jax.Array, PyTree]]:
  """``value_and_grad`` of a batch-SUM function, the batch sharded on ``mesh``.

  For the non-private baseline: ``sum_fn(params, batch, mask, *args) ->
  scalar`` is a sum over rows; the returned ``fn(params, batch, mask, *args)``
  gives its value and gradient over the whole batch, each device taking its
  rows (``args`` are replicated).
  """
  grad_fn = jax.value_and_grad(sum_fn)

  def local(params, batch, mask, args):
    value, grads = grad_fn(_compat.pcast_varying(params, axis_name), batch,
                           mask, *args)
    return jax.lax.psum((value, grads), axis_name)

  def fn(params, batch, mask, *args):
    _check_divisible(per_example.batch_size_of(batch), mesh, axis_name)
    rows = P(axis_name)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), rows, rows, P()),
                         out_specs=P())(params, batch, mask, args)

  return fn


def _put(tree: PyTree, sharding: NamedSharding) -> PyTree:
  """Places ``tree`` (the same value on every host) with ``sharding``."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    # Each host supplies only the shards of its own devices.
    if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])

  return jax.tree.map(one, tree)


def put_replicated(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Copies ``tree`` to every device of ``mesh`` (parameters, the dataset)."""
  return _put(tree, NamedSharding(mesh, P()))


def put_sharded(tree: PyTree, mesh: jax.sharding.Mesh,
                axis_name: str = DATA_AXIS) -> PyTree:
  """Splits ``tree``'s leading axis over the ``axis_name`` devices.

  On several hosts every host passes the same whole batch and keeps its own
  devices' rows, so no example is dropped or duplicated.
  """
  return _put(tree, NamedSharding(mesh, P(axis_name)))
