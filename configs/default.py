"""Default: DP-SGD on scikit-learn's embedded 8x8 digits, offline, seconds.

Targets (tests/test_train.py): epsilon <= 3 at delta = 1e-5 and >= 85% test
accuracy on the 359 held-out digits. Measured: 93.3-94.4% over seeds 0-2
(docs/BENCHMARKS.md).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'digits'
  config.data.manual_dir = ml_collections.config_dict.placeholder(str)
  config.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)
  # Fraction of the training set held out as PUBLIC data (removed from the
  # private set; used for BatchNorm statistics or clip thresholds).
  config.data.public_fraction = 0.0

  config.model = ml_collections.ConfigDict()
  config.model.name = 'small_cnn'
  config.model.activation = 'tanh'

  # Everything that changes the privacy guarantee, and nothing else. A set
  # `steps` replaces `epochs`; a set `noise_multiplier` replaces
  # `target_epsilon`.
  config.privacy = ml_collections.ConfigDict()
  config.privacy.enabled = True
  config.privacy.clip_norm = 1.0
  config.privacy.noise_multiplier = ml_collections.config_dict.placeholder(
      float)
  config.privacy.target_epsilon = ml_collections.config_dict.placeholder(
      float)
  config.privacy.target_epsilon = 3.0  # calibrates noise_multiplier
  config.privacy.delta = 1e-5
  config.privacy.expected_batch_size = 256
  config.privacy.epochs = ml_collections.config_dict.placeholder(float)
  config.privacy.epochs = 20.0
  config.privacy.steps = ml_collections.config_dict.placeholder(int)
  config.privacy.accountant = 'rdp'

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 2.0
  config.optimizer.momentum = 0.0
  config.optimizer.nesterov = False
  config.optimizer.schedule = 'constant'

  # Performance only: never changes the guarantee.
  config.perf = ml_collections.ConfigDict()
  config.perf.microbatch_size = ml_collections.config_dict.placeholder(int)
  config.perf.pad_to_multiple_of = ml_collections.config_dict.placeholder(int)
  # How per-example clipping is computed (same result every way):
  # 'vmap' per-example gradients; 'bookkeeping' ghost norms / per-layer
  # gradients and book-kept sums, fastest per layer; 'ghost' the same with
  # the least memory per layer; 'auto' bookkeeping when possible.
  config.perf.grad_route = 'auto'
  # If set, microbatch_size is the largest that fits this many MiB (XLA's
  # memory analysis of the compiled step); leave microbatch_size unset.
  config.perf.memory_budget_mb = ml_collections.config_dict.placeholder(float)

  config.eval_every_steps = 0  # 0: ten evaluations per run
  config.log_every_steps = 10
  config.progress_bar = True
  return config
