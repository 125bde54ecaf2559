"""Privacy accounting on dp-accounting: events, epsilon, calibration, a ledger.

DP-SGD with Poisson sampling at rate q and noise multiplier sigma is, per step,
the Poisson-subsampled Gaussian mechanism; T steps compose. Epsilon comes from
Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019) or from privacy loss
distributions (Koskela et al. 2020; Doroshenko et al. 2022), both as
implemented in Google's dp-accounting. Compositions of Gaussian mechanisms
without subsampling (batch clipping with shuffling) also have the closed form
of Gaussian DP (Dong, Roth, Su 2022), accountant ``'gdp'``.

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
from scipy import optimize
from scipy import stats

from dpjax import _validation

Accountant = Literal['rdp', 'pld', 'gdp']
ACCOUNTANTS: tuple[str, ...] = ('rdp', 'pld')
# 'gdp' (closed form, Gaussian compositions without subsampling) is accepted
# by epsilon() and calibrate_gaussian_composition() only.
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
  if accountant == 'gdp':
    return gdp_epsilon(gaussian_composition_mu(event), delta)
  acc = make_accountant(accountant, relation, pld_discretization)
  if not acc.supports(event):
    raise ValueError(
        f'the {accountant!r} accountant does not support the event {event}.'
    )
  with _quiet_dp_accounting():
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def with_initial(initial: dp_accounting.DpEvent | None,
                 event: dp_accounting.DpEvent | None
                 ) -> dp_accounting.DpEvent | None:
  """``initial`` (a release before training) composed with ``event``."""
  events = [e for e in (initial, event) if e is not None]
  if len(events) < 2:
    return events[0] if events else None
  return dp_accounting.ComposedDpEvent(events)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: Accountant = 'rdp',
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    tol: float = 1e-4,
    initial_event: dp_accounting.DpEvent | None = None,
) -> float:
  """Smallest noise multiplier (up to ``tol``) whose epsilon <= target.

  The result is on the safe side: epsilon at the returned sigma never exceeds
  ``target_epsilon``. ``initial_event``: a release made once before training
  (e.g. privately estimated normalization statistics), composed with the
  steps, so that the whole run meets the target.
  """
  target_epsilon = _validation.positive('target_epsilon', target_epsilon)
  check_delta(delta)
  check_accountant(accountant)
  if initial_event is not None:
    # RDP, also for 'pld': the search below brackets sigma with RDP first.
    alone = epsilon(initial_event, delta, 'rdp')
    if not alone < target_epsilon:
      raise ValueError(
          f'the release before training alone costs epsilon {alone:.4g} >='
          f' target_epsilon {target_epsilon}: raise its noise multiplier'
          ' (e.g. normalization.once_noise_multiplier).')

  def make_event(sigma):
    return with_initial(initial_event, dpsgd_event(sigma, sampling_rate, steps))

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


# RDP -> (epsilon, delta). dp-accounting's RdpAccountant (dpjax's 'rdp')
# uses the improved conversion of Canonne, Kamath & Steinke 2020 (Prop. 12)
# and Asoodeh et al. 2021; TF Privacy's older ``compute_dp_sgd_privacy``
# used the classic one of Mironov 2017 (Prop. 3), on these orders, with
# ceil(epochs N / B) steps. Both are valid upper bounds on epsilon; the
# classic one is looser, so the same run reads larger there.
CLASSIC_RDP_ORDERS: tuple[float, ...] = (
    (1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5)
    + tuple(float(a) for a in range(5, 64)) + (128.0, 256.0, 512.0))
RDP_CONVERSIONS: tuple[str, ...] = ('improved', 'classic')


class ClassicRdpAccountant(rdp.RdpAccountant):
  """RDP with the classic conversion: eps = min_a RDP(a) + log(1/delta)/(a-1).

  Reproduces the epsilons of TF Privacy's legacy ``compute_dp_sgd_privacy``
  (with its orders, :data:`CLASSIC_RDP_ORDERS`), e.g. 3.01 for N = 60000,
  B = 256, sigma = 1.1, 60 epochs, where the improved conversion gives 2.60.

  Examples:
    >>> import dp_accounting
    >>> from dpjax import accounting
    >>> acc = accounting.ClassicRdpAccountant()
    >>> _ = acc.compose(accounting.dpsgd_event(1.1, 256 / 60000, 14063))
    >>> round(acc.get_epsilon(1e-5), 3)
    3.009

  References:
    Mironov, 2017. Renyi Differential Privacy, Proposition 3.
    https://arxiv.org/abs/1702.07476
  """

  def __init__(self, orders=CLASSIC_RDP_ORDERS,
               neighboring_relation: dp_accounting.NeighboringRelation = (
                   dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)):
    super().__init__(orders, neighboring_relation)

  def get_epsilon_and_optimal_order(self, target_delta: float):
    delta = _validation.open_unit('delta', target_delta)
    orders, rdp_values = self.orders, self.rdp
    eps = rdp_values + math.log(1 / delta) / (orders - 1)
    best = int(eps.argmin())
    return float(max(0.0, eps[best])), float(orders[best])

  def get_epsilon(self, target_delta: float) -> float:
    return self.get_epsilon_and_optimal_order(target_delta)[0]


def rdp_epsilon(event: dp_accounting.DpEvent, delta: float,
                conversion: str = 'improved') -> tuple[float, float]:
  """``(epsilon, optimal order)`` of ``event`` by RDP with ``conversion``.

  ``'improved'`` is what :func:`epsilon` computes for ``'rdp'``;
  ``'classic'`` is :class:`ClassicRdpAccountant` (TF Privacy's legacy
  numbers).
  """
  if conversion not in RDP_CONVERSIONS:
    raise ValueError(
        f'conversion must be one of {RDP_CONVERSIONS}, got {conversion!r}.')
  check_delta(delta)
  if _has_zero_noise(event):
    return math.inf, math.nan
  acc = (ClassicRdpAccountant() if conversion == 'classic'
         else rdp.RdpAccountant())
  with _quiet_dp_accounting():
    acc.compose(event)
    eps, order = acc.get_epsilon_and_optimal_order(delta)
  return float(eps), float(order)


def calibrate_noise_multiplier_classic(target_epsilon: float, delta: float,
                                       sampling_rate: float, steps: int,
                                       tol: float = 1e-4) -> float:
  """:func:`calibrate_noise_multiplier` under the classic RDP conversion."""
  target_epsilon = _validation.positive('target_epsilon', target_epsilon)
  check_delta(delta)
  with _quiet_dp_accounting():
    return float(dp_accounting.calibrate_dp_mechanism(
        ClassicRdpAccountant,
        lambda sigma: dpsgd_event(sigma, sampling_rate, steps),
        target_epsilon, delta, dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        tol=tol))


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


# Gaussian differential privacy (Dong, Roth, Su 2022), for mechanisms that
# compose plain Gaussian releases without subsampling amplification: batch
# clipping with shuffling (van Dijk et al. 2022; Nguyen et al. 2023).


def gdp_delta(mu: float, epsilon: float) -> float:
  """delta(eps) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).

  Examples:
    >>> from dpjax import accounting
    >>> round(accounting.gdp_delta(1.0, 0.0), 4)  # = 2 Phi(1/2) - 1
    0.3829

  Args:
    mu: the GDP parameter (> 0).
    epsilon: epsilon >= 0.

  Returns:
    The smallest delta for which mu-GDP implies (epsilon, delta)-DP.

  References:
    Dong, Roth, Su, 2022. Gaussian Differential Privacy, Corollary 2.13.
    https://arxiv.org/abs/1905.02383
  """
  mu = _validation.positive('mu', mu)
  epsilon = _validation.non_negative('epsilon', epsilon)
  a = -epsilon / mu + mu / 2
  b = -epsilon / mu - mu / 2
  # e^eps Phi(b) in logs, so large epsilon neither overflows nor cancels.
  return float(stats.norm.cdf(a) - math.exp(epsilon + stats.norm.logcdf(b)))


def gdp_epsilon(mu: float, delta: float) -> float:
  """Smallest epsilon with mu-GDP => (epsilon, delta)-DP.

  Examples:
    >>> from dpjax import accounting
    >>> round(accounting.gdp_epsilon(1.666, 1e-5), 2)
    8.0

  Args:
    mu: the GDP parameter (> 0).
    delta: target delta in (0, 1).

  Returns:
    Epsilon (0 when mu is small enough that delta(0) <= delta).

  References:
    Dong, Roth, Su, 2022. Gaussian Differential Privacy.
    https://arxiv.org/abs/1905.02383
  """
  mu = _validation.positive('mu', mu)
  delta = _validation.open_unit('delta', delta)
  if gdp_delta(mu, 0.0) <= delta:
    return 0.0
  hi = 1.0
  while gdp_delta(mu, hi) > delta:
    hi *= 2
  return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi,
                               xtol=1e-12, rtol=1e-12))


def gdp_mu(epsilon: float, delta: float) -> float:
  """The largest mu whose mu-GDP guarantee implies (epsilon, delta)-DP.

  Examples:
    >>> from dpjax import accounting
    >>> round(accounting.gdp_mu(8.0, 1e-5), 3)
    1.666

  Args:
    epsilon: target epsilon > 0.
    delta: target delta in (0, 1).

  Returns:
    mu > 0.

  References:
    Dong, Roth, Su, 2022. Gaussian Differential Privacy.
    https://arxiv.org/abs/1905.02383
  """
  epsilon = _validation.positive('epsilon', epsilon)
  delta = _validation.open_unit('delta', delta)
  hi = 1.0
  while gdp_delta(hi, epsilon) < delta:
    hi *= 2
  return float(optimize.brentq(lambda m: gdp_delta(m, epsilon) - delta,
                               1e-6, hi, xtol=1e-12, rtol=1e-12))


def gaussian_composition_mu(event: dp_accounting.DpEvent) -> float:
  """mu of a composition of Gaussian mechanisms without subsampling.

  GaussianDpEvent(z) is (1/z)-GDP and mu's compose as sqrt(sum mu_i^2). Any
  other event (in particular a Poisson-subsampled one, whose amplification
  GDP's closed form does not cover) is refused.
  """
  if isinstance(event, dp_accounting.GaussianDpEvent):
    z = event.noise_multiplier
    return math.inf if z == 0 else 1.0 / z
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return math.sqrt(event.count) * gaussian_composition_mu(event.event)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return math.sqrt(sum(gaussian_composition_mu(e) ** 2
                         for e in event.events))
  raise ValueError(
      "the 'gdp' accountant covers compositions of Gaussian mechanisms"
      f' without subsampling (batch clipping with shuffling); got {event}.'
      " Use 'rdp' or 'pld' for Poisson-sampled DP-SGD.")


def gaussian_composition_event(noise_multiplier: float,
                               count: int) -> dp_accounting.DpEvent:
  """``count`` Gaussian releases of noise multiplier z (no subsampling)."""
  noise_multiplier = _validation.non_negative(
      'noise_multiplier', noise_multiplier)
  count = _validation.positive_int('count', count)
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(noise_multiplier), count)


def calibrate_gaussian_composition(
    target_epsilon: float,
    delta: float,
    count: int,
    accountant: str = 'gdp',
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    tol: float = 1e-4,
) -> float:
  """Smallest noise multiplier z whose ``count``-fold composition meets eps.

  With ``'gdp'`` this is the closed form z = sqrt(count) / mu(eps, delta)
  (e.g. eps = 8, delta = 1e-5: mu = 1.666, and count = 10 / 50 / 100 epochs
  need z = 1.90 / 4.24 / 6.00); ``'pld'`` and ``'rdp'`` search numerically.
  """
  target_epsilon = _validation.positive('target_epsilon', target_epsilon)
  check_delta(delta)
  count = _validation.positive_int('count', count)
  if accountant == 'gdp':
    return math.sqrt(count) / gdp_mu(target_epsilon, delta)
  check_accountant(accountant)
  make_event = lambda z: gaussian_composition_event(z, count)
  guess = math.sqrt(count) / gdp_mu(target_epsilon, delta)
  with _quiet_dp_accounting():
    return float(dp_accounting.calibrate_dp_mechanism(
        functools.partial(make_accountant, accountant,
                          pld_discretization=pld_discretization),
        make_event, target_epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(0.25 * guess, guess), tol=tol))


def batch_clipping_mu(noise_multiplier: float, epochs: int,
                      group_privacy: int = 1,
                      groups_per_step: int = 1) -> float:
  """GDP mu of batch clipping with shuffling, for a group of g examples.

  Each example is in at most one step per epoch, and a step's release is a
  Gaussian mechanism with sensitivity 2C per clipped group the changed
  examples fall into. For one example: mu = sqrt(E) / sigma. For g examples
  the worst case puts them into as few steps and as many distinct groups as
  possible: with K groups per step, sum over steps of (groups touched)^2 is
  at most floor(g/K) K^2 + (g mod K)^2. With K = 1 (the whole batch clipped
  once) that is g, the paper's sqrt(g E) / sigma; with g <= K it is g^2, so
  mu = g sqrt(E) / sigma (the paper's formula would understate it).

  Examples:
    >>> from dpjax import accounting
    >>> round(accounting.batch_clipping_mu(6.0, 100), 4)
    1.6667
    >>> round(accounting.batch_clipping_mu(6.0, 100, group_privacy=4), 4)
    3.3333
    >>> round(accounting.batch_clipping_mu(6.0, 100, 4, groups_per_step=16), 4)
    6.6667

  Args:
    noise_multiplier: sigma (noise std 2 C sigma on the sum of clipped
      groups).
    epochs: E, the number of epochs started.
    group_privacy: g, the number of examples that may change together.
    groups_per_step: K = s / m, clipped groups per step.

  Returns:
    mu (inf without noise).

  References:
    Nguyen, Nguyen, Nguyen, van Dijk, 2023. Batch Clipping and Adaptive
    Layerwise Clipping for Differential Private Stochastic Gradient Descent.
    https://arxiv.org/abs/2307.11939
  """
  sigma = _validation.non_negative('noise_multiplier', noise_multiplier)
  epochs = _validation.positive_int('epochs', epochs)
  g = _validation.positive_int('group_privacy', group_privacy)
  k = _validation.positive_int('groups_per_step', groups_per_step)
  if sigma == 0:
    return math.inf
  per_epoch = (g // k) * k * k + (g % k) ** 2
  return math.sqrt(epochs * per_epoch) / sigma


def split_noise_multiplier(noise_multiplier: float,
                           stats_budget: float) -> tuple[float, float]:
  """Gradient and statistics noise multipliers that cost one step at sigma.

  Two Gaussian releases on the same Poisson batch, the clipped gradient sum
  with noise sigma_g x C and the clipped statistics sum with noise
  sigma_s x C_s, are together one Gaussian mechanism with noise multiplier
  (sigma_g^-2 + sigma_s^-2)^-1/2 (rescale each by its noise std and stack
  them: one example moves the stack by at most that inverse). With
  sigma_g = sigma / sqrt(1 - share) and sigma_s = sigma / sqrt(share), that is
  sigma, so the accountant's per-step event is unchanged.

  Examples:
    >>> g, s = split_noise_multiplier(1.0, 0.2)
    >>> round(g, 4), round(s, 4), round((g ** -2 + s ** -2) ** -0.5, 6)
    (1.118, 2.2361, 1.0)
  """
  sigma = _validation.positive('noise_multiplier', noise_multiplier)
  share = _validation.open_unit('stats_share', stats_budget)
  return sigma / math.sqrt(1 - share), sigma / math.sqrt(share)
