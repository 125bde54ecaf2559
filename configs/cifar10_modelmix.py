"""CIFAR-10, ResNet-20 (GroupNorm), DP-SGD + ModelMix at the paper's settings
(GPU-sized: 3500 steps of batch 1500; CPU: configs/cifar10_modelmix_cpu.py).

Xiao, Wan, Devadas 2022 ("Differentially Private Deep Learning with ModelMix",
arXiv 2210.03843): q = 1500 / 50000, c = 20, plain SGD at eta = 0.15, 3500
iterations, tau = 0.15 eta, refined clipping with p = 100. They report 70.4%
at a ModelMix epsilon of 8 (DP-SGD alone: 56.1%). Here sigma = 0.342 puts the
ModelMix epsilon at 7.99 after 3500 steps (delta = 1e-5); the standard
accountant's epsilon of the same run, which always holds, is about 510 (RDP).
Both are reported (`epsilon`, `epsilon_modelmix`). Every coordinate is mixed,
GroupNorm parameters included (the authors' code skipped them).

    dpjax-train --config configs/cifar10_modelmix.py --workdir runs/c10_modelmix

Data: the python batches in $DPJAX_DATA_DIR/cifar10/cifar-10-batches-py
(default ../shared/data), read by dpjax's tfds builder; nothing is downloaded.
"""

import os

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'cifar10'
  config.data.manual_dir = os.path.join(
      os.environ.get('DPJAX_DATA_DIR', os.path.join('..', 'shared', 'data')),
      'cifar10', 'cifar-10-batches-py')
  config.model.name = 'resnet20'
  config.model.norm = 'group'
  config.model.activation = 'relu'
  config.privacy.clip_norm = 20.0
  config.privacy.noise_multiplier = 0.342
  config.privacy.target_epsilon = None
  config.privacy.delta = 1e-5
  config.privacy.expected_batch_size = 1500
  config.privacy.epochs = None
  config.privacy.steps = 3500
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.15
  config.optimizer.momentum = 0.0
  config.optimizer.schedule = 'constant'
  config.modelmix.enabled = True
  config.modelmix.tau_over_lr = 0.15
  config.modelmix.p = 100.0
  config.perf.microbatch_size = 250
  config.log_every_steps = 50
  config.eval_every_steps = 250
  return config
