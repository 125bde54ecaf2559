"""Privacy accounting on dp-accounting: events, epsilon, calibration, a ledger.

DP-SGD with Poisson sampling at rate q and noise multiplier sigma is, per step,
the Poisson-subsampled Gaussian mechanism; T steps compose. Epsilon comes from
Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019) or from privacy loss
distributions (Koskela et al. 2020; Doroshenko et al. 2022), both as
implemented in Google's dp-accounting.

Privacy invariant owned here (DESIGN.md, 4 and 5): the event composed is the
one of the sampler really used, and every extra data-dependent release is
recorded in the same :class:`PrivacyLedger` as the gradient steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from typing import Literal

from absl import logging as absl_logging
import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp

from dpjax import _validation

Accountant = Literal['rdp', 'pld']
ACCOUNTANTS: tuple[str, ...] = ('rdp', 'pld')
DEFAULT_PLD_DISCRETIZATION = 1e-4


@contextlib.contextmanager
def _quiet_dp_accounting():
  """Silences dp-accounting's per-order convergence warnings.

  For small sigma the RDP code drops the fractional orders it cannot evaluate
  and says so on every call; dropping an order only makes epsilon larger, so the
  warning is noise to a user watching a progress bar.
  """
  absl_level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  logger = logging.getLogger('absl')
  py_level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(absl_level)
    logger.setLevel(py_level)


def check_accountant(accountant: str) -> str:
  if accountant not in ACCOUNTANTS:
    raise ValueError(
        f'accountant must be one of {ACCOUNTANTS}, got {accountant!r}.'
    )
  return accountant


def check_delta(delta: float, dataset_size: int | None = None) -> float:
  """Validates delta; refuses delta >= 1/N.

  A mechanism that publishes one uniformly chosen record in the clear is
  (0, 1/N)-DP, so a delta of 1/N or more promises nothing. The usual choice is
  delta well below 1/N (1e-5 for N in the tens of thousands).
  """
  delta = _validation.open_unit('delta', delta, ' Typical: 1e-5.')
  if dataset_size is not None:
    n = _validation.positive_int('dataset_size', dataset_size)
    if delta >= 1.0 / n:
      raise ValueError(
          f'delta={delta:g} is >= 1/N = {1.0 / n:.3g} for N={n} examples: at'
          ' that delta, releasing a whole random example is "private". Choose'
          f' delta < 1/N, e.g. delta={10 ** math.floor(math.log10(0.1 / n)):g}.'
      )
  return delta


def sampling_rate(expected_batch_size: float, dataset_size: int) -> float:
  """q = B / N for Poisson sampling, with checks."""
  n = _validation.positive_int('dataset_size', dataset_size)
  b = _validation.positive('expected_batch_size', expected_batch_size)
  if b > n:
    raise ValueError(
        f'expected_batch_size={b:g} is larger than the dataset (N={n}); the'
        ' Poisson sampling rate B/N must be <= 1. Use a smaller batch.'
    )
  return b / n


def steps_for_epochs(epochs: float, q: float) -> int:
  """Steps in ``epochs`` passes at sampling rate q: floor(epochs / q), >= 1."""
  epochs = _validation.positive('epochs', epochs)
  return max(1, int(epochs / q + 1e-9))


def poisson_gaussian_event(
    noise_multiplier: float, sampling_rate: float
) -> dp_accounting.DpEvent:
  """One DP-SGD step: the Gaussian mechanism on a Poisson(q) subsample."""
  noise_multiplier = _validation.non_negative(
      'noise_multiplier', noise_multiplier)
  q = _validation.as_real('sampling_rate', sampling_rate)
  if not 0 < q <= 1:
    raise ValueError(f'sampling_rate must lie in (0, 1], got {q!r}.')
  return dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(noise_multiplier))


def dpsgd_event(
    noise_multiplier: float, sampling_rate: float, steps: int
) -> dp_accounting.DpEvent:
  """``steps`` composed DP-SGD steps."""
  steps = _validation.positive_int('steps', steps)
  return dp_accounting.SelfComposedDpEvent(
      poisson_gaussian_event(noise_multiplier, sampling_rate), steps)


def make_accountant(
    accountant: Accountant = 'rdp',
    relation: dp_accounting.NeighboringRelation = (
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE),
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> dp_accounting.PrivacyAccountant:
  """A fresh dp-accounting accountant of the requested kind."""
  check_accountant(accountant)
  if accountant == 'rdp':
    return rdp.RdpAccountant(neighboring_relation=relation)
  return pld.PLDAccountant(
      neighboring_relation=relation,
      value_discretization_interval=pld_discretization)


def _has_zero_noise(event: dp_accounting.DpEvent) -> bool:
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return event.noise_multiplier == 0
  if isinstance(event, (dp_accounting.PoissonSampledDpEvent,
                        dp_accounting.SampledWithoutReplacementDpEvent)):
    return _has_zero_noise(event.event)
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return _has_zero_noise(event.event)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return any(_has_zero_noise(e) for e in event.events)
  return False


def epsilon(
    event: dp_accounting.DpEvent,
    delta: float,
    accountant: Accountant = 'rdp',
    relation: dp_accounting.NeighboringRelation = (
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE),
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
  """Epsilon of ``event`` at ``delta`` (inf when some release has no noise)."""
  check_delta(delta)
  if _has_zero_noise(event):
    return math.inf
  acc = make_accountant(accountant, relation, pld_discretization)
  if not acc.supports(event):
    raise ValueError(
        f'the {accountant!r} accountant does not support the event {event}.'
    )
  with _quiet_dp_accounting():
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: Accountant = 'rdp',
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    tol: float = 1e-4,
) -> float:
  """Smallest noise multiplier (up to ``tol``) whose epsilon <= target.

  The result is on the safe side: epsilon at the returned sigma never exceeds
  ``target_epsilon``.
  """
  target_epsilon = _validation.positive('target_epsilon', target_epsilon)
  check_delta(delta)
  check_accountant(accountant)

  def make_event(sigma):
    return dpsgd_event(sigma, sampling_rate, steps)

  with _quiet_dp_accounting():
    # RDP is cheap at any sigma; a PLD at tiny sigma is huge. So RDP finds the
    # scale and PLD, which is tighter (its sigma is smaller), searches below.
    sigma = dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant, make_event, target_epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=tol)
    if accountant == 'pld':
      sigma = dp_accounting.calibrate_dp_mechanism(
          functools.partial(make_accountant, 'pld',
                            pld_discretization=pld_discretization),
          make_event, target_epsilon, delta,
          dp_accounting.LowerEndpointAndGuess(0.5 * sigma, sigma), tol=tol)
  return float(sigma)


@dataclasses.dataclass
class PrivacyLedger:
  """Every DP event a training run has released, in order.

  Gradient steps and any extra data-dependent release (noised BatchNorm
  statistics, adaptive clip-count queries) are recorded here, so that
  epsilon is always computed from everything that left the training loop.
  Consecutive identical events are stored once with a count.
  """

  entries: list[tuple[dp_accounting.DpEvent, int]] = dataclasses.field(
      default_factory=list)

  def record(self, event: dp_accounting.DpEvent, count: int = 1) -> None:
    count = _validation.positive_int('count', count)
    if self.entries and self.entries[-1][0] == event:
      self.entries[-1] = (event, self.entries[-1][1] + count)
    else:
      self.entries.append((event, count))

  def event(self) -> dp_accounting.DpEvent:
    """The composition of everything recorded so far."""
    return dp_accounting.ComposedDpEvent([
        e if c == 1 else dp_accounting.SelfComposedDpEvent(e, c)
        for e, c in self.entries
    ])

  def epsilon(self, delta: float, accountant: Accountant = 'rdp',
              **kwargs) -> float:
    if not self.entries:
      return 0.0
    return epsilon(self.event(), delta, accountant, **kwargs)
