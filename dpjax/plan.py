"""One object that ties sampler, clipping, noise and accountant together.

A DP-SGD guarantee holds only if four pieces agree: the sampler (Poisson at
rate q), the clipping sensitivity under the neighbouring relation of that
sampler, the noise scaled to that sensitivity and divided by the public
expected batch size, and the accountant's event (Poisson-subsampled Gaussian at
the same q and sigma). Users who wire these by hand pair Poisson accounting
with shuffled batches or noise calibrated for a sum with a mean (ANCHORS.md,
reports 1 and 9). :func:`make_plan` builds all four from one
:class:`PrivacyConfig`, so they cannot disagree.

Privacy settings live in :class:`PrivacyConfig`; performance flags (padding,
microbatching) are arguments of their own and never change the guarantee.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import dp_accounting
import jax
import optax

from dpjax import _validation
from dpjax import accounting
from dpjax import clipping as clipping_lib
from dpjax import noise as noise_lib
from dpjax import sampling

NeighboringRelation = dp_accounting.NeighboringRelation


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  """Every setting that changes the privacy guarantee, and nothing else.

  Attributes:
    clip_norm: per-example L2 clip norm C.
    noise_multiplier: sigma; noise std on the clipped sum is sigma * C. Leave
      None and set ``target_epsilon`` to calibrate it.
    target_epsilon: epsilon to reach after the whole run (calibrates sigma).
    delta: target delta; must be < 1/N.
    expected_batch_size: q * N, the Poisson sampling's expected batch size,
      also the public divisor of the noisy sum.
    epochs: length of training in passes over the data (or set ``steps``).
    steps: length of training in logical steps (or set ``epochs``).
    accountant: 'rdp' or 'pld'.
  """

  clip_norm: float = 1.0
  noise_multiplier: float | None = None
  target_epsilon: float | None = None
  delta: float = 1e-5
  expected_batch_size: int = 256
  epochs: float | None = None
  steps: int | None = None
  accountant: str = 'rdp'


@dataclasses.dataclass(frozen=True)
class DPPlan:
  """Sampler, clipping, noise and accountant that belong together.

  Build it with :func:`make_plan`.
  """

  config: PrivacyConfig
  dataset_size: int
  sampling_rate: float
  num_steps: int
  noise_multiplier: float
  clipping: clipping_lib.PerExampleClipping
  sampler: sampling.PoissonSampler
  relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE

  @property
  def sensitivity(self) -> float:
    """L2 sensitivity of the clipped sum under the sampler's relation."""
    return self.clipping.sensitivity(self.relation)

  @property
  def noise_std(self) -> float:
    """Std of the Gaussian noise on the clipped SUM."""
    return self.noise_multiplier * self.sensitivity

  def noise(self, key: jax.Array | int) -> optax.GradientTransformation:
    """The noise transform: right std, divided by the expected batch size."""
    return noise_lib.add_gaussian_noise(
        self.noise_multiplier, self.sensitivity,
        self.config.expected_batch_size, key)

  def step_event(self) -> dp_accounting.DpEvent:
    """The DP event of one logical step."""
    return accounting.poisson_gaussian_event(
        self.noise_multiplier, self.sampling_rate)

  def epsilon(self, steps: int | None = None) -> float:
    """Epsilon after ``steps`` steps (default: the whole run)."""
    steps = self.num_steps if steps is None else steps
    if steps == 0:
      return 0.0
    return accounting.epsilon(
        accounting.dpsgd_event(self.noise_multiplier, self.sampling_rate,
                               steps),
        self.config.delta, self.config.accountant, self.relation)

  def summary(self) -> dict[str, Any]:
    """The privacy-relevant facts of the run, for summary.json."""
    return {
        'epsilon': self.epsilon(),
        'delta': self.config.delta,
        'noise_multiplier': self.noise_multiplier,
        'accountant': self.config.accountant,
        'steps': self.num_steps,
        'sampling_rate': self.sampling_rate,
        'sampler': 'poisson',
        'expected_batch_size': self.config.expected_batch_size,
        'dataset_size': self.dataset_size,
        'clip_norm': self.config.clip_norm,
        'clipping': self.clipping.name,
        'neighbouring_relation': self.relation.name.lower(),
        'sensitivity': self.sensitivity,
        'noise_std_on_sum': self.noise_std,
    }


def make_plan(
    config: PrivacyConfig,
    dataset_size: int,
    *,
    pad_to_multiple_of: int | None = None,
    sampler_seed: int = 0,
) -> DPPlan:
  """Builds a :class:`DPPlan` from privacy settings and the dataset size.

  Validates every setting (a clear error names the bad value) and, when
  ``target_epsilon`` is given, calibrates the noise multiplier with the chosen
  accountant.

  Args:
    config: the privacy settings.
    dataset_size: N, the number of private training examples.
    pad_to_multiple_of: padded batch sizes are multiples of this
      (performance only; see :class:`dpjax.sampling.PoissonSampler`).
    sampler_seed: seed of the Poisson sampler.

  Returns:
    A :class:`DPPlan`.
  """
  n = _validation.positive_int('dataset_size', dataset_size)
  accounting.check_accountant(config.accountant)
  delta = accounting.check_delta(config.delta, n)
  clipping = clipping_lib.clip_per_example(config.clip_norm)
  q = accounting.sampling_rate(config.expected_batch_size, n)

  if (config.epochs is None) == (config.steps is None):
    raise ValueError(
        'set exactly one of privacy.epochs and privacy.steps; got'
        f' epochs={config.epochs!r}, steps={config.steps!r}.')
  if config.steps is not None:
    steps = _validation.positive_int('steps', config.steps)
  else:
    steps = accounting.steps_for_epochs(config.epochs, q)

  if (config.noise_multiplier is None) == (config.target_epsilon is None):
    raise ValueError(
        'set exactly one of privacy.noise_multiplier and'
        f' privacy.target_epsilon; got noise_multiplier='
        f'{config.noise_multiplier!r}, target_epsilon={config.target_epsilon!r}.')
  if config.noise_multiplier is not None:
    sigma = _validation.non_negative(
        'noise_multiplier', config.noise_multiplier,
        ' Use a positive value for a private run.')
  else:
    sigma = accounting.calibrate_noise_multiplier(
        config.target_epsilon, delta, q, steps, config.accountant)
  if not math.isfinite(sigma):
    raise ValueError(f'noise multiplier is not finite: {sigma!r}.')

  sampler = sampling.PoissonSampler(
      n, config.expected_batch_size, pad_to_multiple_of=pad_to_multiple_of,
      seed=sampler_seed)
  return DPPlan(
      config=config, dataset_size=n, sampling_rate=q, num_steps=steps,
      noise_multiplier=sigma, clipping=clipping, sampler=sampler)
