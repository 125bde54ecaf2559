"""Empirical privacy auditing: lower bounds on epsilon from canaries.

A DP guarantee is an upper bound; an audit measures a lower bound from what an
attacker can actually infer. If the lower bound exceeds the claimed epsilon,
the implementation (clipping, noise, sampling or accounting) is broken.

Implements
* the one-run estimator of Steinke, Nasr & Jagielski 2023, "Privacy Auditing
  with One (1) Training Run" (NeurIPS): m canaries, each included independently
  with probability 1/2; the auditor guesses inclusion for the r canaries with
  the most extreme scores; v correct guesses are unlikely under (eps, delta)-DP
  when eps is too small (their Theorem 3.1 / Proposition 5.2 p-value);
* Clopper-Pearson bounds for multi-run audits (Jagielski, Ullman, Oprea 2020;
  Nasr et al. 2021): false-positive and false-negative rates of a fixed
  threshold over runs with and without one canary;
* white-box gradient canaries run through dpjax's own sampler, clipping,
  engine and noise transform (:func:`gradient_canary_audit`), so that the
  audit exercises the code path users train with.

Privacy invariants checked, not owned: 1 (sensitivity: an unclipped canary is
caught), 2 (noise scale: under-noised steps are caught) and 4 (the accountant
matches the sampler: the claimed epsilon comes from the same plan).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats
import tqdm

from dpjax import accounting
from dpjax import clipping as clipping_lib
from dpjax import keys as keys_lib
from dpjax import noise as noise_lib
from dpjax import per_example
from dpjax import sampling


def one_run_p_value(m: int, r: int, v: int, epsilon: float,
                    delta: float) -> float:
  """P-value of v or more correct guesses out of r under (epsilon, delta)-DP.

  Steinke, Nasr & Jagielski 2023 (Theorem 3.1 with the delta correction of
  their Proposition 5.2): under (eps, delta)-DP the number of correct guesses
  is dominated by Binomial(r, e^eps / (1 + e^eps)) up to a term linear in
  delta.

  Args:
    m: number of canaries, each included independently with probability 1/2.
    r: number of guesses made (abstentions excluded).
    v: number of correct guesses.
    epsilon: the epsilon of the null hypothesis.
    delta: the delta of the null hypothesis.

  Returns:
    The p-value (at most 1).
  """
  if not 0 <= v <= r <= m:
    raise ValueError(f'need 0 <= v <= r <= m, got v={v}, r={r}, m={m}.')
  q = 1.0 / (1.0 + math.exp(-epsilon))
  beta = stats.binom.sf(v - 1, r, q)
  # alpha = max_i P[v - i <= Bin(r, q) < v] / i: the worst case of spending
  # the delta slack on i guesses.
  tail = np.cumsum(stats.binom.pmf(v - np.arange(1, v + 1), r, q))
  alpha = float(np.max(tail / np.arange(1, v + 1))) if v > 0 else 0.0
  return float(min(1.0, beta + alpha * delta * 2 * m))


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                                confidence: float = 0.95) -> float:
  """Largest epsilon rejected at ``confidence`` by v correct guesses of r.

  Examples:
    >>> from dpjax import audit
    >>> round(audit.one_run_epsilon_lower_bound(1000, 200, 200, 0.0), 2)
    4.19
    >>> audit.one_run_epsilon_lower_bound(1000, 200, 100, 1e-5)
    0.0

  Args:
    m: number of canaries.
    r: number of guesses.
    v: number of correct guesses.
    delta: delta of the claimed guarantee.
    confidence: confidence of the bound (0.95: wrong at most 5% of the time).

  Returns:
    epsilon_lb >= 0 such that the mechanism is not (epsilon_lb, delta)-DP
    with the given confidence.
  """
  alpha = 1.0 - confidence
  if one_run_p_value(m, r, v, 0.0, delta) >= alpha:
    return 0.0
  lo, hi = 0.0, 1.0
  while one_run_p_value(m, r, v, hi, delta) < alpha:
    lo, hi = hi, 2 * hi
  for _ in range(50):
    mid = 0.5 * (lo + hi)
    if one_run_p_value(m, r, v, mid, delta) < alpha:
      lo = mid
    else:
      hi = mid
  return lo


class OneRunResult(NamedTuple):
  """Guesses and bound of a one-run audit."""

  epsilon_lower_bound: float
  num_canaries: int
  num_guesses: int
  num_correct: int


def one_run_audit(scores: np.ndarray, included: np.ndarray, num_positive: int,
                  num_negative: int, delta: float,
                  confidence: float = 0.95) -> OneRunResult:
  """Guesses 'in' for the top scores and 'out' for the bottom ones, then bounds.

  The numbers of guesses must be fixed before looking at the scores (choosing
  them afterwards would invalidate the p-value).
  """
  scores = np.asarray(scores, np.float64)
  included = np.asarray(included, bool)
  m = len(scores)
  if included.shape != (m,):
    raise ValueError('scores and included must have the same length.')
  if num_positive + num_negative > m:
    raise ValueError(
        f'{num_positive} + {num_negative} guesses exceed {m} canaries.')
  order = np.argsort(scores)
  guessed_in = order[m - num_positive:] if num_positive else order[:0]
  guessed_out = order[:num_negative]
  correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
  r = num_positive + num_negative
  return OneRunResult(
      one_run_epsilon_lower_bound(m, r, correct, delta, confidence), m, r,
      correct)


def clopper_pearson_epsilon_lower_bound(
    false_positives: int, negatives: int, false_negatives: int,
    positives: int, delta: float, confidence: float = 0.95) -> float:
  """Epsilon lower bound from a membership test's error rates over many runs.

  Under (eps, delta)-DP every test satisfies FPR + e^eps FNR >= 1 - delta (and
  symmetrically); with Clopper-Pearson upper bounds on both rates (each at
  (1 - confidence) / 2) this gives a bound holding with ``confidence``.

  Examples:
    >>> from dpjax import audit
    >>> round(audit.clopper_pearson_epsilon_lower_bound(5, 500, 5, 500, 0.0), 2)
    3.74

  Args:
    false_positives: runs WITHOUT the canary that the test called 'in'.
    negatives: runs without the canary.
    false_negatives: runs WITH the canary that the test called 'out'.
    positives: runs with the canary.
    delta: delta of the claimed guarantee.
    confidence: confidence of the bound.

  Returns:
    The lower bound (0 when the test does no better than chance).
  """
  alpha = (1.0 - confidence) / 2

  def upper(k, n):
    return 1.0 if k >= n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))

  fpr, fnr = upper(false_positives, negatives), upper(false_negatives,
                                                      positives)
  bounds = [0.0]
  for a, b in ((fpr, fnr), (fnr, fpr)):
    if 1 - delta - a > 0 and b > 0:
      bounds.append(math.log((1 - delta - a) / b))
  return max(bounds)


def unclipped(bound: float) -> clipping_lib.PerExampleClipping:
  """A deliberately BROKEN clipping: sums without clipping, claims ``bound``.

  For validating an audit, never for training: noise scaled to the claimed
  bound is far too small for the unclipped sum, and an audit must flag it
  (``scripts/audit.py``, ``tests/test_audit.py``).
  """

  def clip_fn(grads, state, mask):
    norms = clipping_lib.per_example_global_norms(grads)
    mask = clipping_lib.as_mask(mask, norms.shape[0])
    total = clipping_lib.scale_and_sum(grads, jnp.ones(norms.shape), mask)
    return clipping_lib.ClipOutput(total, norms, 0, 0), state

  return clipping_lib.make_per_example_clipping(
      optax.init_empty_state, clip_fn, bound, 'no_clip')


def _canary_loss(canary_norm: float, num_canaries: int):
  """Loss whose gradient for example i is ``canary_norm`` e_i (a Dirac canary).

  Canaries on separate coordinates never interfere, and the final parameters
  are a sufficient statistic of all iterates: coordinate i holds exactly the
  noise plus canary i's clipped contributions.
  """

  def loss_fn(w, canary_id):
    return canary_norm * jnp.dot(w, jax.nn.one_hot(canary_id, num_canaries))

  return loss_fn


def train_canaries(
    included: np.ndarray,
    clipping: clipping_lib.PerExampleClipping,
    noise_tx: optax.GradientTransformation,
    *,
    sampling_rate: float,
    steps: int,
    canary_norm: float,
    microbatch_size: int | None = None,
    keys: keys_lib.KeySchedule,
    progress: bool = False,
) -> np.ndarray:
  """DP-SGD on Dirac canaries; returns the per-canary scores.

  The private dataset is the set of included canaries; each step draws a
  Poisson batch from it with dpjax's sampler, computes the clipped sum with
  dpjax's engine and adds noise with ``noise_tx``. Score i is the total
  movement of coordinate i against canary i's gradient, in units of the
  expected batch's divisor (so the noise has the same scale for all i).
  The sampler draws from ``keys``' sampler stream.
  """
  included = np.asarray(included, bool)
  num_canaries = len(included)
  ids = np.flatnonzero(included).astype(np.int32)
  if len(ids) == 0:
    raise ValueError('no canary is included; use more canaries.')
  sampler = sampling.PoissonSampler(len(ids), sampling_rate * len(ids),
                                    key=keys.root(keys_lib.SAMPLER))
  grad_fn = per_example.clipped_grad(
      _canary_loss(canary_norm, num_canaries), clipping,
      microbatch_size=microbatch_size)
  tx = optax.chain(noise_tx, optax.sgd(1.0))

  @jax.jit
  def step(w, opt_state, batch_ids, mask):
    out = grad_fn(w, batch_ids, mask)
    updates, opt_state = tx.update(out.grad_sum, opt_state, w)
    return optax.apply_updates(w, updates), opt_state

  w = jnp.zeros(num_canaries)
  opt_state = tx.init(w)
  for t in tqdm.trange(steps, desc='audit', disable=not progress):
    batch = sampler.sample(t)
    w, opt_state = step(w, opt_state, ids[batch.indices], batch.mask)
  return -np.asarray(w) * sampler.expected_batch_size / canary_norm


class CanaryAuditResult(NamedTuple):
  """Claimed epsilon next to the measured lower bound."""

  claimed_epsilon: float
  epsilon_lower_bound: float
  num_canaries: int
  num_guesses: int
  num_correct: int
  scores: np.ndarray
  included: np.ndarray

  @property
  def violation(self) -> bool:
    """True when the measured lower bound exceeds the claimed epsilon."""
    return self.epsilon_lower_bound > self.claimed_epsilon


def gradient_canary_audit(
    clipping: clipping_lib.PerExampleClipping,
    noise_multiplier: float,
    *,
    noise_tx: optax.GradientTransformation | None = None,
    num_canaries: int = 1000,
    guess_fraction: float = 0.1,
    sampling_rate: float = 1.0,
    steps: int = 1,
    canary_norm: float | None = None,
    delta: float = 1e-5,
    accountant: accounting.Accountant = 'rdp',
    confidence: float = 0.95,
    microbatch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> CanaryAuditResult:
  """One-run audit of a clipping + noise mechanism with gradient canaries.

  The CLAIMED epsilon is what dpjax's accountant reports for Poisson sampling
  at ``sampling_rate``, ``noise_multiplier`` and ``steps``. By default the noise
  is :func:`dpjax.add_gaussian_noise` at that multiplier and the clipping's own
  sensitivity; pass ``noise_tx`` (or a broken ``clipping``) to audit something
  else against the same claim. Canary gradients have norm ``canary_norm``
  (default: 10x the clipping's bound, so missing clipping shows).

  Args:
    clipping: the clipping transform under audit.
    noise_multiplier: sigma used for the claimed epsilon (and the default
      noise).
    noise_tx: the noise transform under audit (default: the correct one).
    num_canaries: m; each included with probability 1/2.
    guess_fraction: fraction of canaries guessed 'in' (top scores) and,
      separately, 'out' (bottom scores); fixed before seeing the scores.
    sampling_rate: Poisson rate q of each step.
    steps: number of DP-SGD steps T.
    canary_norm: norm of each canary's gradient.
    delta: delta of the claimed guarantee.
    accountant: 'rdp' or 'pld' for the claimed epsilon.
    confidence: confidence of the lower bound.
    microbatch_size: engine microbatching (exercised, never changes results).
    seed: seed of the audit's key schedule (public and secret): canary
      inclusion, sampling and the default noise each take their own stream.
    progress: show a progress bar.

  Returns:
    A :class:`CanaryAuditResult`; ``violation`` is True when the lower bound
    exceeds the claim.

  References:
    Steinke, Nasr, Jagielski 2023. Privacy Auditing with One (1) Training Run.
    https://arxiv.org/abs/2305.08846
  """
  keys = keys_lib.KeySchedule(seed, seed)
  included = keys.rng(keys_lib.CANARY).random(num_canaries) < 0.5
  if noise_tx is None:
    noise_tx = noise_lib.add_gaussian_noise(
        noise_multiplier, clipping.sensitivity(),
        sampling_rate * included.sum(), key=keys.root(keys_lib.NOISE))
  if canary_norm is None:
    canary_norm = 10.0 * clipping.l2_bound
  scores = train_canaries(
      included, clipping, noise_tx, sampling_rate=sampling_rate, steps=steps,
      canary_norm=canary_norm, microbatch_size=microbatch_size, keys=keys,
      progress=progress)
  claimed = accounting.epsilon(
      accounting.dpsgd_event(noise_multiplier, sampling_rate, steps), delta,
      accountant)
  k = int(guess_fraction * num_canaries)
  result = one_run_audit(scores, included, k, k, delta, confidence)
  return CanaryAuditResult(claimed, result.epsilon_lower_bound, num_canaries,
                           result.num_guesses, result.num_correct, scores,
                           included)


def multi_run_audit(
    run: Callable[[int, bool], float],
    num_runs: int,
    threshold: float,
    delta: float,
    confidence: float = 0.95,
    progress: bool = False,
) -> float:
  """Clopper-Pearson lower bound from ``num_runs`` runs with/without a canary.

  ``run(seed, include)`` trains once (with the canary when ``include``) and
  returns the canary's score; the test says 'in' when score > ``threshold``
  (fixed before the runs). Half the runs include the canary.
  """
  fp = fn = 0
  half = num_runs // 2
  for i in tqdm.trange(2 * half, desc='audit runs', disable=not progress):
    include = i % 2 == 0
    guess_in = run(i, include) > threshold
    fp += int(guess_in and not include)
    fn += int(include and not guess_in)
  return clopper_pearson_epsilon_lower_bound(fp, half, fn, half, delta,
                                             confidence)
