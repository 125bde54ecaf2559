"""MNIST or Fashion-MNIST, a small ViT (vit_tiny, 7x7 patches), DP.

Epsilon 3 at delta 1e-5, Poisson sampling, RDP; Adam, clip 1.0, 10 epochs
of the 60,000 training images. The argument picks the dataset (default
'mnist'). Data: $DPJAX_DATA_DIR/<dataset> (default ../shared/data).

    dpjax-train --config configs/vit_mnist.py --workdir runs/vit_mnist
    dpjax-train --config configs/vit_mnist.py:fashion_mnist \\
        --workdir runs/vit_fashion_mnist
"""

import os

from configs import default

DATASETS = ('mnist', 'fashion_mnist')


def get_config(dataset: str = 'mnist'):
  if dataset not in DATASETS:
    raise ValueError(f'vit_mnist.py takes one of {DATASETS}, got'
                     f' {dataset!r}.')
  config = default.get_config()
  config.data.name = dataset
  config.data.manual_dir = os.path.join(
      os.environ.get('DPJAX_DATA_DIR', os.path.join('..', 'shared', 'data')),
      dataset)
  config.model.name = 'vit_tiny'
  config.model.patch_size = 7
  config.privacy.clip_norm = 1.0
  config.privacy.target_epsilon = 3.0
  config.privacy.delta = 1e-5
  config.privacy.expected_batch_size = 512
  config.privacy.epochs = 10.0
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.perf.microbatch_size = 128
  config.eval_size = 2000
  config.log_every_steps = 10
  return config
