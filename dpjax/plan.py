"""One object that ties sampler, clipping, noise and accountant together.

A DP-SGD guarantee holds only if four pieces agree: the sampler (Poisson at
rate q), the clipping sensitivity under the neighbouring relation of that
sampler, the noise scaled to that sensitivity and divided by the public
expected batch size, and the accountant's event (Poisson-subsampled Gaussian at
the same q and sigma). Users who wire these by hand pair Poisson accounting
with shuffled batches or noise calibrated for a sum with a mean (ANCHORS.md,
reports 1 and 9). :func:`make_plan` builds all four from one
:class:`PrivacyConfig`, so they cannot disagree.

The clipping mode (:class:`ClippingConfig`) decides the rest: per-example
modes (flat, per-layer, automatic, adaptive) run with Poisson sampling, the
add/remove relation and the subsampled Gaussian accountant; batch clipping
(Nguyen et al. 2023) runs with shuffling, the replace-one relation and one
Gaussian per epoch (Gaussian DP), and an adaptive run charges its count
releases in the same per-step event (Andrew et al. 2021).

Privacy settings live in :class:`PrivacyConfig`; performance flags (padding,
microbatching) are arguments of their own and never change the guarantee.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import dp_accounting
import jax
import optax

from dpjax import _validation
from dpjax import accounting
from dpjax import adaptive_clipping
from dpjax import batch_clipping
from dpjax import clipping as clipping_lib
from dpjax import keys as keys_lib
from dpjax import noise as noise_lib
from dpjax import per_example
from dpjax import sampling

NeighboringRelation = dp_accounting.NeighboringRelation


CLIPPING_MODES: tuple[str, ...] = (
    'flat', 'per_layer', 'automatic', 'adaptive', 'batch')
LAYER_THRESHOLDS: tuple[str, ...] = ('none',) + clipping_lib.LAYER_RULES + (
    'alc',)
ADAPTIVE_ACCOUNTING: tuple[str, ...] = ('sigma_eff', 'compose')


@dataclasses.dataclass(frozen=True)
class ClippingConfig:
  """Which clipping runs, with its parameters; it fixes sampler and relation.

  Attributes:
    mode: ``'flat'`` (one global norm C), ``'per_layer'`` (a norm per
      parameter group), ``'automatic'`` (Bu et al.: g R / (||g|| + gamma);
      gamma = 0 is De et al.'s normalization), ``'adaptive'`` (Andrew et al.'s
      private quantile clipping) -- all per example, with Poisson sampling and
      the subsampled Gaussian accountant -- or ``'batch'`` (batch clipping of
      groups of ``group_size``, with shuffling and Gaussian-DP accounting
      under replace-one, no amplification).
    layers: per-group thresholds: ``'none'`` (one global C), ``'equal'``,
      ``'size'``, ``'sqrt_size'`` (data-free splits of C, see
      :func:`dpjax.clipping.per_layer_clip_norms`) or ``'alc'`` (from
      gradient norms on the PUBLIC split). Used by 'per_layer', 'batch' and
      (rules only, as initial values) 'adaptive'.
    layer_groups: ``'tensor'`` (each parameter array) or ``'module'`` (each
      top-level entry of the params dict).
    layer_noise: ``'isotropic'`` or ``'per_layer'`` (std proportional to
      C_i, paying sqrt(L) in the noise multiplier, see
      :func:`dpjax.clip_per_layer`). With 'alc', 'isotropic' rescales the
      C_i to sum_i C_i^2 = C^2 and 'per_layer' keeps the largest at C.
    alc_every_epoch: recompute the ALC thresholds at every epoch start.
    alc_decay: C's factor per epoch when recomputing (authors: 0.9).
    alc_public_examples: public examples in the ALC gradient.
    gamma: automatic clipping's stability constant (0: normalization).
    target_quantile: adaptive clipping's target fraction of unclipped rows.
    quantile_learning_rate: eta of the geometric threshold update.
    count_noise_std: sigma_b of each noised count (None: expected batch
      size / 20, Andrew et al.'s choice).
    adaptive_accounting: ``'sigma_eff'`` (the accounted noise multiplier is
      ``noise_multiplier`` and the gradient noise is raised to cover the
      counts) or ``'compose'`` (the gradient noise is ``noise_multiplier``
      and the counts' release is composed into each step's event, so epsilon
      grows). With ``target_epsilon`` both calibrate the accounted
      multiplier and raise the gradient noise.
    group_size: m, examples per clipped group in 'batch' mode (1 is
      per-example clipping; the batch size is a multiple of m).
  """

  mode: str = 'flat'
  layers: str = 'none'
  layer_groups: str = 'tensor'
  layer_noise: str = 'isotropic'
  alc_every_epoch: bool = False
  alc_decay: float = 1.0
  alc_public_examples: int = 1024
  gamma: float = 0.01
  target_quantile: float = 0.5
  quantile_learning_rate: float = 0.2
  count_noise_std: float | None = None
  adaptive_accounting: str = 'sigma_eff'
  group_size: int = 1


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
    accountant: 'rdp' or 'pld' ('gdp', the closed form, in 'batch' mode).
    clipping: the clipping mode and its parameters (:class:`ClippingConfig`).
      In 'batch' mode ``expected_batch_size`` is the fixed batch size of
      the shuffling sampler.
    secure_noise: draw the noise as a sum of four Gaussians (Holohan &
      Braghin 2021), against the floating-point attacks of Jin et al. (2022);
      same distribution, slower draws (docs/BENCHMARKS.md).
    linf_p: ModelMix's refinement (Xiao et al. 2022): after flat L2
      clipping each coordinate is clamped to clip_norm / sqrt(p); the L2
      sensitivity is unchanged. None: no clamp.
    stats_share: the share of each step's noise spent on a second release
      of the same batch (privatized BatchNorm statistics, :mod:`dpjax.
      normalization`); the two together cost one step at the accounted
      noise multiplier. None: the gradient is the only release.
    initial_noise_multiplier: sigma of a release made once, before training,
      over the whole private set (the Gaussian mechanism on a sum of
      per-example vectors clipped to norm 1, e.g. ``privatized_once``
      BatchNorm statistics, :mod:`dpjax.normalization`). It is composed with
      the steps, and ``target_epsilon`` calibrates the steps' sigma for the
      whole. None: nothing is released before training.
  """

  clip_norm: float = 1.0
  noise_multiplier: float | None = None
  target_epsilon: float | None = None
  delta: float = 1e-5
  expected_batch_size: int = 256
  epochs: float | None = None
  steps: int | None = None
  accountant: str = 'rdp'
  clipping: ClippingConfig = ClippingConfig()
  secure_noise: bool = False
  linf_p: float | None = None
  stats_share: float | None = None
  initial_noise_multiplier: float | None = None


@dataclasses.dataclass(frozen=True)
class DPPlan:
  """Sampler, clipping, noise and accountant that belong together.

  Build it with :func:`make_plan`; it is never modified afterwards: every
  release the run makes (gradient, adaptive counts, privatized statistics)
  is declared in its :class:`PrivacyConfig`. ``noise_multiplier`` is always
  the one the accountant uses for a step; ``gradient_noise_multiplier`` the
  one on the gradient (larger under adaptive clipping with ``'sigma_eff'``
  or with a ``stats_share``), ``stats_noise_multiplier`` the statistics'.
  This class is per-example clipping under Poisson sampling;
  :class:`ShufflePlan` is batch clipping under shuffling.
  """

  private = True

  config: PrivacyConfig
  dataset_size: int
  sampling_rate: float
  num_steps: int
  noise_multiplier: float
  clipping: clipping_lib.PerExampleClipping
  sampler: sampling.PoissonSampler | sampling.ShuffleSampler
  keys: keys_lib.KeySchedule = dataclasses.field(repr=False, kw_only=True)
  relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE
  gradient_noise_multiplier: float | None = None
  divisor: float | None = None
  count_noise_std: float | None = None
  num_counts: int | None = None
  stats_noise_multiplier: float | None = None

  @property
  def mode(self) -> str:
    return self.config.clipping.mode

  @property
  def group_size(self) -> int:
    """Examples per clipped row (1: per-example clipping)."""
    return 1

  @property
  def sampler_name(self) -> str:
    return 'poisson'

  @property
  def grad_noise_multiplier(self) -> float:
    if self.gradient_noise_multiplier is None:
      return self.noise_multiplier
    return self.gradient_noise_multiplier

  @property
  def public_divisor(self) -> float:
    """The public constant the noisy sum is divided by."""
    if self.divisor is None:
      return float(self.config.expected_batch_size)
    return self.divisor

  @property
  def sensitivity(self) -> float:
    """L2 sensitivity of the clipped sum under the sampler's relation.

    For clipping whose thresholds change (per-layer ALC, adaptive), the
    bound it was built with; ``summary(clip_state)`` reports the current one.
    """
    return self.clipping.sensitivity(self.relation)

  @property
  def noise_std(self) -> float:
    """Std of the Gaussian noise on the clipped SUM."""
    return self.grad_noise_multiplier * self.sensitivity

  @property
  def steps_per_epoch(self) -> int:
    return max(1, round(1 / self.sampling_rate))

  def init_clip_state(self, params: Any) -> Any:
    """The clipping's state at step 0."""
    return self.clipping.init(params)

  def end_step(self, clip_state: Any) -> Any:
    """The clipping's once-per-logical-step update (adaptive counts)."""
    return self.clipping.end_step(clip_state)

  def _static_noise(self) -> bool:
    return (self.clipping.bound_fn is None
            and self.clipping.noise_scale_fn is None)

  def noise(self) -> optax.GradientTransformation:
    """The noise transform: right std, divided by the public divisor.

    Its key is the secret noise stream of :attr:`keys`; nothing else draws
    from it. For clipping with thresholds in its state, ``update`` needs
    ``clip_state=`` (the state the sum was clipped with).
    """
    key = self.keys.root(keys_lib.NOISE)
    secure = self.config.secure_noise
    if self._static_noise():
      return noise_lib.add_gaussian_noise(
          self.grad_noise_multiplier, self.sensitivity, self.public_divisor,
          key, secure)
    return noise_lib.add_gaussian_noise_from_state(
        self.grad_noise_multiplier, self.clipping, self.public_divisor, key,
        self.relation, secure)

  def clipped_grad(self, loss_fn: Callable[..., Any], *,
                   microbatch_size: int | None = None,
                   has_aux: bool = False) -> Callable[..., Any]:
    """The vmap engine of this plan over a ONE-example loss.

    :func:`dpjax.clipped_grad`; :class:`ShufflePlan` clips groups. (The
    training program chooses among all engines in :func:`dpjax.engines.
    select`.)
    """
    return per_example.clipped_grad(
        loss_fn, self.clipping, microbatch_size=microbatch_size,
        has_aux=has_aux)

  def step_event(self) -> dp_accounting.DpEvent:
    """The DP event of one logical step: a Poisson-subsampled Gaussian."""
    return accounting.poisson_gaussian_event(
        self.noise_multiplier, self.sampling_rate)

  def record_step(self, ledger: accounting.PrivacyLedger, step: int) -> None:
    """Records in ``ledger`` what logical step ``step`` (0-based) releases."""
    del step
    ledger.record(self.step_event())

  def initial_event(self) -> dp_accounting.DpEvent | None:
    """The release made once before training, or None."""
    return _initial_event(self.config)

  def record_start(self, ledger: accounting.PrivacyLedger) -> None:
    """Records in a run's fresh ``ledger`` what is released before step 0."""
    if ledger.entries:
      raise ValueError('record_start takes a fresh ledger; this one already'
                       f' holds {len(ledger.entries)} entries.')
    event = self.initial_event()
    if event is not None:
      ledger.record(event)

  def num_events(self, steps: int) -> int:
    return steps

  def epsilon(self, steps: int | None = None) -> float:
    """Epsilon after ``steps`` steps (default: the whole run), the release
    before training included."""
    steps = self.num_steps if steps is None else steps
    event = accounting.with_initial(
        self.initial_event(),
        accounting.dpsgd_event(self.noise_multiplier, self.sampling_rate,
                               steps) if steps else None)
    if event is None:
      return 0.0
    return accounting.epsilon(event, self.config.delta,
                              self.config.accountant, self.relation)

  def _mode_summary(self) -> dict[str, Any]:
    return {}

  def layerwise_thresholds(
      self, loss_fn: Callable[..., Any], public: Any
  ) -> batch_clipping.LayerwiseThresholds | None:
    """The ALC schedule over ``public`` data (None unless layers='alc').

    ``public`` is a batch of public examples (a pytree with a leading axis);
    its first ``alc_public_examples`` rows are used.
    """
    c = self.config.clipping
    if c.layers != 'alc':
      return None
    if public is None:
      raise ValueError(
          "clipping.layers='alc' computes thresholds from PUBLIC data only:"
          ' set config.data.public_fraction > 0 (e.g. 0.1) to hold out a'
          ' public split.')
    batch = jax.tree.map(lambda x: x[:c.alc_public_examples], public)
    return batch_clipping.LayerwiseThresholds(
        loss_fn, batch, self.config.clip_norm, self.steps_per_epoch,
        groups=c.layer_groups, rescale=c.layer_noise == 'isotropic',
        every_epoch=c.alc_every_epoch, decay=c.alc_decay)

  def summary(self, clip_state: Any = None) -> dict[str, Any]:
    """The privacy-relevant facts of the run, for summary.json.

    Pass the final ``clip_state`` to report the sensitivity of the
    thresholds the run ended with (per-layer ALC, adaptive).
    """
    c = self.config.clipping
    sensitivity = self.sensitivity
    if clip_state is not None:
      sensitivity = float(self.clipping.sensitivity(self.relation,
                                                    clip_state))
    out = {
        'epsilon': self.epsilon(),
        'delta': self.config.delta,
        'noise_multiplier': self.noise_multiplier,
        'accountant': self.config.accountant,
        'steps': self.num_steps,
        'sampling_rate': self.sampling_rate,
        'sampler': self.sampler_name,
        'expected_batch_size': self.config.expected_batch_size,
        'dataset_size': self.dataset_size,
        'clip_norm': self.config.clip_norm,
        'clipping': self.clipping.name,
        'clipping_mode': self.mode,
        'neighbouring_relation': self.relation.name.lower(),
        'sensitivity': sensitivity,
        'noise_std_on_sum': self.grad_noise_multiplier * sensitivity,
        'gradient_noise_multiplier': self.grad_noise_multiplier,
        'divisor': self.public_divisor,
    }
    out.update(self._mode_summary())
    if self.stats_noise_multiplier is not None:
      out['stats_noise_multiplier'] = self.stats_noise_multiplier
    if self.config.initial_noise_multiplier is not None:
      out['initial_noise_multiplier'] = self.config.initial_noise_multiplier
      out['initial_release_epsilon'] = accounting.epsilon(
          self.initial_event(), self.config.delta, self.config.accountant,
          self.relation)
    if c.layers != 'none' and self.mode != 'automatic':
      out.update({'layers': c.layers, 'layer_groups': c.layer_groups,
                  'layer_noise': c.layer_noise})
      if clip_state is not None:
        norms = [float(x) for x in jax.tree.leaves(clip_state.clip_norms)]
        out['num_clip_groups'] = len(norms)
        out['layer_clip_norms'] = norms
        if c.layer_noise == 'per_layer':
          # Per-layer std sigma' C_i costs noise multiplier sigma' / sqrt(L).
          out['per_layer_noise_multiplier'] = (
              self.grad_noise_multiplier * math.sqrt(len(norms)))
    if c.layers == 'alc':
      out.update({'alc_every_epoch': c.alc_every_epoch,
                  'alc_decay': c.alc_decay,
                  'alc_thresholds_from': 'public split'})
    if self.mode == 'automatic':
      out['gamma'] = c.gamma
    if self.mode == 'adaptive':
      out.update({
          'adaptive_accounting': c.adaptive_accounting,
          'count_noise_std': self.count_noise_std,
          'num_counts': self.num_counts,
          'target_quantile': c.target_quantile,
          'quantile_learning_rate': c.quantile_learning_rate,
      })
      if clip_state is not None:
        out['final_clip_norms'] = [
            float(x) for x in jax.tree.leaves(clip_state.clip_norms)]
    return out


@dataclasses.dataclass(frozen=True)
class ShufflePlan(DPPlan):
  """Batch clipping (Nguyen et al. 2023) under shuffling: groups of m rows
  clipped as one, the replace-one relation, one Gaussian per epoch (each
  example takes part in at most one step per epoch, so the epoch, not the
  step, is the unit of composition; Gaussian DP)."""

  @property
  def group_size(self) -> int:
    return self.config.clipping.group_size

  @property
  def sampler_name(self) -> str:
    return 'shuffle'

  @property
  def steps_per_epoch(self) -> int:
    return self.sampler.steps_per_epoch

  def clipped_grad(self, loss_fn: Callable[..., Any], *,
                   microbatch_size: int | None = None,
                   has_aux: bool = False) -> Callable[..., Any]:
    """:func:`dpjax.batch_clipping.batch_clipped_grad` over the group loss
    (masked mean, divisor m) of the ONE-example ``loss_fn``, with
    ``microbatch_size`` examples per chunk rounded to whole groups."""
    m = self.group_size
    return batch_clipping.batch_clipped_grad(
        batch_clipping.group_loss_from_example_loss(loss_fn, m),
        self.clipping, has_aux=has_aux,
        microbatch_size=None if microbatch_size is None else max(
            1, microbatch_size // m))

  def step_event(self) -> dp_accounting.DpEvent:
    """The DP event of one epoch: an unsubsampled Gaussian."""
    return dp_accounting.GaussianDpEvent(self.noise_multiplier)

  def record_step(self, ledger: accounting.PrivacyLedger, step: int) -> None:
    """One Gaussian per epoch, charged at the epoch's first step."""
    if step % self.steps_per_epoch == 0:
      ledger.record(self.step_event())

  def num_events(self, steps: int) -> int:
    return -(-steps // self.steps_per_epoch)

  def epsilon(self, steps: int | None = None) -> float:
    steps = self.num_steps if steps is None else steps
    if steps == 0:
      return 0.0
    event = accounting.gaussian_composition_event(
        self.noise_multiplier, self.num_events(steps))
    # Events are normalized to the replace-one sensitivity already.
    return accounting.epsilon(event, self.config.delta, self.config.accountant)

  def _mode_summary(self) -> dict[str, Any]:
    return {
        'group_size': self.group_size,
        'groups_per_batch': self.public_divisor,
        'epochs_accounted': self.num_events(self.num_steps),
        'gdp_mu': accounting.batch_clipping_mu(
            self.noise_multiplier, self.num_events(self.num_steps)),
    }


@dataclasses.dataclass(frozen=True)
class NonPrivatePlan:
  """Non-private training as a plan: the same step, nothing clipped or noised.

  The baseline of a DP run on the same model and batches: Poisson batches at
  the same rate, the plain gradient of the real rows divided by their
  realized number (which a private run must never do).
  """

  sampler: sampling.PoissonSampler | None = None
  num_steps: int = 0
  keys: keys_lib.KeySchedule | None = dataclasses.field(default=None,
                                                         repr=False)

  private = False
  mode = 'none'
  group_size = 1
  clipping = None

  @property
  def sampling_rate(self) -> float:
    return self.sampler.sampling_rate

  def noise(self) -> optax.GradientTransformationExtraArgs:
    """No noise: the sum divided by the realized count (extra arg ``count``).

    Like a private plan's noise, it goes first in ``state.tx``.
    """
    return noise_lib.divide_by_count()

  def init_clip_state(self, params: Any) -> None:
    del params

  def end_step(self, clip_state: Any) -> Any:
    return clip_state

  def record_step(self, ledger: accounting.PrivacyLedger, step: int) -> None:
    del ledger, step  # nothing is released privately

  def epsilon(self, steps: int | None = None) -> float:
    del steps
    return float('inf')

  def summary(self, clip_state: Any = None) -> dict[str, Any]:
    del clip_state
    return {'epsilon': float('inf'), 'delta': None, 'noise_multiplier': 0.0,
            'accountant': None, 'steps': self.num_steps,
            'sampling_rate': self.sampling_rate, 'clip_norm': None}


def make_nonprivate_plan(expected_batch_size: float, dataset_size: int, *,
                         steps: int | None = None,
                         epochs: float | None = None,
                         pad_to_multiple_of: int | None = None,
                         keys: keys_lib.KeySchedule | None = None
                         ) -> NonPrivatePlan:
  """The non-private baseline's plan: Poisson batches, no clipping or noise."""
  keys = keys or keys_lib.KeySchedule.create(seed=0)
  sampler = sampling.PoissonSampler(
      dataset_size, expected_batch_size, pad_to_multiple_of=pad_to_multiple_of,
      key=keys.root(keys_lib.SAMPLER))
  if steps is None:
    steps = accounting.steps_for_epochs(
        _validation.positive('epochs', epochs), sampler.sampling_rate)
  return NonPrivatePlan(sampler, _validation.positive_int('steps', steps),
                        keys)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}, got {value!r}.')
  return value


def _check_clipping_config(c: ClippingConfig) -> None:
  """Refuses combinations that would run something other than asked."""
  _check_choice('clipping.mode', c.mode, CLIPPING_MODES)
  _check_choice('clipping.layers', c.layers, LAYER_THRESHOLDS)
  _check_choice('clipping.layer_groups', c.layer_groups,
                clipping_lib.LAYER_GROUPS)
  _check_choice('clipping.layer_noise', c.layer_noise,
                clipping_lib.LAYER_NOISE)
  _check_choice('clipping.adaptive_accounting', c.adaptive_accounting,
                ADAPTIVE_ACCOUNTING)
  if c.mode == 'per_layer' and c.layers == 'none':
    raise ValueError(
        "clipping.mode='per_layer' needs clipping.layers = 'equal', 'size',"
        " 'sqrt_size' or 'alc'.")
  if c.mode in ('flat', 'automatic') and c.layers != 'none':
    raise ValueError(
        f'clipping.mode={c.mode!r} clips the whole gradient; got'
        f' clipping.layers={c.layers!r}. Use mode \'per_layer\' (or'
        " 'batch') for per-layer thresholds.")
  if c.mode == 'adaptive' and c.layers == 'alc':
    raise ValueError(
        "clipping.mode='adaptive' learns its thresholds privately; ALC"
        " thresholds come from public data: use mode 'per_layer' or 'batch'"
        " with layers='alc', or adaptive with layers 'none'/'equal'/'size'/"
        "'sqrt_size'.")
  if c.layer_noise == 'per_layer' and (
      c.layers == 'none' or c.mode not in ('per_layer', 'batch')):
    raise ValueError(
        "clipping.layer_noise='per_layer' needs per-layer thresholds in mode"
        " 'per_layer' or 'batch'.")
  if c.mode != 'batch' and c.group_size != 1:
    raise ValueError(
        f'clipping.group_size={c.group_size} applies to mode \'batch\' only'
        f' (got mode {c.mode!r}).')
  _validation.positive_int('clipping.group_size', c.group_size)


def _make_clipping(config: PrivacyConfig, clip_key: jax.Array
                   ) -> clipping_lib.PerExampleClipping:
  c = config.clipping
  if c.mode == 'flat' and config.linf_p is not None:
    # pylint: disable=g-import-not-at-top
    from dpjax import modelmix  # modelmix's accountant imports this module
    return modelmix.clip_l2_then_linf(config.clip_norm, config.linf_p)
  if c.mode == 'flat':
    return clipping_lib.clip_per_example(config.clip_norm)
  if c.mode == 'automatic':
    if c.gamma == 0:
      return clipping_lib.clip_normalized(config.clip_norm)
    return clipping_lib.clip_automatic(config.clip_norm, c.gamma)
  if c.mode == 'adaptive':
    return adaptive_clipping.clip_quantile(
        config.clip_norm, target_quantile=c.target_quantile,
        learning_rate=c.quantile_learning_rate,
        count_noise_std=_count_noise_std(config),
        expected_batch_size=config.expected_batch_size, key=clip_key,
        rule=None if c.layers == 'none' else c.layers,
        groups=c.layer_groups)
  if c.layers == 'none':
    base = clipping_lib.clip_per_example(config.clip_norm)
  else:
    # ALC replaces these thresholds with public-data ones before step 0.
    rule = 'equal' if c.layers == 'alc' else c.layers
    base = clipping_lib.clip_per_layer(
        clip_norm=config.clip_norm, rule=rule, groups=c.layer_groups,
        noise=c.layer_noise)
  if c.mode == 'batch':
    return batch_clipping.clip_groups_of(base, c.group_size)
  return base


def _count_noise_std(config: PrivacyConfig) -> float:
  std = config.clipping.count_noise_std
  if std is None:
    return config.expected_batch_size / 20
  return _validation.positive('clipping.count_noise_std', std)


def _steps(config: PrivacyConfig, steps_per_epoch: float) -> int:
  if (config.epochs is None) == (config.steps is None):
    raise ValueError(
        'set exactly one of privacy.epochs and privacy.steps; got'
        f' epochs={config.epochs!r}, steps={config.steps!r}.')
  if config.steps is not None:
    return _validation.positive_int('steps', config.steps)
  epochs = _validation.positive('epochs', config.epochs)
  return max(1, int(epochs * steps_per_epoch + 1e-9))


def _check_noise_choice(config: PrivacyConfig) -> None:
  if (config.noise_multiplier is None) == (config.target_epsilon is None):
    raise ValueError(
        'set exactly one of privacy.noise_multiplier and'
        f' privacy.target_epsilon; got noise_multiplier='
        f'{config.noise_multiplier!r}, target_epsilon={config.target_epsilon!r}.')


def _make_batch_plan(config: PrivacyConfig, n: int, delta: float,
                     keys: keys_lib.KeySchedule) -> DPPlan:
  """Batch clipping: shuffling, replace-one, composed Gaussians (GDP)."""
  c = config.clipping
  if config.accountant not in accounting.ACCOUNTANTS + ('gdp',):
    raise ValueError(
        "in clipping.mode='batch' the accountant must be 'gdp' (closed form),"
        f" 'pld' or 'rdp'; got accountant={config.accountant!r}.")
  s = _validation.positive_int(
      'expected_batch_size', config.expected_batch_size,
      " In mode 'batch' it is the fixed batch size of the shuffling sampler.")
  m = c.group_size
  if s % m:
    raise ValueError(
        f'expected_batch_size={s} must be a multiple of clipping.group_size='
        f'{m} (K = s / m groups per batch).')
  clipping = _make_clipping(config, keys.root(keys_lib.CLIP_COUNT))
  sampler = sampling.ShuffleSampler(n, s, key=keys.root(keys_lib.SAMPLER))
  steps = _steps(config, sampler.steps_per_epoch)
  epochs = -(-steps // sampler.steps_per_epoch)
  _check_noise_choice(config)
  if config.noise_multiplier is not None:
    sigma = _validation.non_negative(
        'noise_multiplier', config.noise_multiplier,
        ' Use a positive value for a private run.')
  else:
    sigma = accounting.calibrate_gaussian_composition(
        config.target_epsilon, delta, epochs, config.accountant)
  return ShufflePlan(
      config=config, dataset_size=n, sampling_rate=s / n, num_steps=steps,
      noise_multiplier=sigma, clipping=clipping, sampler=sampler, keys=keys,
      relation=NeighboringRelation.REPLACE_ONE, divisor=float(s // m))


def make_plan(
    config: PrivacyConfig,
    dataset_size: int,
    *,
    pad_to_multiple_of: int | None = None,
    keys: keys_lib.KeySchedule | None = None,
    params: Any = None,
) -> DPPlan:
  """Builds a :class:`DPPlan` from privacy settings and the dataset size.

  Validates every setting (a clear error names the bad value) and, when
  ``target_epsilon`` is given, calibrates the noise multiplier with the chosen
  accountant. The clipping mode fixes the rest: per-example modes get the
  Poisson sampler, the add/remove relation and the subsampled Gaussian event;
  'batch' gets the shuffling sampler, the replace-one relation and one
  unsubsampled Gaussian per epoch, so the two can never be mixed.

  Args:
    config: the privacy settings.
    dataset_size: N, the number of private training examples.
    pad_to_multiple_of: padded batch sizes are multiples of this
      (performance only; see :class:`dpjax.sampling.PoissonSampler`).
    keys: the run's :class:`dpjax.KeySchedule`; the sampler, the noise and
      adaptive clipping's counts take their secret streams from it. Default:
      a fresh one whose secret comes from the OS's entropy (nothing about
      the noise is reproducible or guessable).
    params: the parameters (or their shapes); needed by per-layer adaptive
      clipping, whose count release grows with the number of clip groups.

  Returns:
    A :class:`DPPlan`.
  """
  n = _validation.positive_int('dataset_size', dataset_size)
  _check_clipping_config(config.clipping)
  if config.initial_noise_multiplier is not None:
    _validation.positive('initial_noise_multiplier',
                         config.initial_noise_multiplier)
  delta = accounting.check_delta(config.delta, n)
  if keys is None:
    keys = keys_lib.KeySchedule.create(seed=0)
  if config.clipping.mode == 'batch':
    if (config.stats_share is not None or config.linf_p is not None
        or config.initial_noise_multiplier is not None):
      raise ValueError(
          "clipping.mode='batch' releases one group-clipped sum: a"
          ' stats_share or initial_noise_multiplier (privatized per-example'
          " statistics) or linf_p (ModelMix's per-coordinate clamp) has no"
          ' meaning there; use a per-example mode.')
    return _make_batch_plan(config, n, delta, keys)
  if config.accountant == 'gdp':
    raise ValueError(
        "accountant='gdp' (no subsampling amplification) applies to"
        " clipping.mode='batch' with shuffling; per-example modes use Poisson"
        " sampling: choose accountant 'rdp' or 'pld'.")
  accounting.check_accountant(config.accountant)
  clipping = _make_clipping(config, keys.root(keys_lib.CLIP_COUNT))
  q = accounting.sampling_rate(config.expected_batch_size, n)
  if config.steps is None and config.epochs is not None:
    steps = accounting.steps_for_epochs(
        _validation.positive('epochs', config.epochs), q)
  else:
    steps = _steps(config, 1 / q)
  _check_noise_choice(config)
  if config.noise_multiplier is not None:
    sigma = _validation.non_negative(
        'noise_multiplier', config.noise_multiplier,
        ' Use a positive value for a private run.')
  else:
    sigma = accounting.calibrate_noise_multiplier(
        config.target_epsilon, delta, q, steps, config.accountant,
        initial_event=_initial_event(config))
  if not math.isfinite(sigma):
    raise ValueError(f'noise multiplier is not finite: {sigma!r}.')

  gradient_sigma, count_std, num_counts = None, None, None
  if config.clipping.mode == 'adaptive':
    count_std = clipping.count_noise_std
    num_counts = _num_counts(clipping, params, config.clipping)
    if (config.clipping.adaptive_accounting == 'compose'
        and config.noise_multiplier is not None):
      gradient_sigma = sigma
      sigma = adaptive_clipping.joint_noise_multiplier(
          gradient_sigma, count_std, num_counts)
    else:
      gradient_sigma = adaptive_clipping.gradient_noise_multiplier(
          sigma, count_std, num_counts)
  stats_sigma = None
  if config.stats_share is not None:
    # A second release of the same batch: the two share the step's noise.
    gradient_sigma, stats_sigma = accounting.split_noise_multiplier(
        sigma if gradient_sigma is None else gradient_sigma,
        config.stats_share)

  sampler = sampling.PoissonSampler(
      n, config.expected_batch_size, pad_to_multiple_of=pad_to_multiple_of,
      key=keys.root(keys_lib.SAMPLER))
  return DPPlan(
      config=config, dataset_size=n, sampling_rate=q, num_steps=steps,
      noise_multiplier=sigma, clipping=clipping, sampler=sampler, keys=keys,
      gradient_noise_multiplier=gradient_sigma, count_noise_std=count_std,
      num_counts=num_counts, stats_noise_multiplier=stats_sigma)


def _initial_event(config: PrivacyConfig) -> dp_accounting.DpEvent | None:
  """The release before training: one Gaussian mechanism over the whole
  private set (no subsampling), or None."""
  sigma = config.initial_noise_multiplier
  return None if sigma is None else dp_accounting.GaussianDpEvent(sigma)


def _num_counts(clipping, params: Any, c: ClippingConfig) -> int:
  if c.layers == 'none':
    return 1
  if params is None:
    raise ValueError(
        'per-layer adaptive clipping releases one count per clip group, so'
        ' make_plan needs params= (the parameters or their shapes, e.g.'
        ' jax.eval_shape(model.init, ...)["params"]) to account for them.')
  return clipping.num_counts(jax.eval_shape(clipping.init, params))
