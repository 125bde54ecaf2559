"""Clipped-gradient engines behind one protocol, and the one switch.

An engine computes, for a masked batch, the clipped SUM of its rows'
gradients and additive statistics; the noise comes later, once per logical
step (invariant 2). Every engine is a function

    engine(params, batch: dpjax.Batch, clip_state, inputs: StepInputs)
        -> ClippedGrad(grad_sum, clip_state, stats)

whose ``grad_sum``, the numeric leaves of ``clip_state``'s change and the
counts in ``stats`` add up over pieces of a batch, so that :func:`sharded`
can run ANY engine on a data-parallel mesh (each device clips its own rows,
the sums are ``psum``-ed) and :mod:`dpjax.accumulation` can add physical
batches. Per-row statistics (losses, norms, aux) come back sharded by rows.

Engines here: :func:`per_example` (vmap, or ghost norms and book-keeping,
:mod:`dpjax.ghost`), :func:`groups` (batch clipping, :mod:`dpjax.
batch_clipping`) and :func:`summed` (the non-private baseline's plain sum).
:func:`select` is the only place that chooses among them.

References:
  Abadi et al., 2016. Deep Learning with Differential Privacy.
  https://arxiv.org/abs/1607.00133
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dpjax import batch_clipping
from dpjax import clipping as clipping_lib
from dpjax import distributed
from dpjax import ghost
from dpjax import per_example as per_example_lib
from dpjax import sampling

PyTree = Any
Engine = Callable[[PyTree, sampling.Batch, Any, per_example_lib.StepInputs],
                  per_example_lib.ClippedGrad]
ROUTES = ghost.GRAD_ROUTES


class LossSpec(NamedTuple):
  """The per-example loss of a run and what the engine must know about it.

  Attributes:
    loss_fn: ``loss_fn(params, example, inputs) -> loss`` (or ``(loss,
      aux)``) for ONE example.
    has_aux: whether it returns per-example aux (privatized statistics).
    group_loss_fn: ``group_loss_fn(params, group, group_mask, inputs)`` when
      the run clips groups with their own loss (BatchNorm in training mode
      inside a batch-clipping group); None: the mean of ``loss_fn``.
    stats_through_public: whether the loss recomputes BatchNorm statistics
      from the public batch with gradients through them, which the fast
      routes cannot take (:func:`dpjax.ghost.route_refusal`).
  """

  loss_fn: Callable[..., Any]
  has_aux: bool = False
  group_loss_fn: Callable[..., Any] | None = None
  stats_through_public: bool = False


def _with_inputs(fn: Callable[..., per_example_lib.ClippedGrad]) -> Engine:
  """An engine from a ``fn(params, batch, mask, *, clip_state, args,
  param_mask)``: the step's pruning mask (if any) cuts each row's gradient
  before it is clipped."""

  def engine(params, batch, clip_state, inputs):
    return fn(params, batch, clip_state=clip_state, args=(inputs,),
              param_mask=inputs.param_mask)

  return engine


def per_example(loss: LossSpec, clipping: clipping_lib.PerExampleClipping,
                *, route: str = 'auto',
                microbatch_size: int | None = None) -> Engine:
  """Per-example clipping by ``route`` ('auto', 'vmap', 'ghost', 'bookkeeping').

  Every route computes the same clipped sum; what the fast routes cannot
  take (:func:`dpjax.ghost.route_refusal`) runs on vmap under 'auto' and is
  refused with the reason under an explicit fast route.
  """
  if route not in ROUTES:
    raise ValueError(f'perf.grad_route must be one of {ROUTES}, got'
                     f' {route!r}.')
  return _with_inputs(ghost.clipped_grad_for_route(
      route, loss.loss_fn, clipping, microbatch_size=microbatch_size,
      has_aux=loss.has_aux,
      stats_through_public=loss.stats_through_public))


def groups(loss: LossSpec, clipping: batch_clipping.BatchClipping, *,
           route: str = 'auto', microbatch_size: int | None = None) -> Engine:
  """Batch clipping: each group of m rows clipped as one (Nguyen et al.).

  The group loss is ``loss.group_loss_fn`` (BatchNorm in training mode) or
  the masked mean of the example loss; ``microbatch_size`` examples per
  chunk are rounded to whole groups.
  """
  if route not in ('auto', 'vmap'):
    logging.warning(
        "perf.grad_route=%r runs as 'vmap': %s", route,
        ghost.route_refusal(clipping))
  m = clipping.group_size
  group_loss = loss.group_loss_fn or (
      batch_clipping.group_loss_from_example_loss(loss.loss_fn, m))
  return _with_inputs(batch_clipping.batch_clipped_grad(
      group_loss, clipping, has_aux=loss.has_aux or (
          loss.group_loss_fn is not None),
      microbatch_size=None if microbatch_size is None else max(
          1, microbatch_size // m)))


def summed(loss: LossSpec) -> Engine:
  """The non-private baseline: the plain gradient of the masked loss sum.

  Nothing is clipped: ``clip_state`` passes through and the counts are 0.
  With ``loss.group_loss_fn`` (BatchNorm in training mode over the whole
  piece), its aux (the updated statistics) is returned as ``stats.aux``.
  """

  def sum_loss(params, examples, mask, inputs):
    if loss.group_loss_fn is not None:
      value, aux = loss.group_loss_fn(params, examples, mask, inputs)
      total = value * mask.shape[0]  # the group loss is a mean over the rows
      share = jnp.where(mask, total / jnp.maximum(mask.sum(), 1), 0.0)
      return total, (share, aux)
    out = jax.vmap(loss.loss_fn, in_axes=(None, 0, None))(
        params, examples, inputs)
    values, aux = out if loss.has_aux else (out, None)
    values = jnp.where(mask, values, 0.0)
    return jnp.sum(values), (values, aux)

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

  def engine(params, batch, clip_state, inputs):
    examples, mask = per_example_lib.examples_and_mask(batch,
                                                   per_example_lib.MASK_REQUIRED)
    mask = jnp.asarray(mask, bool)
    (_, (values, aux)), grads = grad_fn(params, examples, mask, inputs)
    if inputs.param_mask is not None:
      grads = per_example_lib.mask_param_grads(grads, inputs.param_mask)
    if loss.group_loss_fn is not None:
      # A piece of padding only has no statistics (and NaN gradients).
      grads = jax.tree.map(lambda g: jnp.where(mask.any(), g, 0), grads)
    zero = jnp.zeros((), jnp.int32)
    stats = per_example_lib.PerExampleStats(
        values, jnp.zeros(mask.shape), zero, zero, aux)
    return per_example_lib.ClippedGrad(grads, clip_state, stats)

  return engine


def select(plan, loss: LossSpec, *, route: str = 'auto',
           microbatch_size: int | None = None,
           mesh: jax.sharding.Mesh | None = None) -> Engine:
  """The engine of a run: THE place that chooses it.

  Non-private plans take :func:`summed`; batch clipping :func:`groups`;
  per-example modes :func:`per_example` by ``route``. On a ``mesh`` the
  chosen engine runs under :func:`dpjax.distributed.sharded`, whole groups
  per device.
  """
  if route not in ROUTES:
    raise ValueError(f'perf.grad_route must be one of {ROUTES}, got'
                     f' {route!r}.')
  if not plan.private:
    engine = summed(loss)
  elif plan.group_size > 1 or plan.mode == 'batch':
    engine = groups(loss, plan.clipping, route=route,
                    microbatch_size=microbatch_size)
  else:
    engine = per_example(loss, plan.clipping, route=route,
                         microbatch_size=microbatch_size)
  if mesh is None:
    return engine
  return distributed.sharded(engine, mesh, rows_multiple=plan.group_size)
