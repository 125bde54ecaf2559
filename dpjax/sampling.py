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

Batches are a pure function of ``(seed, step)``, so resuming, or every host of
a multi-host job, reproduces exactly the same batches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

from dpjax import _validation


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


class BatchOverflowError(RuntimeError):
  """A Poisson batch exceeded the largest padded size."""


def _round_up(x: int, multiple: int) -> int:
  return max(multiple, -(-x // multiple) * multiple)


class PoissonSampler:
  """Poisson sampling at rate q = expected_batch_size / dataset_size.

  Examples:
    >>> from dpjax.sampling import PoissonSampler
    >>> sampler = PoissonSampler(1000, 100, pad_to_multiple_of=32, seed=0)
    >>> batch = sampler.sample(step=0)
    >>> len(batch.indices) % 32, int(batch.mask.sum()) == batch.size
    (0, True)

  Args:
    dataset_size: N, the number of (private) training examples.
    expected_batch_size: q * N, the public expected batch size.
    pad_to_multiple_of: padded batch sizes are multiples of this; default ~2
      standard deviations of the batch size (a handful of compiled shapes), or
      set it to a multiple of the microbatch size. Performance only.
    overflow_probability: per-step probability that a batch exceeds the
      largest padded size (which then raises :class:`BatchOverflowError`).
    seed: sampler seed; batch t depends only on (seed, t).
  """

  def __init__(
      self,
      dataset_size: int,
      expected_batch_size: float,
      *,
      pad_to_multiple_of: int | None = None,
      overflow_probability: float = 1e-9,
      seed: int = 0,
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
    self.seed = int(seed)

  @property
  def padded_sizes(self) -> tuple[int, ...]:
    """Every padded size a batch can take (an upper bound on compilations)."""
    m = self.pad_to_multiple_of
    return tuple(range(m, self.max_batch_size + 1, m))

  def padded_size(self, size: int) -> int:
    return _round_up(size, self.pad_to_multiple_of)

  def sample(self, step: int) -> PaddedBatch:
    """The batch of logical step ``step``."""
    rng = np.random.default_rng([self.seed, int(step)])
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
  Poisson event. Batches are a pure function of ``(seed, step)``.

  Examples:
    >>> import numpy as np
    >>> from dpjax.sampling import ShuffleSampler
    >>> sampler = ShuffleSampler(10, 4, seed=0)
    >>> sampler.steps_per_epoch
    2
    >>> seen = np.concatenate([sampler.sample(s).indices for s in (0, 1)])
    >>> len(set(seen.tolist())), sampler.sample(0).size
    (8, 4)

  Args:
    dataset_size: N, the number of (private) training examples.
    batch_size: B, the fixed (public) batch size.
    seed: sampler seed; batch t depends only on (seed, t).
  """

  def __init__(self, dataset_size: int, batch_size: int, *, seed: int = 0):
    self.dataset_size = _validation.positive_int('dataset_size', dataset_size)
    self.batch_size = _validation.positive_int(
        'batch_size', batch_size, ' Shuffling uses a fixed batch size.')
    if self.batch_size > self.dataset_size:
      raise ValueError(
          f'batch_size={self.batch_size} is larger than the dataset'
          f' (N={self.dataset_size}); choose a batch size <= N.')
    self.steps_per_epoch = self.dataset_size // self.batch_size
    self.seed = int(seed)

  @property
  def padded_sizes(self) -> tuple[int, ...]:
    return (self.batch_size,)

  def epoch_of(self, step: int) -> int:
    return int(step) // self.steps_per_epoch

  def sample(self, step: int) -> PaddedBatch:
    """The batch of logical step ``step`` (no padding: the mask is all True)."""
    epoch, k = divmod(int(step), self.steps_per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(
        self.dataset_size)
    indices = order[k * self.batch_size:(k + 1) * self.batch_size]
    return PaddedBatch(indices.astype(np.int32),
                       np.ones(self.batch_size, bool), self.batch_size)
