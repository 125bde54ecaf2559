"""MNIST, Tramer & Boneh 2021's end-to-end tanh CNN, epsilon = 3, delta = 1e-5.

Their recipe (98.1%): batch 512, SGD lr 0.5 momentum 0.9, C = 0.1, 40 epochs,
sigma 1.23. Here batches are truly Poisson-sampled and sigma is calibrated to
epsilon = 3 by the RDP accountant. Data: the four IDX files from
$DPJAX_DATA_DIR/mnist (default ../shared/data/mnist, relative to the working
directory), read through dpjax's tfds builder; nothing is downloaded.

    dpjax-train --config configs/mnist.py --workdir runs/mnist
"""

import os

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'mnist'
  config.data.manual_dir = os.path.join(
      os.environ.get('DPJAX_DATA_DIR', os.path.join('..', 'shared', 'data')),
      'mnist')
  config.model.name = 'tanh_cnn'
  config.privacy.clip_norm = 0.1
  config.privacy.target_epsilon = 3.0
  config.privacy.delta = 1e-5
  config.privacy.expected_batch_size = 512
  config.privacy.epochs = 40.0
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.5
  config.optimizer.momentum = 0.9
  config.log_every_steps = 50
  config.eval_every_steps = 0
  return config
