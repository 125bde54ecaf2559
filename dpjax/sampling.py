"""Poisson subsampling with fixed-shape padded batches.

The privacy amplification DP-SGD's accountant assumes (Abadi et al. 2016;
Mironov, Talwar, Zhang 2019) holds only if every example enters each step's
batch independently with probability q. The realized batch size is therefore
random; for ``jax.jit`` it is padded up to one of a few sizes (multiples of
``pad_to_multiple_of``) with a mask marking the real rows, so the step compiles
a bounded number of times.

Truncating a Poisson batch would change the mechanism. The largest padded size
is set so that a larger batch has probability below ``overflow_probability``
per step; if one happens anyway, sampling fails loudly rather than dropping
examples (privacy invariant 4 in DESIGN.md: the accountant's event matches the
sampler really used).

Batches are a pure function of ``(key, step)``, so resuming, or every host of
a multi-host job, reproduces exactly the same batches. The key is the sampler
stream of the run's secret key schedule (:mod:`dpjax.keys`): subsampling
amplification assumes nobody knows which examples a step used.

A padded batch cannot reach clipping without its mask (invariant 7): the
sampler's :class:`PaddedBatch` gathers examples into a :class:`Batch` that
carries the mask with them, and every clipped-gradient engine takes that
object (or an explicit ``mask``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np
from scipy import stats

from dpjax import _validation
from dpjax import keys as keys_lib

PyTree = Any


class Batch(NamedTuple):
  """Examples with the mask of their real rows: what the engines take.

  Attributes:
    examples: pytree of arrays with a leading (padded) batch axis.
    mask: [P] bool, True on real rows; padding rows contribute nothing.
  """

  examples: PyTree
  mask: Any


class PaddedBatch(NamedTuple):
  """Indices of one sampled batch, padded to a fixed size.

  Attributes:
    indices: [P] int32 example indices; padding rows point at index 0.
    mask: [P] bool, True on the ``size`` real rows (which come first).
    size: realized batch size (number of True entries in ``mask``).
  """

  indices: np.ndarray
  mask: np.ndarray
  size: int

  def take(self, data: PyTree) -> Batch:
    """The batch's rows of ``data`` (arrays with a leading example axis).

    Works on NumPy and JAX arrays, also under ``jit`` (indices as a traced
    array). The result carries the mask, so the padding rows (which repeat
    example 0) can never be mistaken for real examples.
    """
    indices = self.indices
    return Batch(jax.tree.map(lambda x: x[indices], data), self.mask)


class BatchOverflowError(RuntimeError):
  """A Poisson batch exceeded the largest padded size."""


def _round_up(x: int, multiple: int) -> int:
  return max(multiple, -(-x // multiple) * multiple)


class PoissonSampler:
  """Poisson sampling at rate q = expected_batch_size / dataset_size.

  Examples:
    >>> import jax
    >>> from dpjax.sampling import PoissonSampler
    >>> sampler = PoissonSampler(1000, 100, pad_to_multiple_of=32,
    ...                          key=jax.random.key(0))
    >>> batch = sampler.sample(step=0)
    >>> len(batch.indices) % 32, int(batch.mask.sum()) == batch.size
    (0, True)

  Args:
    dataset_size: N, the number of (private) training examples.
    expected_batch_size: q * N, the public expected batch size.
    pad_to_multiple_of: padded batch sizes are multiples of this; default ~2
      standard deviations of the batch size (a handful of compiled shapes).
      Microbatches split each padded size evenly, so it need not be a
      multiple of the microbatch size. Performance only.
    overflow_probability: per-step probability that a batch exceeds the
      largest padded size (which then raises :class:`BatchOverflowError`).
    key: the sampler's stream root (``KeySchedule.root(keys.SAMPLER)``);
      batch t depends only on (key, t). Keep it secret.
  """

  def __init__(
      self,
      dataset_size: int,
      expected_batch_size: float,
      *,
      key: jax.Array,
      pad_to_multiple_of: int | None = None,
      overflow_probability: float = 1e-9,
  ):
    self.dataset_size = _validation.positive_int('dataset_size', dataset_size)
    b = _validation.positive('expected_batch_size', expected_batch_size)
    if b > self.dataset_size:
      raise ValueError(
          f'expected_batch_size={b:g} is larger than the dataset'
          f' (N={self.dataset_size}); choose a batch size <= N.'
      )
    self.expected_batch_size = b
    self.sampling_rate = b / self.dataset_size
    self.overflow_probability = _validation.open_unit(
        'overflow_probability', overflow_probability)
    n, q = self.dataset_size, self.sampling_rate
    if pad_to_multiple_of is None:
      std = math.sqrt(n * q * (1 - q))
      pad_to_multiple_of = max(8, 8 * math.ceil(2 * std / 8))
    self.pad_to_multiple_of = _validation.positive_int(
        'pad_to_multiple_of', pad_to_multiple_of)
    limit = int(stats.binom.isf(self.overflow_probability, n, q)) + 1
    self.max_batch_size = _round_up(min(limit, n), self.pad_to_multiple_of)
    self.key = key

  @property
  def padded_sizes(self) -> tuple[int, ...]:
    """Every padded size a batch can take (an upper bound on compilations)."""
    m = self.pad_to_multiple_of
    return tuple(range(m, self.max_batch_size + 1, m))

  def padded_size(self, size: int) -> int:
    return _round_up(size, self.pad_to_multiple_of)

  def sample(self, step: int) -> PaddedBatch:
    """The batch of logical step ``step``."""
    rng = keys_lib.host_rng(keys_lib.for_step(self.key, int(step)))
    selected = np.flatnonzero(rng.random(self.dataset_size) < self.sampling_rate)
    size = len(selected)
    if size > self.max_batch_size:
      raise BatchOverflowError(
          f'Poisson batch of size {size} at step {step} exceeds the largest'
          f' padded size {self.max_batch_size} (probability <'
          f' {self.overflow_probability:g} per step). Truncating it would'
          ' break the privacy analysis; lower overflow_probability and rerun.'
      )
    padded = self.padded_size(size)
    indices = np.zeros(padded, np.int32)
    indices[:size] = selected
    mask = np.arange(padded) < size
    return PaddedBatch(indices, mask, size)


class ShuffleSampler:
  """Shuffling: each epoch a fresh permutation, cut into fixed-size batches.

  Every example is in exactly one batch per epoch (the last N mod B examples
  of each permutation sit the epoch out), so it takes part in at most one
  step per epoch. That, and not subsampling amplification, is what the
  accounting of batch clipping uses (Gaussian DP, ``mu = sqrt(E) / sigma``
  after E epochs): pair it with :func:`dpjax.accounting.
  gaussian_composition_event` under the replace-one relation, never with a
  Poisson event. Batches are a pure function of ``(key, step)``.

  Examples:
    >>> import jax, numpy as np
    >>> from dpjax.sampling import ShuffleSampler
    >>> sampler = ShuffleSampler(10, 4, key=jax.random.key(0))
    >>> sampler.steps_per_epoch
    2
    >>> seen = np.concatenate([sampler.sample(s).indices for s in (0, 1)])
    >>> len(set(seen.tolist())), sampler.sample(0).size
    (8, 4)

  Args:
    dataset_size: N, the number of (private) training examples.
    batch_size: B, the fixed (public) batch size.
    key: the sampler's stream root; batch t depends only on (key, t).
  """

  def __init__(self, dataset_size: int, batch_size: int, *,
               key: jax.Array):
    self.dataset_size = _validation.positive_int('dataset_size', dataset_size)
    self.batch_size = _validation.positive_int(
        'batch_size', batch_size, ' Shuffling uses a fixed batch size.')
    if self.batch_size > self.dataset_size:
      raise ValueError(
          f'batch_size={self.batch_size} is larger than the dataset'
          f' (N={self.dataset_size}); choose a batch size <= N.')
    self.steps_per_epoch = self.dataset_size // self.batch_size
    self.key = key

  @property
  def padded_sizes(self) -> tuple[int, ...]:
    return (self.batch_size,)

  def epoch_of(self, step: int) -> int:
    return int(step) // self.steps_per_epoch

  def sample(self, step: int) -> PaddedBatch:
    """The batch of logical step ``step`` (no padding: the mask is all True)."""
    epoch, k = divmod(int(step), self.steps_per_epoch)
    rng = keys_lib.host_rng(keys_lib.for_step(self.key, epoch))
    order = rng.permutation(self.dataset_size)
    indices = order[k * self.batch_size:(k + 1) * self.batch_size]
    return PaddedBatch(indices.astype(np.int32),
                       np.ones(self.batch_size, bool), self.batch_size)
