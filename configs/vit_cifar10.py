"""CIFAR-10, a small ViT (vit_tiny: 4x4 patches, 64 wide, 2 blocks), DP.

Epsilon 3 at delta 1e-5, Poisson sampling, RDP; Adam, clip 1.0. A CPU-sized
run (a 10,000-image subset, 5 epochs); raise data.train_size (None: all
50,000), model.dim/depth and epochs on an accelerator. Data:
$DPJAX_DATA_DIR/cifar10/cifar-10-batches-py (default ../shared/data).

    dpjax-train --config configs/vit_cifar10.py --workdir runs/vit_cifar10
"""

import os

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'cifar10'
  config.data.manual_dir = os.path.join(
      os.environ.get('DPJAX_DATA_DIR', os.path.join('..', 'shared', 'data')),
      'cifar10', 'cifar-10-batches-py')
  config.data.train_size = 10000
  config.model.name = 'vit_tiny'
  config.model.patch_size = 4
  config.privacy.clip_norm = 1.0
  config.privacy.target_epsilon = 3.0
  config.privacy.delta = 1e-5
  config.privacy.expected_batch_size = 256
  config.privacy.epochs = 5.0
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.perf.microbatch_size = 64
  config.eval_size = 2000
  config.log_every_steps = 10
  return config
