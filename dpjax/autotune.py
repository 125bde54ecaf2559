"""The largest microbatch whose compiled step fits a memory budget.

Per-example gradients by ``vmap`` hold a microbatch x num_params tensor; the
ghost route (:mod:`dpjax.ghost`) holds every layer's input and output gradient
for the microbatch. Both scale with the microbatch, which is a performance
setting only (the clipped sum does not depend on it, so neither does the
privacy guarantee: DESIGN.md invariant 2, noise once per logical step, is kept
by :func:`dpjax.per_example.microbatched`). This module picks it from XLA's own
buffer assignment of the compiled step (``memory_analysis()``): no trial runs,
no out-of-memory crashes, one compilation per candidate size tried.

Implements the memory side of Bu et al. 2023 ("Differentially Private
Optimization on Large Model at Small Cost"), where the largest batch that fits
decides the throughput of DP training.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax


def peak_bytes(jitted: Any, *args: Any, **kwargs: Any) -> int:
  """Peak bytes of ``jitted(*args)`` per XLA: arguments + outputs + temps.

  Donated (aliased) buffers are counted once. Arguments may be arrays or
  ``jax.ShapeDtypeStruct``; nothing runs.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dpjax import autotune
    >>> f = jax.jit(lambda x: (x @ x.T).sum())
    >>> autotune.peak_bytes(f, jax.ShapeDtypeStruct((256, 64), jnp.float32)) > 0
    True
  """
  analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
  if analysis is None:
    raise RuntimeError(
        'this backend reports no memory analysis; set the microbatch size by'
        ' hand (config.perf.microbatch_size).')
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def default_budget_bytes(fraction: float = 0.5) -> int:
  """``fraction`` of the first device's memory (host RAM on CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  total = stats.get('bytes_limit')
  if total is None:
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return int(fraction * total)


def candidate_sizes(batch_size: int) -> list[int]:
  """Powers of two below ``batch_size``, and ``batch_size`` itself."""
  sizes = [1 << k for k in range(batch_size.bit_length())
           if (1 << k) < batch_size]
  return sizes + [batch_size]


def microbatch_size(
    make_step: Callable[[int], Any],
    args: Sequence[Any],
    batch_size: int,
    budget_bytes: int,
    *,
    candidates: Sequence[int] | None = None,
) -> int:
  """The largest microbatch whose compiled step needs at most the budget.

  Binary search over ``candidates`` (memory grows with the microbatch), one
  compilation per size tried.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import dpjax
    >>> from dpjax import autotune
    >>> loss = lambda w, ex: jnp.sum((ex['x'] @ w) ** 2)
    >>> clip = dpjax.clip_per_example(1.0)
    >>> make = lambda m: jax.jit(dpjax.clipped_grad(loss, clip,
    ...                                             microbatch_size=m))
    >>> args = (jax.ShapeDtypeStruct((512, 512), jnp.float32),
    ...         {'x': jax.ShapeDtypeStruct((64, 512), jnp.float32)}, None)
    >>> m = autotune.microbatch_size(make, args, 64, 16 * 2**20)
    >>> m, autotune.peak_bytes(make(m), *args) <= 16 * 2**20
    (8, True)

  Args:
    make_step: ``make_step(m)`` returns the jitted step with microbatch m.
    args: arguments (arrays or ShapeDtypeStructs) of the step.
    batch_size: the (largest padded) batch size the step runs on.
    budget_bytes: the memory budget in bytes.
    candidates: sizes to choose from (default: powers of two and the batch).

  Returns:
    The chosen microbatch size.

  Raises:
    ValueError: if even the smallest candidate exceeds the budget.
  """
  sizes = sorted(set(candidates or candidate_sizes(batch_size)))
  if not sizes or sizes[0] <= 0:
    raise ValueError(f'candidates must be positive sizes, got {candidates!r}.')
  peaks: dict[int, int] = {}

  def fits(m):
    peaks[m] = peak_bytes(make_step(m), *args)
    return peaks[m] <= budget_bytes

  lo, hi = 0, len(sizes) - 1
  best = None
  while lo <= hi:
    mid = (lo + hi) // 2
    if fits(sizes[mid]):
      best, lo = sizes[mid], mid + 1
    else:
      hi = mid - 1
  if best is None:
    m = sizes[0]
    raise ValueError(
        f'even a microbatch of {m} needs {peaks[m] / 2**20:.1f} MiB, above the'
        f' budget of {budget_bytes / 2**20:.1f} MiB; raise'
        ' config.perf.memory_budget_mb or use a smaller model or batch.')
  return best
