"""MNIST, batch clipping (BC) + adaptive layerwise clipping (ALC), eps = 8.

The CPU-sized version of Nguyen et al. 2023's comparison (IC, IC+ALC, BC,
BC+ALC at equal epsilon; docs/EXPERIMENTS_clipping.md): the tanh CNN of
Tramer & Boneh 2021, batches of 256 drawn by shuffling, groups of 16 clipped
per group (K = 16 groups per batch), ALC thresholds recomputed every epoch
from the 10% public split with C decaying by 0.9 per epoch, 5 epochs, and the
paper's Gaussian-DP accountant at epsilon = 8, delta = 1e-5 (mu = 1.666, so
sigma = sqrt(5) / 1.666 = 1.34). IC is group_size=1; without ALC,
layers='none'.

    dpjax-train --config configs/mnist_bc_alc.py --workdir runs/bc_alc
    dpjax-train --config configs/mnist_bc_alc.py --workdir runs/ic \
        --config.privacy.clipping.group_size=1 \
        --config.privacy.clipping.layers=none
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.data.public_fraction = 0.1
  config.privacy.clip_norm = 0.1
  config.privacy.target_epsilon = 8.0
  config.privacy.delta = 1e-5
  config.privacy.expected_batch_size = 256
  config.privacy.epochs = 5.0
  config.privacy.accountant = 'gdp'
  config.privacy.clipping.mode = 'batch'
  config.privacy.clipping.group_size = 16
  config.privacy.clipping.layers = 'alc'
  config.privacy.clipping.layer_noise = 'isotropic'
  config.privacy.clipping.alc_every_epoch = True
  config.privacy.clipping.alc_decay = 0.9
  config.optimizer.learning_rate = 0.5
  config.optimizer.momentum = 0.9
  config.eval_every_steps = 105
  config.log_every_steps = 50
  return config
