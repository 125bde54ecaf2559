"""Make an existing training loop private: one call, a few changed lines.

:func:`make_private` is dpjax's answer to Opacus' ``make_private_with_epsilon``
for JAX: from the loss the loop already has (a loss of a BATCH, Flax Linen
params or an NNX module), an optax optimizer, the data and a privacy target,
it builds a :func:`dpjax.make_plan` and returns what the loop needs:

* ``private.batches``: Poisson batches (the plan's sampler), padded, with
  their masks; each pass is one epoch, and each batch it yields is recorded
  in ``private.ledger`` (so ``private.epsilon()`` is always what was spent);
* ``private.value_and_grad(params, batch)``: a drop-in for
  ``jax.value_and_grad(loss_fn)(params, batch)`` (or ``nnx.value_and_grad``)
  that returns the PRIVATE gradient: per-example gradients of the batch loss
  on batches of one (:func:`dpjax.batch_loss.batch_of_one`), clipped, summed,
  noised once with the plan's noise and divided by the public expected batch
  size; the user's optimizer takes it as it took the plain gradient;
* ``private.step``: a whole jitted step with the optimizer given, for loops
  that have none of their own.

What it holds by construction: the noise, the sampler and the per-example
dropout keys come from the plan's secret key schedule (OS entropy unless
``noise_seed`` is given), and reach the compiled step as arguments, never
as constants baked into the program; the engine only sees mask-safe
:class:`dpjax.Batch` es; only the batches of ``private.batches`` are accepted,
each step once, and iterating past the plan's steps is an error.

References:
  Abadi et al., 2016. Deep Learning with Differential Privacy.
  https://arxiv.org/abs/1607.00133
  Yousefpour et al., 2021. Opacus: User-Friendly Differential Privacy
  Library in PyTorch. https://arxiv.org/abs/2109.12298
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
from jax.experimental import io_callback
import numpy as np
import optax

from dpjax import accounting
from dpjax import batch_loss as batch_loss_lib
from dpjax import example_keys
from dpjax import engines
from dpjax import keys as keys_lib
from dpjax import noise as noise_lib
from dpjax import per_example
from dpjax import plan as plan_lib
from dpjax import sampling

PyTree = Any
LossFn = Callable[..., Any]

# Modes whose clipping state is fixed by the parameters: the stateless
# value_and_grad rebuilds it each step. Adaptive clipping carries its
# thresholds across steps and batch clipping uses a shuffling sampler.
SUPPORTED_MODES: tuple[str, ...] = ('flat', 'per_layer', 'automatic')


class PrivateBatch(NamedTuple):
  """One logical step's Poisson batch, as ``private.batches`` yields it.

  Attributes:
    batch: a :class:`dpjax.Batch`: the padded rows (with their dataset
      indices, :class:`dpjax.example_keys.Indexed`) and the mask.
    step: the logical step (int32).
    noise: the secret noise stream at this step (root, count = step): the
      state :meth:`dpjax.DPPlan.noise`'s transform draws the step's noise
      from.
    dropout_key: the step's key of the secret dropout stream
      (``keys.DROPOUT``); each example folds in its dataset index.
  """

  batch: sampling.Batch
  step: Any
  noise: noise_lib.GaussianNoiseState
  dropout_key: Any

  def __repr__(self) -> str:
    # The keys are secret and the rows are private data: never print them.
    return (f'PrivateBatch(step={int(self.step)}, rows='
            f'{len(self.batch.mask)}, real=<not printed>)')


def _check_choices(target_epsilon, noise_multiplier, epochs, steps) -> None:
  if (target_epsilon is None) == (noise_multiplier is None):
    raise ValueError(
        'make_private takes exactly one of target_epsilon (the noise is'
        ' calibrated to it) and noise_multiplier; got target_epsilon='
        f'{target_epsilon!r}, noise_multiplier={noise_multiplier!r}.')
  if (epochs is None) == (steps is None):
    raise ValueError(
        'make_private takes exactly one of epochs and steps (the length the'
        f' privacy budget covers); got epochs={epochs!r}, steps={steps!r}.')


def _check_clipping(clipping: plan_lib.ClippingConfig) -> None:
  if clipping.mode not in SUPPORTED_MODES or clipping.layers == 'alc':
    raise ValueError(
        f'make_private supports clipping modes {SUPPORTED_MODES} with fixed'
        f' thresholds; got mode={clipping.mode!r}, layers='
        f'{clipping.layers!r}. For adaptive, batch or ALC clipping use'
        ' dpjax-train or the explicit API (dpjax.make_plan).')


def _is_array(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype') and np.ndim(x) >= 1


def as_arrays(data: Any) -> PyTree:
  """The training set as host arrays with a leading example axis.

  A dict, tuple or array is the dataset itself. Any other iterable (a
  list, a generator, a tf.data or torch data loader) is read once as a
  sequence of batches and concatenated: dpjax samples its own Poisson
  batches, so the iterable's batching is not used.
  """
  if isinstance(data, (dict, tuple)) or _is_array(data):
    leaves = jax.tree.leaves(data)
    if not leaves or not all(_is_array(x) for x in leaves):
      raise ValueError(
          'data must be arrays with a leading example axis (a dict, tuple or'
          ' array of them) or an iterable of such batches; got leaves of'
          f' types {sorted({type(x).__name__ for x in leaves})}.')
    per_example.batch_size_of(data)
    return jax.tree.map(np.asarray, data)
  if not isinstance(data, Iterable):
    raise TypeError(
        'data must be arrays (a dict, tuple or array) or an iterable of'
        f' batches, got {type(data).__name__}.')
  batches = [jax.tree.map(np.asarray, b) for b in data]
  if not batches:
    raise ValueError('data is an empty iterable: it yielded no batch.')
  structure = jax.tree.structure(batches[0])
  for i, b in enumerate(batches):
    if jax.tree.structure(b) != structure:
      raise ValueError(
          f'batch {i} of data has structure {jax.tree.structure(b)}, batch 0'
          f' {structure}: every batch must have the same fields.')
  return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)


def _num_required_args(fn: Callable[..., Any]) -> int | None:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return None
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return None
  return sum(1 for p in params if p.kind in (
      p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)


def _check_loss_args(loss_fn: LossFn, loss_takes_key: bool) -> None:
  n = _num_required_args(loss_fn)
  if n is None:
    return
  if loss_takes_key and n < 3 and _accepts(loss_fn, 3) is False:
    raise ValueError(
        'loss_takes_key=True gives the loss a third argument (each'
        ' example\'s PRNG key), but loss_fn takes fewer: write'
        ' loss_fn(params, batch, key) or drop loss_takes_key.')
  if not loss_takes_key and n >= 3:
    raise ValueError(
        f'loss_fn needs {n} arguments; a loss with a PRNG key (dropout)'
        ' must say so: pass loss_takes_key=True and each example gets its'
        ' own key as the third argument.')


def _accepts(fn: Callable[..., Any], n: int) -> bool | None:
  try:
    inspect.signature(fn).bind(*range(n))
    return True
  except TypeError:
    return False
  except ValueError:
    return None


def _example_loss(loss_fn: LossFn, keep_batch_dim: bool,
                  loss_takes_key: bool) -> LossFn:
  """``fn(params, Indexed example, StepInputs)`` from the user's loss."""
  one = batch_loss_lib.batch_of_one(loss_fn) if keep_batch_dim else loss_fn
  if loss_takes_key:
    return example_keys.with_example_keys(one)

  def fn(params, example, inputs):
    del inputs
    return one(params, example.examples)

  return fn


def _as_private_batch(batch: Any) -> PrivateBatch:
  if not isinstance(batch, PrivateBatch):
    raise TypeError(
        'private.value_and_grad takes the batches of private.batches (Poisson'
        ' sampled, with their masks, so that epsilon is what was spent); got'
        f' a {type(batch).__name__}: iterate `for batch in private.batches`.')
  return batch


def _check_nnx(model: nnx.Module) -> None:
  if jax.tree.leaves(nnx.state(model, nnx.BatchStat)):
    raise ValueError(
        'the NNX model has nnx.BatchStat variables (BatchNorm), whose'
        ' statistics couple the examples of a batch: use GroupNorm or'
        " LayerNorm, or dpjax-train's normalization policies"
        ' (config.normalization).')


class PrivateBatches:
  """Poisson batches of a plan; each pass over it is one epoch.

  The passes cut the plan's ``num_steps`` steps into ``num_passes`` near
  equal epochs, so that iterating ``num_passes`` times (the ``epochs`` given,
  rounded up) takes every step of the plan once. Each batch is recorded in
  ``ledger`` when it is yielded (a batch handed out counts as spent, whether
  or not the step then runs). A step is never yielded twice, and iterating
  after the last step is an error.
  """

  def __init__(self, plan: plan_lib.DPPlan, data: example_keys.Indexed,
               ledger: accounting.PrivacyLedger, num_passes: int):
    self.plan = plan
    self.ledger = ledger
    self.num_passes = num_passes
    self.next_step = 0
    self._data = data
    self._noise_root = plan.keys.root(keys_lib.NOISE)
    self._dropout_root = plan.keys.root(keys_lib.DROPOUT)

  def _pass_end(self) -> int:
    n, k = self.plan.num_steps, self.num_passes
    return next(e for e in ((i + 1) * n // k for i in range(k))
                if e > self.next_step)

  def __len__(self) -> int:
    """Steps in the next pass (0 once the plan's steps are all taken)."""
    if self.next_step >= self.plan.num_steps:
      return 0
    return self._pass_end() - self.next_step

  def __iter__(self) -> Iterator[PrivateBatch]:
    if self.next_step >= self.plan.num_steps:
      raise RuntimeError(
          f'all {self.plan.num_steps} steps of the plan are taken (epsilon ='
          f' {self.plan.epsilon():.3g}); more would spend more than the'
          ' budget: call make_private again with more epochs or steps.')
    return self._epoch(self._pass_end())

  def _epoch(self, end: int) -> Iterator[PrivateBatch]:
    while self.next_step < end:
      step = self.next_step
      self.next_step += 1
      batch = self.plan.sampler.sample(step).take(self._data)
      self.plan.record_step(self.ledger, step)
      yield PrivateBatch(
          batch, np.int32(step),
          noise_lib.GaussianNoiseState(self._noise_root, np.int32(step)),
          keys_lib.for_step(self._dropout_root, step))


@dataclasses.dataclass
class Private:
  """What :func:`make_private` returns: a training loop's private parts.

  Attributes:
    plan: the :class:`dpjax.DPPlan` (sampler, clipping, noise, accountant).
    batches: :class:`PrivateBatches`, the Poisson batches; each pass is one
      epoch and each batch is recorded in ``ledger``.
    ledger: the :class:`dpjax.PrivacyLedger` of the batches handed out.
    optimizer: the optax optimizer given (what :meth:`step` applies).
  """

  plan: plan_lib.DPPlan
  batches: PrivateBatches
  ledger: accounting.PrivacyLedger
  optimizer: optax.GradientTransformation
  _example_loss: LossFn = dataclasses.field(repr=False)
  _engine: Callable[[LossFn], engines.Engine] = dataclasses.field(repr=False)

  def __post_init__(self):
    self.step = jax.jit(self._step)
    self._noise = optax.with_extra_args_support(self.plan.noise())
    self._released: set[int] = set()

  def _release(self, step: np.ndarray) -> None:
    """Host side: each step's noise is drawn for one release only.

    A second gradient of the same batch would carry the same noise, and the
    difference of the two releases would be noise-free.
    """
    step = int(step)
    if step in self._released:
      raise ValueError(
          f'value_and_grad already released the private gradient of step'
          f' {step}; a second one reuses its noise, and the difference of the'
          ' two is the noise-free gradient. Call value_and_grad (or grad)'
          ' once per batch of private.batches.')
    self._released.add(step)

  def epsilon(self) -> float:
    """Epsilon spent so far (every batch handed out), at the plan's delta."""
    return self.ledger.epsilon(self.plan.config.delta,
                               self.plan.config.accountant)

  def value_and_grad(self, params: Any, batch: PrivateBatch
                     ) -> tuple[jax.Array, PyTree]:
    """``(loss, private gradient)`` of a batch of :attr:`batches`.

    A drop-in for ``jax.value_and_grad(loss_fn)(params, batch)`` (params a
    pytree) or ``nnx.value_and_grad(loss_fn)(model, batch)`` (an NNX
    module: the gradient is the ``nnx.Param`` state). The gradient is the
    clipped per-example sum plus the step's noise, divided by the public
    expected batch size: a private release, for any optimizer. The loss is
    the mean over the batch's real rows, a diagnostic computed without
    noise: not differentially private (do not publish it).
    Call it once per batch, inside the loop's jitted step: a second call
    on the same batch raises (its noise would be reused).
    """
    batch = _as_private_batch(batch)
    inputs = per_example.StepInputs(dropout_key=batch.dropout_key)
    loss_fn = self._example_loss
    if isinstance(params, nnx.Module):
      _check_nnx(params)
      graphdef, params, rest = nnx.split(params, nnx.Param, ...)
      module_loss = loss_fn

      def loss_fn(p, example, step_inputs):
        return module_loss(nnx.merge(graphdef, p, rest), example, step_inputs)

    io_callback(self._release, None, batch.step, ordered=True)
    out = self._engine(loss_fn)(params, batch.batch,
                                self.plan.init_clip_state(params), inputs)
    grads, _ = self._noise.update(out.grad_sum, batch.noise,
                                  clip_state=out.clip_state)
    real = jnp.sum(batch.batch.mask)
    loss = jnp.sum(out.stats.losses) / jnp.maximum(real, 1)
    return loss, grads

  def grad(self, params: Any, batch: PrivateBatch) -> PyTree:
    """The private gradient alone (a drop-in for ``jax.grad(loss_fn)``)."""
    return self.value_and_grad(params, batch)[1]

  def init(self, params: PyTree) -> optax.OptState:
    """The optimizer's state for ``params``."""
    return self.optimizer.init(params)

  def _step(self, params: PyTree, opt_state: optax.OptState,
            batch: PrivateBatch) -> tuple[PyTree, optax.OptState, jax.Array]:
    loss, grads = self.value_and_grad(params, batch)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def make_private(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    data: Any,
    *,
    expected_batch_size: int,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    clip_norm: float = 1.0,
    delta: float = 1e-5,
    accountant: str = 'rdp',
    clipping: plan_lib.ClippingConfig = plan_lib.ClippingConfig(),
    noise_seed: int | None = None,
    secure_noise: bool = False,
    keep_batch_dim: bool = True,
    loss_takes_key: bool = False,
    microbatch_size: int | None = None,
    grad_route: str = 'auto',
    pad_to_multiple_of: int | None = None,
) -> Private:
  """Makes a training loop private; returns its batches, gradient and ledger.

  Convert a loop by replacing its batches with ``private.batches``, its
  gradient call with ``private.value_and_grad`` and nothing else: epsilon is
  tracked as the batches are drawn (``private.epsilon()``).

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> import dpjax
    >>> def loss_fn(w, batch):                        # the loop's batch loss
    ...   return jnp.mean((batch['x'] @ w - batch['y']) ** 2)
    >>> data = {'x': np.ones((500, 3), np.float32),
    ...         'y': np.zeros(500, np.float32)}
    >>> tx = optax.sgd(0.1)
    >>> private = dpjax.make_private(loss_fn, tx, data, target_epsilon=2.0,
    ...                              expected_batch_size=50, epochs=1,
    ...                              delta=1e-4)
    >>> w, opt_state = jnp.ones(3), tx.init(jnp.ones(3))
    >>> for batch in private.batches:
    ...   loss, grads = private.value_and_grad(w, batch)
    ...   updates, opt_state = tx.update(grads, opt_state, w)
    ...   w = optax.apply_updates(w, updates)
    >>> round(private.epsilon(), 6) == round(private.plan.epsilon(), 6)
    True

  Args:
    loss_fn: the loop's loss of a BATCH, ``loss_fn(params, batch)`` (a
      scalar mean or sum, or a [batch] vector; mean and sum give the same
      per-example gradient, :mod:`dpjax.batch_loss`), ``params`` a pytree or
      an NNX module; ``loss_fn(params, batch, key)`` with
      ``loss_takes_key``. With ``keep_batch_dim=False``, a loss of ONE
      example without a batch axis.
    optimizer: the loop's optax optimizer (used by ``private.step``; a loop
      with its own step keeps applying it to the private gradient).
    data: the training set: arrays with a leading example axis (a dict,
      tuple or array) or an iterable of batches, read once and concatenated
      (dpjax draws its own Poisson batches from it).
    expected_batch_size: q N, the expected Poisson batch size; also the
      public divisor of the noisy sum.
    target_epsilon: the epsilon to reach after the whole run (calibrates
      the noise). Exclusive with ``noise_multiplier``.
    noise_multiplier: sigma, noise std over the sensitivity. Exclusive with
      ``target_epsilon``.
    epochs: length of training in passes over the data (or ``steps``);
      ``private.batches`` gives one epoch per pass.
    steps: length of training in steps (or ``epochs``).
    clip_norm: the per-example L2 clip norm C.
    delta: the target delta; must be below 1 / N.
    accountant: 'rdp' or 'pld'.
    clipping: a :class:`dpjax.ClippingConfig` of mode 'flat', 'per_layer'
      (rule thresholds) or 'automatic'.
    noise_seed: None (default) draws the secret of the noise, the sampler
      and the dropout keys from the OS's entropy; an integer makes the run
      reproducible, and the guarantee then assumes it stays SECRET (whoever
      knows it can subtract the noise).
    secure_noise: sum-of-four-Gaussians draws (Holohan & Braghin 2021).
    keep_batch_dim: ``loss_fn`` is a batch loss (True) or a one-example
      loss (False).
    loss_takes_key: ``loss_fn`` takes a third argument, a PRNG key (for
      dropout): each example gets its own, folded from its dataset index
      into the step's key of the secret ``keys.DROPOUT`` stream
      (:mod:`dpjax.example_keys`).
    microbatch_size: examples per vectorized chunk (memory; never changes
      the result).
    grad_route: 'auto', 'vmap', 'ghost' or 'bookkeeping'
      (:func:`dpjax.engines.select`; every route, the same clipped sum).
    pad_to_multiple_of: padded batch sizes are multiples of this (a
      performance setting, see :class:`dpjax.sampling.PoissonSampler`).

  Returns:
    A :class:`Private` with ``batches``, ``value_and_grad``, ``grad``,
    ``step``, ``init``, ``ledger``, ``epsilon()`` and ``plan``.

  References:
    Abadi et al., 2016. Deep Learning with Differential Privacy.
    https://arxiv.org/abs/1607.00133
  """
  _check_choices(target_epsilon, noise_multiplier, epochs, steps)
  _check_clipping(clipping)
  _check_loss_args(loss_fn, loss_takes_key)
  if grad_route not in engines.ROUTES:
    raise ValueError(
        f'grad_route must be one of {engines.ROUTES}, got {grad_route!r}.')
  arrays = as_arrays(data)
  config = plan_lib.PrivacyConfig(
      clip_norm=clip_norm, noise_multiplier=noise_multiplier,
      target_epsilon=target_epsilon, delta=delta,
      expected_batch_size=expected_batch_size, epochs=epochs, steps=steps,
      accountant=accountant, clipping=clipping, secure_noise=secure_noise)
  schedule = keys_lib.KeySchedule.create(seed=0, noise_seed=noise_seed)
  plan = plan_lib.make_plan(config, per_example.batch_size_of(arrays),
                            pad_to_multiple_of=pad_to_multiple_of,
                            keys=schedule)
  if epochs is not None:
    num_passes = math.ceil(epochs)
  else:
    num_passes = -(-plan.num_steps // plan.steps_per_epoch)
  ledger = accounting.PrivacyLedger()
  batches = PrivateBatches(plan, example_keys.with_indices(arrays), ledger,
                           min(num_passes, plan.num_steps))

  def engine(example_loss: LossFn) -> engines.Engine:
    return engines.select(plan, engines.LossSpec(example_loss),
                          route=grad_route, microbatch_size=microbatch_size)

  return Private(plan, batches, ledger, optimizer,
                 _example_loss(loss_fn, keep_batch_dim, loss_takes_key),
                 engine)
