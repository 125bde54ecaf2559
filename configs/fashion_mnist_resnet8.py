"""Fashion-MNIST subset, ResNet-8: the CPU-sized normalization comparison.

One private set (10,000 training images, a seeded subset; 1% of the training
set held out as public data in every run, so N is the same for all), one
privacy budget (epsilon 3 at delta 1e-5, Poisson sampling, RDP) and one
optimizer recipe (NAdam lr 2e-3, clip 1.5, after Klause et al.), five
normalization choices (docs/EXPERIMENTS_normalization.md):

    dpjax-train --config configs/fashion_mnist_resnet8.py --config.model.norm=none
    dpjax-train --config configs/fashion_mnist_resnet8.py              # GroupNorm
    dpjax-train --config configs/fashion_mnist_resnet8.py --config.model.scale_norm=True
    dpjax-train --config configs/fashion_mnist_resnet8.py --config.model.norm=batch \\
        --config.normalization.policy=public
    dpjax-train --config configs/fashion_mnist_resnet8.py --config.model.norm=batch \\
        --config.normalization.policy=privatized

Data: $DPJAX_DATA_DIR/fashion_mnist (default ../shared/data/fashion_mnist).
"""

import os

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'fashion_mnist'
  config.data.manual_dir = os.path.join(
      os.environ.get('DPJAX_DATA_DIR', os.path.join('..', 'shared', 'data')),
      'fashion_mnist')
  config.data.public_fraction = 0.01
  config.data.train_size = 10000
  config.model.name = 'resnet8'
  config.model.norm = 'group'
  config.model.num_groups = 8
  config.model.width = 0.5
  config.model.activation = 'relu'
  config.normalization.public_batch_size = 64
  config.privacy.clip_norm = 1.5
  config.privacy.target_epsilon = 3.0
  config.privacy.delta = 1e-5
  config.privacy.expected_batch_size = 256
  config.privacy.epochs = 5.0
  config.optimizer.name = 'nadam'
  config.optimizer.learning_rate = 2e-3
  config.perf.microbatch_size = 32
  config.perf.pad_to_multiple_of = 32
  config.eval_every_steps = 65
  config.log_every_steps = 10
  return config
