"""The training state, the run's keys and its optimizer.

Randomness comes from one :class:`dpjax.KeySchedule`: ``config.seed`` for what
may be public (initialization, data split, public batches), a secret seed for
the sampler, the noise and every other mechanism-internal draw. The secret is
drawn from the OS's entropy unless ``privacy.noise_seed`` is set, is kept in
the checkpoints (as secret as the data) and never written to summary.json.
"""

from __future__ import annotations

from typing import Any

from flax import struct
from flax.training import train_state as train_state_lib
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dpjax import keys as keys_lib
from dpjax import lora
from dpjax import normalization


class TrainState(train_state_lib.TrainState):
  """Flax TrainState; ``tx`` is ``optax.chain(noise, optimizer, ...)``.

  ``clip_state`` is the clipping's state (per-layer, adaptive thresholds and
  counts), carried across steps and checkpointed with the rest. ``pruning``
  is the :class:`dpjax.pruning.PruningState` (the step's parameter mask)
  when ``config.pruning`` is on. ``model_state`` holds the model's
  non-parameter collections (BatchNorm's ``batch_stats``) as its
  :mod:`dpjax.normalization` policy keeps them.
  """

  clip_state: Any = None
  pruning: Any = None
  model_state: Any = struct.field(default_factory=dict)


def key_schedule(config: ml_collections.ConfigDict,
                 stored_secret: int | None = None) -> keys_lib.KeySchedule:
  """The run's keys: ``config.seed`` public, the secret as the run needs it.

  A resumed run keeps its checkpoint's secret (``stored_secret``); a new one
  takes ``privacy.noise_seed`` if set (reproducible: the guarantee then
  assumes that seed stays secret), else a fresh draw from the OS's entropy.
  """
  noise_seed = config.privacy.get('noise_seed')
  if stored_secret is not None:
    return keys_lib.KeySchedule(config.seed, stored_secret,
                                secret_given=noise_seed is not None)
  return keys_lib.KeySchedule.create(config.seed, noise_seed)


def make_optimizer(config: ml_collections.ConfigDict,
                   num_steps: int) -> optax.GradientTransformation:
  """The optax optimizer named by ``config`` (applied after the noise)."""
  lr = config.learning_rate
  if config.schedule == 'cosine':
    lr = optax.cosine_decay_schedule(config.learning_rate, num_steps)
  elif config.schedule != 'constant':
    raise ValueError(
        f"optimizer.schedule must be 'constant' or 'cosine', got"
        f' {config.schedule!r}.')
  if config.name == 'sgd':
    return optax.sgd(lr, momentum=config.momentum or None,
                     nesterov=config.get('nesterov', False))
  if config.name == 'adam':
    return optax.adam(lr)
  if config.name == 'nadam':
    return optax.nadam(lr)
  raise ValueError(
      f"optimizer.name must be 'sgd', 'adam' or 'nadam', got {config.name!r}.")


def create_train_state(
    model: nn.Module, key: jax.Array, image_shape,
    tx: optax.GradientTransformation,
    normalizer: normalization.Normalizer | None = None, *,
    input_dtype=jnp.float32, pretrained: Any = None) -> TrainState:
  """Initial state; the model's collections as ``normalizer`` keeps them.

  Without a normalizer, a model with data-dependent collections (BatchNorm
  statistics) is refused: the default policy is 'reject'. ``input_dtype``:
  the inputs' (int32 for token sequences). ``pretrained``: parameters of a
  pretrained model, put in place by :func:`dpjax.lora.from_pretrained`
  (into the frozen collection of a LoRA model, which ``model_state``
  carries; into every parameter of the same path and shape).
  """
  # One compilation instead of one per initializer op.
  variables = jax.jit(model.init)(key, jnp.zeros((1,) + tuple(image_shape),
                                                 input_dtype))
  if pretrained is not None:
    variables = lora.from_pretrained(variables, pretrained)
  if normalizer is None:
    normalizer = normalization.make_normalizer(model, variables)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           tx=tx, model_state=normalizer.init_state(variables))
