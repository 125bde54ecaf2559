"""Private adaptive (quantile) clipping, flat or per layer.

Implements Andrew, Thakkar, McMahan, Ramaswamy 2021 ("Differentially Private
Learning with Adaptive Clipping"). The threshold C tracks a target quantile
gamma of the per-example gradient norms: every step counts, over the real
examples, b_i = 1[||g_i|| <= C], releases the centred count
sum_i (b_i - 1/2) + N(0, sigma_b^2), estimates the fraction
b = (released count) / m + 1/2 with the PUBLIC expected batch size m, and moves
C <- C exp(-eta (b - gamma)). Per layer, every clip group has its own
threshold and count.

Privacy invariants owned here (DESIGN.md, 1, 2 and 5):

* the clipped sum's sensitivity is that of the thresholds in the state
  (sqrt(sum_i C_i^2)), and the noise is scaled to those same thresholds;
* the counts accumulate over microbatches in the state and are released ONCE
  per logical step (:meth:`PerExampleClipping.end_step`), noised;
* the count release is charged: each centred count has add/remove sensitivity
  1/2, so K counts with noise sigma_b are a Gaussian mechanism of noise
  multiplier 2 sigma_b / sqrt(K). It sees the same Poisson sample as the
  gradient, so the two are ONE subsampled Gaussian of noise multiplier
  (z^-2 + K (2 sigma_b)^-2)^-1/2 (:func:`joint_noise_multiplier`), never two
  independently subsampled events (that would understate epsilon).
  Equivalently (Andrew et al., Theorem 1), to keep an accounted multiplier z
  the gradient noise is raised to :func:`gradient_noise_multiplier`.
  Opacus accounted only the gradient noise here (Opacus #807).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dpjax import _validation
from dpjax import clipping as clipping_lib
from dpjax import keys as keys_lib
from dpjax import noise as noise_lib

PyTree = Any

# Thresholds are kept in a public range so a run of extreme noised counts can
# neither overflow them nor drive them to zero.
MIN_CLIP_NORM = 1e-6
MAX_CLIP_NORM = 1e6


class QuantileClipState(NamedTuple):
  """Adaptive clipping state, carried across steps (and checkpointed).

  Attributes:
    clip_norms: the current thresholds: a float32 scalar (flat) or a pytree
      prefix of the parameters (one per clip group).
    counts: same structure; sum over this step's real examples so far of
      1[norm <= threshold] - 1/2. Reset to zero by ``end_step``.
    key: the count noise's stream root; draw t uses ``keys.for_step(key,
      draws)``.
    draws: number of count releases so far.
  """

  clip_norms: PyTree
  counts: PyTree
  key: jax.Array
  draws: jax.Array


def count_noise_multiplier(count_noise_std: float, num_counts: int = 1
                           ) -> float:
  """Noise multiplier of releasing ``num_counts`` centred counts.

  Each centred count sum_i (b_i - 1/2) has add/remove sensitivity 1/2, so the
  vector of K of them has L2 sensitivity sqrt(K) / 2.
  """
  count_noise_std = _validation.positive('count_noise_std', count_noise_std)
  num_counts = _validation.positive_int('num_counts', num_counts)
  return 2.0 * count_noise_std / math.sqrt(num_counts)


def joint_noise_multiplier(gradient_noise_multiplier: float,
                           count_noise_std: float,
                           num_counts: int = 1) -> float:
  """The noise multiplier of gradient and count releases together.

  Both are Gaussian releases over the same sample; stacked (each divided by
  its noise std) they are one Gaussian mechanism with sensitivity
  sqrt(z^-2 + z_b^-2), i.e. noise multiplier (z^-2 + z_b^-2)^-1/2 with
  z_b = :func:`count_noise_multiplier`. Always below both inputs.

  Examples:
    >>> from dpjax import adaptive_clipping
    >>> round(adaptive_clipping.joint_noise_multiplier(1.0, 2.0), 4)
    0.9701

  Args:
    gradient_noise_multiplier: z, gradient noise std over its sensitivity.
    count_noise_std: sigma_b, std of the noise on each count.
    num_counts: K, the number of counts (clip groups) released per step.

  Returns:
    The noise multiplier the accountant must use for one step.

  References:
    Andrew et al., 2021. Differentially Private Learning with Adaptive
    Clipping, Theorem 1. https://arxiv.org/abs/1905.03871
  """
  z = _validation.positive('gradient_noise_multiplier',
                           gradient_noise_multiplier)
  z_b = count_noise_multiplier(count_noise_std, num_counts)
  return (z ** -2 + z_b ** -2) ** -0.5


def gradient_noise_multiplier(noise_multiplier: float, count_noise_std: float,
                              num_counts: int = 1) -> float:
  """Gradient noise that keeps the accounted noise multiplier at z.

  Andrew et al.'s sigma_eff: (z^-2 - z_b^-2)^-1/2, the inverse of
  :func:`joint_noise_multiplier`. Needs z_b = 2 sigma_b / sqrt(K) > z.

  Examples:
    >>> from dpjax import adaptive_clipping
    >>> round(adaptive_clipping.gradient_noise_multiplier(0.9701425, 2.0), 4)
    1.0

  Args:
    noise_multiplier: z, the accounted noise multiplier of one step.
    count_noise_std: sigma_b, std of the noise on each count.
    num_counts: K, the number of counts released per step.

  Returns:
    The gradient noise multiplier (> z).

  References:
    Andrew et al., 2021. Differentially Private Learning with Adaptive
    Clipping, Theorem 1. https://arxiv.org/abs/1905.03871
  """
  z = _validation.positive('noise_multiplier', noise_multiplier)
  z_b = count_noise_multiplier(count_noise_std, num_counts)
  if z_b <= z:
    raise ValueError(
        f'count_noise_std={count_noise_std:g} is too small for noise'
        f' multiplier {z:g} with {num_counts} count(s): the counts alone'
        f' would cost noise multiplier {z_b:g} <= {z:g}. Use'
        f' count_noise_std > {z * math.sqrt(num_counts) / 2:g} (Andrew et al.'
        ' suggest expected_batch_size / 20).')
  return (z ** -2 - z_b ** -2) ** -0.5


def _quantile_init(params: PyTree, *, clip_norms: PyTree | None,
                   clip_norm: float, rule: str | None, groups: str,
                   root: jax.Array) -> QuantileClipState:
  """The initial thresholds, zero counts and the count noise's stream."""
  norms = clipping_lib.initial_clip_norms(params, clip_norms, clip_norm, rule,
                                          groups)
  return QuantileClipState(norms, jax.tree.map(jnp.zeros_like, norms),
                           *keys_lib.init_stream(root))


def _quantile_scales(sq_norms: PyTree, state: QuantileClipState,
                     mask: jax.Array | None):
  """Per-group clipping at the state's thresholds, adding this chunk's counts.

  Every real row adds +1/2 to a group whose norm is within its threshold and
  -1/2 otherwise; a non-finite row (not kept) counts as over every
  threshold, padding rows add nothing. The norms are those the rows are
  clipped with: on the ghost routes an upper bound of the exact norm for
  Gram-norm layers (:mod:`dpjax.ghost`), so a row within that bound's
  rounding margin of a threshold counts as over it, as it is clipped there.
  Any 0/1 function of one example gives a count of sensitivity 1/2, so the
  release is as private whichever norm is used.
  """
  scales, norms = clipping_lib.group_norm_scales(sq_norms, state.clip_norms,
                                                 mask)
  mask = clipping_lib.as_mask(mask, scales.keep.shape[0])
  counts = jax.tree.map(
      lambda total, c, n: total + jnp.sum(
          jnp.where(mask, jnp.where(scales.keep & (n <= c), 0.5, -0.5), 0.0)),
      state.counts, state.clip_norms, norms)
  return scales, state._replace(counts=counts)


def _quantile_end_step(state: QuantileClipState, *, count_noise_std: float,
                       learning_rate: float, expected_batch_size: float,
                       target_quantile: float) -> QuantileClipState:
  """Noises the step's counts once and moves each threshold geometrically."""
  draw_key = keys_lib.for_step(state.key, state.draws)
  leaves, treedef = jax.tree.flatten(state.counts)
  noise = jax.random.normal(draw_key, (len(leaves),)) * count_noise_std
  noisy = jax.tree.unflatten(
      treedef, [c + noise[i] for i, c in enumerate(leaves)])
  clip_norms = jax.tree.map(
      lambda c, n: jnp.clip(
          c * jnp.exp(-learning_rate * (
              n / expected_batch_size + 0.5 - target_quantile)),
          MIN_CLIP_NORM, MAX_CLIP_NORM),
      state.clip_norms, noisy)
  return QuantileClipState(
      clip_norms, jax.tree.map(jnp.zeros_like, state.counts), state.key,
      state.draws + 1)


def _initial_bound(initial_clip_norm: float | PyTree, explicit: bool,
                   rule: str | None) -> float:
  """sqrt(sum_i C_i^2) of the initial thresholds, checked."""
  if not explicit:
    return _validation.positive('initial_clip_norm', initial_clip_norm)
  if rule is not None:
    raise ValueError('give either explicit per-group initial thresholds or a'
                     f' rule, not both (rule={rule!r}).')
  return clipping_lib.total_bound(initial_clip_norm)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantileClipSpec(clipping_lib.ClipSpec):
  """:class:`dpjax.clipping.ClipSpec` of adaptive clipping.

  Attributes:
    count_noise_std: sigma_b, std of the noise on each released count.
  """

  count_noise_std: float


class QuantileClipping(clipping_lib.PerExampleClipping):
  """Adaptive clipping: a :class:`dpjax.PerExampleClipping` with counts."""

  spec_type = QuantileClipSpec
  spec: QuantileClipSpec
  count_noise_std = property(lambda self: self.spec.count_noise_std)

  def num_counts(self, state: QuantileClipState) -> int:
    """K, the number of counts (clip groups) released per step."""
    return len(jax.tree.leaves(state.clip_norms))


def clip_quantile(
    initial_clip_norm: float | PyTree,
    *,
    target_quantile: float = 0.5,
    learning_rate: float = 0.2,
    count_noise_std: float,
    expected_batch_size: float,
    key: jax.Array | int,
    rule: str | None = None,
    groups: str = 'tensor',
) -> QuantileClipping:
  """Per-example clipping whose thresholds follow a quantile of the norms.

  Flat (one threshold) by default; per layer with ``rule`` (the initial
  thresholds split ``initial_clip_norm`` by :func:`dpjax.clipping.
  per_layer_clip_norms`) or with a pytree prefix of initial thresholds. Each
  call of ``clip`` clips at the current thresholds and adds this chunk's
  centred counts to the state; ``end_step`` (once per logical step) noises
  the counts and updates the thresholds geometrically. The sum's sensitivity
  is ``sensitivity(relation, state)``, sqrt(sum_i C_i^2) of the current
  thresholds; the noise transform reads them from the state.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dpjax import adaptive_clipping
    >>> clip = adaptive_clipping.clip_quantile(
    ...     1.0, target_quantile=0.5, learning_rate=0.2, count_noise_std=1e-6,
    ...     expected_batch_size=4, key=0)
    >>> grads = {'w': jnp.array([[0.1], [0.2], [0.3], [5.0]])}
    >>> out, state = clip.clip(grads, clip.init(grads), None)
    >>> float(state.counts)  # 3 of 4 under the threshold, centred
    1.0
    >>> round(float(clip.end_step(state).clip_norms), 4)  # exp(-0.2 * 0.25)
    0.9512

  Args:
    initial_clip_norm: initial threshold C_0 (flat, or the total split by
      ``rule``), or a pytree prefix of the parameters with one initial
      threshold per group.
    target_quantile: gamma in (0, 1), the fraction of examples to leave
      unclipped.
    learning_rate: eta > 0 of the geometric update.
    count_noise_std: sigma_b > 0, std of the noise on each count.
    expected_batch_size: m, the public expected batch size that turns counts
      into fractions.
    key: PRNG key (or integer seed) of the count noise.
    rule: None (flat, or explicit per-group thresholds) or ``'equal'``,
      ``'size'``, ``'sqrt_size'``.
    groups: ``'tensor'`` or ``'module'``, the clip groups of a rule.

  Returns:
    A :class:`QuantileClipping` with :class:`QuantileClipState`; its
    ``num_counts(state)`` method gives K for the accountant. It clips from
    norms, so it runs on every route (:mod:`dpjax.ghost`).

  References:
    Andrew, Thakkar, McMahan, Ramaswamy, 2021. Differentially Private
    Learning with Adaptive Clipping. https://arxiv.org/abs/1905.03871
  """
  explicit = not isinstance(initial_clip_norm, numbers.Real)
  bound = _initial_bound(initial_clip_norm, explicit, rule)
  count_noise_std = _validation.positive('count_noise_std', count_noise_std)
  end_step_fn = functools.partial(
      _quantile_end_step, count_noise_std=count_noise_std,
      learning_rate=_validation.positive('learning_rate', learning_rate),
      expected_batch_size=_validation.positive(
          'expected_batch_size', expected_batch_size,
          ' It is the public constant q * N, not the realized batch size.'),
      target_quantile=_validation.open_unit('target_quantile',
                                            target_quantile))
  init_fn = functools.partial(
      _quantile_init, clip_norms=initial_clip_norm if explicit else None,
      clip_norm=bound, rule=rule, groups=groups, root=noise_lib.as_key(key))
  return QuantileClipping(QuantileClipSpec(
      init=init_fn, clip=clipping_lib.clip_fn_from_norms(_quantile_scales),
      l2_bound=bound, name='adaptive', bound_fn=clipping_lib.threshold_bound,
      end_step_fn=end_step_fn, scales_from_norms=_quantile_scales,
      count_noise_std=count_noise_std))
