"""CPU-sized configs/cifar10_modelmix.py: ResNet-20 (GroupNorm) at half its
width, DP-SGD + ModelMix at a ModelMix epsilon of 8.

The settings of Xiao, Wan, Devadas 2022 as configs/cifar10_modelmix.py has
them (c = 20, plain SGD at eta = 0.15, tau = 0.15 eta, p = 100, every
coordinate mixed), shrunk for 2 CPU cores (aimed at about an hour; not timed
yet): channels x 0.5 (8, 16, 32; GroupNorm groups min(16, channels)),
expected batch 500 (q = 0.01) and 1000 steps (10 epochs), evaluations during
training on 2,000 test images (the last on all 10,000). sigma = 0.2287 puts the ModelMix
epsilon at 8.0 after 1000 steps (delta = 1e-5); the standard epsilon of the
same run, which always holds, is reported beside it.

    dpjax-train --config configs/cifar10_modelmix_cpu.py --workdir runs/c10_modelmix_cpu
"""

from configs import cifar10_modelmix


def get_config():
  config = cifar10_modelmix.get_config()
  config.model.width = 0.5
  config.privacy.noise_multiplier = 0.2287
  config.privacy.expected_batch_size = 500
  config.privacy.steps = 1000
  config.perf.microbatch_size = 125
  config.eval_size = 2000
  config.eval_every_steps = 100
  return config
