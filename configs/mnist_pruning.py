"""MNIST study of parameter freezing and selection (Adamczewski & Park 2023).

The tanh CNN of configs/mnist.py at epsilon = 3 (delta = 1e-5), shortened to
CPU minutes: 2 epochs at batch 512. A tenth of the training set is held out
as the PUBLIC split (for the 'public_*' mask sources), so every run of the
study trains privately on the same 54,000 examples. Defaults: random
per-step selection of 20% of the coordinates; scripts/pruning_study.py sweeps
the rest (docs/EXPERIMENTS_pruning.md).

    dpjax-train --config configs/mnist_pruning.py --workdir runs/pruning \
        --config.pruning.mode=freeze --config.pruning.source=magnitude_init
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.data.public_fraction = 0.1
  config.privacy.epochs = 2.0
  config.pruning.mode = 'select'
  config.pruning.keep_fraction = 0.2
  config.pruning.source = 'random'
  config.pruning.scope = 'global'
  config.pruning.public_batch_size = 256
  config.pruning.public_learning_rate = 0.1
  # Performance only: one padded batch shape (640 rows), one compilation.
  config.perf.pad_to_multiple_of = 640
  config.eval_every_steps = 100
  config.log_every_steps = 20
  return config
