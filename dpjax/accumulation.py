"""A logical batch in physical pieces: accumulate clipped sums, noise once.

Gradient accumulation for DP-SGD (Abadi et al. 2016; the "virtual steps" of
Opacus and the physical batches of jax_privacy): the padded Poisson batch of
one logical step is cut into physical batches of a fixed size, each one's
clipped gradient SUM is computed by its own device call (which bounds device
memory per call, and compiles one shape), the sums are added, and only then
does the optimizer chain, noise first, run once.

Privacy invariant owned here (DESIGN.md, 2): the noise is added once per
logical step, to the sum over every physical batch. Noising each physical
batch (optax #527) would multiply the noise std by the square root of their
number while the accountant charged one draw; here the noise transform is only
reachable through ``apply_step``, called once per logical step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def split_batch(indices: np.ndarray, mask: np.ndarray,
                physical_batch_size: int | None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The physical batches of a padded batch, in order.

  Args:
    indices: [P] example indices of the padded batch.
    mask: [P] bool, True on real rows.
    physical_batch_size: rows per physical batch (None: one piece). P must be
      a multiple of it (the sampler pads so).

  Yields:
    ``(indices, mask)`` pieces of ``physical_batch_size`` rows.
  """
  indices, mask = np.asarray(indices), np.asarray(mask)
  if indices.shape != mask.shape or indices.ndim != 1:
    raise ValueError(
        f'indices and mask must be 1-D of the same length; got shapes'
        f' {indices.shape} and {mask.shape}.')
  size = len(indices) if physical_batch_size is None else physical_batch_size
  if len(indices) % size:
    raise ValueError(
        f'a padded batch of {len(indices)} rows does not split into physical'
        f' batches of {size}; pad it to a multiple of {size}.')
  for start in range(0, len(indices), size):
    yield indices[start:start + size], mask[start:start + size]


def make_logical_step(
    grad_step: Callable[..., tuple[PyTree, PyTree]],
    apply_step: Callable[..., Any],
    *,
    physical_batch_size: int | None = None,
    place_batch: Callable[[np.ndarray], Any] | None = None,
) -> Callable[..., tuple[Any, PyTree]]:
  """One logical step from a per-physical-batch gradient and an update.

  Args:
    grad_step: ``grad_step(state, data, indices, mask, context) -> (grads,
      sums)``: the clipped gradient SUM of the physical batch and additive
      statistics (e.g. the loss sum). Jitted here.
    apply_step: ``apply_step(state, grads, sums, context) -> state``, the
      once-per-step update (noise, optimizer). Jitted here, donating
      ``state``. ``context`` is whatever the caller prepared for the whole
      logical step (its step inputs), the same for every piece.
    physical_batch_size: rows per ``grad_step`` call; None: the whole batch
      in one call.
    place_batch: puts a physical batch's ``indices`` / ``mask`` on the
      devices (e.g. :func:`dpjax.distributed.put_sharded`).

  Returns:
    ``step(state, data, indices, mask, context=None) -> (state, sums)``;
    ``sums`` adds up the physical batches' statistics.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from dpjax import accumulation
    >>> grad_step = lambda s, data, i, m, c: (
    ...     jnp.sum(jnp.where(m, data[i], 0)), {'count': m.sum()})
    >>> apply_step = lambda s, g, sums, c: s + g
    >>> step = accumulation.make_logical_step(grad_step, apply_step,
    ...                                       physical_batch_size=2)
    >>> state, sums = step(jnp.float32(0), jnp.arange(10.0),
    ...                    np.array([1, 2, 3, 0]), np.array([1, 1, 1, 0], bool))
    >>> float(state), int(sums['count'])
    (6.0, 3)
  """
  grad_jit = jax.jit(grad_step)
  apply_jit = jax.jit(apply_step, donate_argnums=(0,))
  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b),
                donate_argnums=(0,))

  def step(state, data, indices, mask, context=None):
    total = None
    for idx, m in split_batch(indices, mask, physical_batch_size):
      if place_batch is not None:
        idx, m = place_batch(idx), place_batch(m)
      out = grad_jit(state, data, idx, m, context)
      total = out if total is None else add(total, out)
    grads, sums = total
    return apply_jit(state, grads, sums, context), sums

  return step
