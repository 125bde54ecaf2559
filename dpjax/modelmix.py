"""ModelMix: secret mixing of the last two model states, and its accountant.

Implements Xiao, Wan, Devadas 2022, "Differentially Private Deep Learning with
ModelMix" (arXiv 2210.03843). Each step moves every coordinate to a secret
random point of the segment between the two previous model states (pushed at
least ``tau`` apart), then takes the noisy SGD step:

    w_k = alpha * w_{k-1} + (1 - alpha) * w_{k-2} - eta * noisy_gradient,
    alpha ~ U[0, 1] fresh per coordinate and step.

Three pieces live here:

* :func:`mix_model_states`, the mixing as an optax transform placed after
  plain SGD;
* :func:`clip_l2_then_linf`, the refined clipping of the paper's Algorithm 2
  (L2 clip to c, then clamp every coordinate to c / sqrt(p));
* :func:`modelmix_epsilon`, the numerical accountant of Theorem 4.1 /
  Corollary 4.1 (add/remove adjacency), and :func:`failed_assumptions`, which
  says when that accountant does not describe the pipeline.

Privacy invariant owned here: ModelMix is post-processing of DP-SGD, so the
standard epsilon always holds and is always reported; the ModelMix epsilon is
reported beside it, labelled, and only when the run matches the analysis
(plain constant-rate SGD without momentum, every coordinate mixed, L2 then
L-inf clipping, one Poisson draw per step, no other release). The mixing key
must be independent of the noise key: the analysis needs alpha secret.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, NamedTuple, Sequence

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special

from dpjax import _validation
from dpjax import accounting
from dpjax import clipping as clipping_lib
from dpjax import keys as keys_lib
from dpjax import noise as noise_lib
from dpjax import plan as plan_lib

PyTree = Any
NeighboringRelation = dp_accounting.NeighboringRelation

# The accountant's integer Renyi orders (PAPERS.md section 3).
DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 20))
# Quadrature of Theorem 4.1: step sbar / 25, tails 8 sbar beyond the support.
_STEPS_PER_SIGMA = 25
_TAIL_SIGMAS = 8.0
# Beyond 40 sbar from an edge both densities equal 1 / w in float64 (the
# Gaussian tail is below 1e-300), so those grid points are summed in closed
# form: the cost stays bounded however wide the uniform part is.
_FLAT_SIGMAS = 40.0


class ModelMixState(NamedTuple):
  """State of :func:`mix_model_states`.

  Attributes:
    previous_params: w_{k-2}, the parameters before the last update.
    key: the stream root of alpha; draw t uses ``keys.for_step(key, count)``.
    count: number of draws so far.
  """

  previous_params: PyTree
  key: jax.Array
  count: jax.Array


def enforce_gap(current: jax.Array, previous: jax.Array,
                tau: float) -> tuple[jax.Array, jax.Array]:
  """Pushes coordinates closer than ``tau`` apart by tau / 2 each.

  Where |current - previous| < tau, ``current`` moves by +s tau/2 and
  ``previous`` by -s tau/2 with s the sign of the difference; s = +1 where
  the two are equal, so equal coordinates end exactly tau apart (a sign of 0
  would leave them equal and the mixing would add nothing).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dpjax import modelmix
    >>> a, b = modelmix.enforce_gap(jnp.array([1.0, 0.0, 2.0]),
    ...                             jnp.array([1.0, 0.1, 0.0]), 0.5)
    >>> [round(v, 4) for v in a.tolist()], [round(v, 4) for v in b.tolist()]
    ([1.25, -0.25, 2.0], [0.75, 0.35, 0.0])

  Args:
    current: w_{k-1}.
    previous: w_{k-2}, same shape.
    tau: the minimum gap, > 0.

  Returns:
    The gap-enforced pair ``(current, previous)``.
  """
  diff = current - previous
  sign = jnp.where(diff >= 0, 1.0, -1.0).astype(current.dtype)
  push = jnp.where(jnp.abs(diff) < tau, sign * (tau / 2), 0).astype(
      current.dtype)
  return current + push, previous - push


def mix_model_states(tau: float,
                     key: jax.Array | int) -> optax.GradientTransformation:
  """Mixes the last two model states with a secret alpha, then takes the step.

  Place it LAST, after plain SGD, e.g. ``optax.chain(plan.noise(k1),
  optax.sgd(eta), dpjax.mix_model_states(tau, k2))``: it acts on parameters,
  so it must see the final step. It receives the SGD step
  ``u = -eta * noisy_gradient`` and the current parameters w_{k-1}, keeps
  w_{k-2} in its state, and returns ``w_k - w_{k-1}`` so that
  ``optax.apply_updates`` yields

      w_k = alpha * w'_{k-1} + (1 - alpha) * w'_{k-2} + u,

  where (w'_{k-1}, w'_{k-2}) is the pair after :func:`enforce_gap` and
  alpha ~ U[0, 1] is drawn afresh for every coordinate of every leaf at every
  step. Every coordinate is mixed. The first step mixes w_0 with itself, i.e.
  adds a secret U[-tau/2, tau/2] offset, so no step goes unmixed.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import dpjax
    >>> mix = dpjax.mix_model_states(tau=0.01, key=0)
    >>> tx = optax.chain(optax.sgd(0.1), mix)
    >>> params = {'w': jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> bool(jnp.all(jnp.abs(new['w'] + 0.1) <= 0.005))
    True

  Args:
    tau: the minimum gap between the two mixed states, in parameter units
      (the paper uses tau = 0.15 * eta).
    key: PRNG key (or integer seed) of alpha. It must be independent of the
      noise key; alpha must stay secret.

  Returns:
    An optax ``GradientTransformation`` with :class:`ModelMixState`; its
    ``update`` requires ``params``.

  References:
    Xiao, Wan, Devadas, 2022. Differentially Private Deep Learning with
    ModelMix. https://arxiv.org/abs/2210.03843
  """
  tau = _validation.positive('tau', tau)
  root = noise_lib.as_key(key)

  def init_fn(params):
    # A copy, not an alias: a training step may donate the params' buffers.
    return ModelMixState(
        jax.tree.map(lambda x: jnp.array(x, copy=True), params),
        *keys_lib.init_stream(root))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          'mix_model_states needs the current parameters: call'
          ' tx.update(updates, state, params).')
    draw_key = keys_lib.for_step(state.key, state.count)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(draw_key, len(leaves))
    alphas = jax.tree.unflatten(treedef, [
        jax.random.uniform(k, jnp.shape(w), jnp.float32)
        for k, w in zip(keys, leaves)])

    def one(w, prev, u, alpha):
      a, b = enforce_gap(w.astype(jnp.float32), prev.astype(jnp.float32), tau)
      mixed = b + alpha * (a - b)
      return (mixed - w + u).astype(u.dtype)

    new_updates = jax.tree.map(one, params, state.previous_params, updates,
                               alphas)
    return new_updates, ModelMixState(params, state.key, state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


@dataclasses.dataclass(frozen=True, kw_only=True)
class L2ThenLinfSpec(clipping_lib.ClipSpec):
  """:class:`dpjax.clipping.ClipSpec` of :func:`clip_l2_then_linf`.

  Attributes:
    p: the exponent of the L-inf bound c / sqrt(p).
    linf_bound: c / sqrt(p), the bound on every coordinate of a row.
  """

  p: float
  linf_bound: float


class L2ThenLinfClipping(clipping_lib.PerExampleClipping):
  """L2 then L-inf clipping, with its ``p`` and ``linf_bound``.

  The L-inf clamp acts on every coordinate of every per-example gradient,
  so it has no ``scales_from_norms``: it runs on the vmap route.
  """

  spec_type = L2ThenLinfSpec
  spec: L2ThenLinfSpec
  p = property(lambda self: self.spec.p)
  linf_bound = property(lambda self: self.spec.linf_bound)


def clip_l2_then_linf(l2_norm_clip: float, p: float) -> L2ThenLinfClipping:
  """Clips each example to L2 norm c, then clamps each coordinate to c/sqrt(p).

  The paper's Algorithm 2. The order matters: clamping first and L2-clipping
  after would not bound the coordinates by c / sqrt(p). The clamp never
  increases a coordinate's magnitude, so the L2 bound c, hence the declared
  sensitivity, still holds; the L-inf bound c / sqrt(p) is what the ModelMix
  accountant uses. Padding rows and non-finite rows contribute exactly zero.
  ``p = 1`` is plain flat clipping.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dpjax
    >>> clip = dpjax.clip_l2_then_linf(1.0, p=4.0)
    >>> grads = {'w': jnp.array([[10.0, 1.0], [jnp.nan, 0.0]])}
    >>> summed, _ = clip.update(grads, clip.init(None))
    >>> [round(float(v), 4) for v in summed['w']], clip.sensitivity()
    ([0.5, 0.0995], 1.0)

  Args:
    l2_norm_clip: c > 0, the bound on each example's global L2 norm.
    p: >= 1; each coordinate is clamped to c / sqrt(p).

  Returns:
    An :class:`L2ThenLinfClipping` named 'l2_then_linf' (``p`` and
    ``linf_bound`` are declared in its spec).

  References:
    Xiao, Wan, Devadas, 2022. Differentially Private Deep Learning with
    ModelMix, Algorithm 2. https://arxiv.org/abs/2210.03843
  """
  bound = _validation.positive('l2_norm_clip', l2_norm_clip)
  p = _validation.positive('p', p)
  if p < 1:
    raise ValueError(
        f'p must be >= 1 (the L-inf bound is c / sqrt(p) <= c), got {p!r}.')
  linf = bound / math.sqrt(p)
  return clipping_lib.global_rule_clipping(
      bound, 'l2_then_linf', clipping_lib.flat_scale(bound),
      lambda n: n > bound, elementwise=lambda x: jnp.clip(x, -linf, linf),
      cls=L2ThenLinfClipping, p=p, linf_bound=linf)


def _log_p0(x: np.ndarray, sbar: float, w: float) -> np.ndarray:
  """log density of N(0, sbar^2) * U[-w/2, w/2], accurate in both tails.

  Phi(b) - Phi(a) is evaluated on the left of the symmetric density, where
  both terms are small, so it never cancels to 0 in the right tail.
  """
  a = np.abs(x)
  hi = special.log_ndtr((w / 2 - a) / sbar)
  lo = special.log_ndtr((-w / 2 - a) / sbar)
  return hi + np.log1p(-np.exp(lo - hi)) - math.log(w)


@functools.lru_cache(maxsize=128)
def log_moments(sbar: float, w: float, shift: float, p: float,
                max_order: int) -> tuple[float, ...]:
  """log A_k, k = 0..max_order, of Theorem 4.1; cached (independent of T).

  A_k = (E_{z~P0}[(P1(z) / P0(z))^k])^p with P0 = N(0, sbar^2) * U[-w/2, w/2]
  and P1 = P0 shifted by ``shift``, by a Riemann sum of step sbar / 25 on
  [-w/2 - 8 sbar, w/2 + 8 sbar + max_order * shift]. The integrand of order k
  peaks near w/2 + k * shift, so the grid reaches 8 sbar beyond the peak of
  the highest order; a grid cut at w/2 + 8 sbar + shift truncates the high
  orders and would understate them.

  Args:
    sbar: noise std on the averaged gradient, sigma * c / B.
    w: the uniform width in gradient units, tau / eta.
    shift: per-coordinate sensitivity of the averaged gradient, c/(sqrt(p) B).
    p: exponent: the number of coordinates the L2 budget can spread over.
    max_order: largest k.

  Returns:
    The tuple (log A_0, ..., log A_max_order).
  """
  dx = sbar / _STEPS_PER_SIGMA
  lo = -w / 2 - _TAIL_SIGMAS * sbar
  hi = w / 2 + _TAIL_SIGMAS * sbar + max(1, max_order) * shift
  n = int(math.floor((hi - lo) / dx)) + 1
  # Grid indices whose points are >= 40 sbar inside the support of both
  # densities: there P0 = P1 = 1 / w exactly, so each adds dx / w for every k.
  first_flat = math.ceil((-w / 2 + shift + _FLAT_SIGMAS * sbar - lo) / dx)
  last_flat = math.floor((w / 2 - _FLAT_SIGMAS * sbar - lo) / dx)
  if last_flat >= first_flat:
    index = np.concatenate([np.arange(0, first_flat),
                            np.arange(last_flat + 1, n)])
    flat_mass = (last_flat - first_flat + 1) * dx / w
  else:
    index, flat_mass = np.arange(n), 0.0
  x = lo + index * dx
  log_p0 = _log_p0(x, sbar, w)
  log_ratio = _log_p0(x - shift, sbar, w) - log_p0
  ks = np.arange(max_order + 1)[:, None]
  log_edge = special.logsumexp(log_p0 + ks * log_ratio, axis=1) + math.log(dx)
  log_mean = np.logaddexp(log_edge, math.log(flat_mass)) if flat_mass else (
      log_edge)
  return tuple(float(v) for v in p * log_mean)


def modelmix_epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    clip_norm: float,
    expected_batch_size: float,
    tau_over_lr: float,
    p: float,
    delta: float,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> float:
  """Epsilon of DP-SGD + ModelMix by Theorem 4.1 / Corollary 4.1.

  With sbar = sigma c / B, w = tau / eta and shift = c / (sqrt(p) B):

      eps = min over integer orders a of
            [T log sum_{k=0..a} C(a, k) (1-q)^(a-k) q^k A_k + log(1/delta)]
            / (a - 1),

  with A_k from :func:`log_moments` (computed once per setting and cached, so
  calls along a progress bar cost microseconds). Add/remove adjacency. As
  w -> 0 this is the integer-order RDP bound of the Poisson-subsampled
  Gaussian.

  Examples:
    >>> from dpjax import modelmix
    >>> eps = modelmix.modelmix_epsilon(
    ...     noise_multiplier=0.335, sampling_rate=0.03, steps=3400,
    ...     clip_norm=20.0, expected_batch_size=1500, tau_over_lr=0.15, p=100,
    ...     delta=1e-5)
    >>> round(eps, 2)
    8.0

  Args:
    noise_multiplier: sigma; the noise std on the clipped sum is sigma * c.
    sampling_rate: q, the Poisson rate.
    steps: T.
    clip_norm: c, the L2 clip norm.
    expected_batch_size: B, the public divisor of the noisy sum.
    tau_over_lr: w = tau / eta (constant learning rate eta).
    p: the L-inf clamp is c / sqrt(p) (p = 1: flat clipping).
    delta: target delta.
    orders: the integer Renyi orders to minimize over (>= 2).

  Returns:
    Epsilon (inf when noise_multiplier is 0).

  References:
    Xiao, Wan, Devadas, 2022. Differentially Private Deep Learning with
    ModelMix, Theorem 4.1 and Corollary 4.1. https://arxiv.org/abs/2210.03843
  """
  sigma = _validation.non_negative('noise_multiplier', noise_multiplier)
  q = _validation.as_real('sampling_rate', sampling_rate)
  if not 0 < q <= 1:
    raise ValueError(f'sampling_rate must lie in (0, 1], got {q!r}.')
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or (
      steps < 0):
    raise ValueError(f'steps must be an integer >= 0, got {steps!r}.')
  c = _validation.positive('clip_norm', clip_norm)
  b = _validation.positive('expected_batch_size', expected_batch_size)
  w = _validation.positive('tau_over_lr', tau_over_lr)
  p = _validation.positive('p', p)
  delta = accounting.check_delta(delta)
  orders = sorted({int(a) for a in orders})
  if not orders or orders[0] < 2:
    raise ValueError(f'orders must be integers >= 2, got {orders!r}.')
  if steps == 0:
    return 0.0
  if sigma == 0:
    return math.inf

  log_a = np.array(log_moments(sigma * c / b, w, c / (math.sqrt(p) * b), p,
                               orders[-1]))
  return min(_epsilon_at_order(log_a, a, q, steps, delta) for a in orders)


def _epsilon_at_order(log_a: np.ndarray, order: int, q: float, steps: int,
                      delta: float) -> float:
  """[T log sum_k C(a, k) (1-q)^(a-k) q^k A_k + log(1/delta)] / (a - 1)."""
  ks = np.arange(order + 1)
  log_terms = (special.gammaln(order + 1) - special.gammaln(ks + 1)
               - special.gammaln(order - ks + 1)
               + special.xlog1py(order - ks, -q) + special.xlogy(ks, q)
               + log_a[:order + 1])
  log_sum = float(special.logsumexp(log_terms))
  return (steps * log_sum + math.log(1 / delta)) / (order - 1)


def clipping_p(clipping: clipping_lib.PerExampleClipping) -> float | None:
  """The p of the L-inf bound c / sqrt(p) a clipping guarantees, if any.

  Flat L2 clipping to c bounds every coordinate by c too, so it is p = 1.
  """
  if isinstance(clipping, L2ThenLinfClipping):
    return clipping.p
  if clipping.name == 'flat':
    return 1.0
  return None


def failed_assumptions(
    *,
    optimizer: str,
    momentum: float | None,
    constant_learning_rate: bool,
    clipping: clipping_lib.PerExampleClipping,
    poisson_sampling: bool,
    relation: NeighboringRelation,
) -> list[str]:
  """The assumptions of the ModelMix analysis that a pipeline breaks.

  The ModelMix epsilon is valid only for: plain SGD without momentum at a
  constant learning rate (alpha is secret, so a momentum buffer is not
  post-processing of the released noisy gradients, and w = tau / eta needs
  one eta); every coordinate mixed (:func:`mix_model_states` always mixes all);
  L2-then-L-inf clipping (or flat clipping, p = 1); one Poisson draw per step
  under add/remove adjacency. (The last one, no data-dependent release besides
  the noisy gradients, is checked on the ledger by :class:`ModelMixReport`.)

  Examples:
    >>> import dpjax
    >>> from dpjax import modelmix
    >>> modelmix.failed_assumptions(
    ...     optimizer='sgd', momentum=0.9, constant_learning_rate=True,
    ...     clipping=dpjax.clip_l2_then_linf(1.0, 100), poisson_sampling=True,
    ...     relation=modelmix.NeighboringRelation.ADD_OR_REMOVE_ONE)
    ['plain SGD without momentum: optimizer.momentum is 0.9']

  Args:
    optimizer: the optimizer's name ('sgd' is the only one covered).
    momentum: its momentum (0 or None for plain SGD).
    constant_learning_rate: False under a learning-rate schedule.
    clipping: the clipping transform that ran.
    poisson_sampling: whether each step's batch is one Poisson draw.
    relation: the neighbouring relation of the standard accountant.

  Returns:
    One line per failed assumption, naming it; empty when all hold.
  """
  failed = []
  if optimizer != 'sgd':
    failed.append(f'plain SGD without momentum: optimizer is {optimizer!r}')
  elif momentum:
    failed.append(
        f'plain SGD without momentum: optimizer.momentum is {momentum!r}')
  if not constant_learning_rate:
    failed.append('a constant learning rate: a schedule changes tau / eta')
  if clipping_p(clipping) is None:
    failed.append(
        f'L2-then-L-inf clipping: clipping is {clipping.name!r}')
  if not poisson_sampling:
    failed.append('one Poisson draw per step: the sampler is not Poisson')
  if NeighboringRelation(relation) != NeighboringRelation.ADD_OR_REMOVE_ONE:
    failed.append(
        f'add/remove adjacency: the relation is {relation.name.lower()}')
  return failed


@dataclasses.dataclass(frozen=True)
class ModelMixAccountant:
  """The ModelMix epsilon of a DP-SGD plan whose steps end with the mixing.

  Attributes:
    plan: the DP-SGD plan (Poisson rate, noise multiplier, clipping, delta).
    tau_over_lr: w = tau / eta.
    orders: integer Renyi orders minimized over.
  """

  plan: plan_lib.DPPlan
  tau_over_lr: float
  orders: tuple[int, ...] = DEFAULT_ORDERS

  @property
  def p(self) -> float:
    p = clipping_p(self.plan.clipping)
    if p is None:
      raise ValueError(
          f'the ModelMix accountant needs L2-then-L-inf (or flat) clipping; the'
          f' plan clips with {self.plan.clipping.name!r}.')
    return p

  def epsilon(self, steps: int | None = None) -> float:
    """ModelMix epsilon after ``steps`` steps (default: the whole run)."""
    plan = self.plan
    return modelmix_epsilon(
        noise_multiplier=plan.noise_multiplier,
        sampling_rate=plan.sampling_rate,
        steps=plan.num_steps if steps is None else steps,
        clip_norm=plan.clipping.l2_bound,
        expected_batch_size=plan.config.expected_batch_size,
        tau_over_lr=self.tau_over_lr, p=self.p, delta=plan.config.delta,
        orders=self.orders)

  def ledger_epsilon(self, ledger: accounting.PrivacyLedger) -> float | None:
    """ModelMix epsilon of a ledger; None if it holds any other release.

    The analysis covers the noisy gradient steps only, so a ledger with
    another event (noised statistics, clip-count queries) has no ModelMix
    epsilon; its standard epsilon still holds.
    """
    if self.other_releases(ledger):
      return None
    return self.epsilon(sum(count for _, count in ledger.entries))

  def other_releases(self, ledger: accounting.PrivacyLedger) -> int:
    """Number of events in ``ledger`` that are not this plan's steps."""
    step_event = self.plan.step_event()
    return sum(count for event, count in ledger.entries
               if event != step_event)


class ModelMixReport:
  """The ModelMix epsilon of a training run, or why it is withheld.

  Tracks a run's ledger; whenever an assumption of the analysis fails (given
  at construction, or another release appearing in the ledger) the ModelMix
  epsilon is withheld and a warning names the assumption. The standard
  epsilon is reported by the caller in every case.
  """

  def __init__(self, accountant: ModelMixAccountant | None, tau: float,
               failures: Sequence[str] = ()):
    """Starts a report.

    Args:
      accountant: the run's accountant; None for a non-private run.
      tau: the minimum gap in parameter units.
      failures: assumptions the pipeline breaks (:func:`failed_assumptions`).
    """
    self.accountant = accountant
    self.tau = tau
    self.failures = list(failures)
    self.epsilon: float | None = 0.0 if accountant is not None else math.inf
    self._warn()

  def _warn(self) -> None:
    if self.failures:
      self.epsilon = None
      warnings.warn(
          'ModelMix epsilon withheld (the standard DP-SGD epsilon still holds:'
          ' ModelMix is post-processing). The ModelMix analysis assumes '
          + '; '.join(self.failures) + '.', stacklevel=3)

  def update(self, ledger: accounting.PrivacyLedger) -> None:
    """Recomputes the ModelMix epsilon of everything in ``ledger``."""
    if self.accountant is None or self.epsilon is None:
      return
    extra = self.accountant.other_releases(ledger)
    if extra:
      self.failures.append(
          f'no release besides the noisy gradients: {extra} other event(s) in'
          ' the ledger')
      self._warn()
      return
    self.epsilon = self.accountant.ledger_epsilon(ledger)

  def postfix(self) -> dict[str, str]:
    """The progress bar's entry."""
    if self.epsilon is None:
      return {'eps_modelmix': 'withheld'}
    return {'eps_modelmix': f'{self.epsilon:.3f}'}

  def plot_value(self) -> float:
    """The ModelMix epsilon for a plot (NaN when withheld)."""
    return math.nan if self.epsilon is None else self.epsilon

  def summary(self) -> dict[str, Any]:
    """``epsilon_modelmix`` and a ``modelmix`` section for summary.json."""
    accountant = self.accountant
    p = None if accountant is None else clipping_p(accountant.plan.clipping)
    return {
        'epsilon_modelmix': self.epsilon,
        'modelmix': {
            'tau': self.tau,
            'tau_over_lr': None if accountant is None else (
                accountant.tau_over_lr),
            'p': p,
            'accountant': (
                'ModelMix, Xiao, Wan, Devadas 2022, Theorem 4.1 / Corollary'
                ' 4.1, add/remove'),
            'withheld_because': self.failures,
        },
    }
