"""Tests for dpjax/sampling.py: Poisson inclusion, padding, overflow."""

import jax
import numpy as np
import pytest
from scipy import stats

from dpjax import sampling


def test_inclusion_frequency_is_q():
  n, batch, steps = 500, 50, 2000
  sampler = sampling.PoissonSampler(n, batch, key=jax.random.key(3))
  counts = np.zeros(n)
  sizes = []
  for t in range(steps):
    b = sampler.sample(t)
    counts[b.indices[b.mask]] += 1
    sizes.append(b.size)
  q = batch / n
  # Every example's inclusion count is Binomial(steps, q): none is favoured.
  z = (counts - steps * q) / np.sqrt(steps * q * (1 - q))
  assert np.abs(z).max() < 5
  assert abs(np.mean(counts) / steps - q) < 3 * np.sqrt(q / (steps * n))
  # Batch sizes are Binomial(n, q), not fixed: the analysis needs that.
  var = n * q * (1 - q)
  assert abs(np.mean(sizes) - n * q) < 5 * np.sqrt(var / steps)
  assert 0.85 * var < np.var(sizes) < 1.15 * var


def test_batches_are_padded_masked_and_unique():
  sampler = sampling.PoissonSampler(1000, 100, pad_to_multiple_of=16, key=jax.random.key(0))
  for t in range(50):
    b = sampler.sample(t)
    assert len(b.indices) % 16 == 0
    assert len(b.indices) in sampler.padded_sizes
    assert b.mask.sum() == b.size
    assert np.all(b.mask[:b.size]) and not np.any(b.mask[b.size:])
    real = b.indices[b.mask]
    assert len(np.unique(real)) == b.size
    assert np.all(b.indices[~b.mask] == 0)


def test_deterministic_per_step_and_seed():
  s1 = sampling.PoissonSampler(1000, 100, key=jax.random.key(5))
  s2 = sampling.PoissonSampler(1000, 100, key=jax.random.key(5))
  np.testing.assert_array_equal(s1.sample(17).indices, s2.sample(17).indices)
  assert not np.array_equal(s1.sample(17).indices, s1.sample(18).indices)
  s3 = sampling.PoissonSampler(1000, 100, key=jax.random.key(6))
  assert not np.array_equal(s1.sample(17).indices, s3.sample(17).indices)


def test_padded_sizes_are_few():
  sampler = sampling.PoissonSampler(60000, 256, key=jax.random.key(0))
  seen = {len(sampler.sample(t).indices) for t in range(300)}
  assert len(seen) <= 8
  assert seen <= set(sampler.padded_sizes)


def test_max_batch_size_bounds_overflow_probability():
  n, b = 60000, 256
  sampler = sampling.PoissonSampler(n, b, overflow_probability=1e-9,
                                     key=jax.random.key(0))
  assert stats.binom.sf(sampler.max_batch_size, n, b / n) <= 1e-9


def test_overflow_raises_instead_of_truncating():
  sampler = sampling.PoissonSampler(1000, 100, pad_to_multiple_of=1,
                                    overflow_probability=0.3,
                                    key=jax.random.key(0))
  with pytest.raises(sampling.BatchOverflowError, match='Truncating'):
    for t in range(200):
      sampler.sample(t)


@pytest.mark.parametrize('kwargs,match', [
    (dict(dataset_size=10, expected_batch_size=20), 'larger than the dataset'),
    (dict(dataset_size=0, expected_batch_size=1), 'dataset_size'),
    (dict(dataset_size=10, expected_batch_size=-1), 'expected_batch_size'),
    (dict(dataset_size=10, expected_batch_size=2, pad_to_multiple_of=0),
     'pad_to_multiple_of'),
])
def test_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.PoissonSampler(**kwargs, key=jax.random.key(0))
