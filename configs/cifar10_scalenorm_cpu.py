"""CPU-sized configs/cifar10_scalenorm.py: ResNet-9 (GroupNorm + ScaleNorm)
at a quarter of its width, epsilon 8.

The recipe of Klause et al. 2022 as configs/cifar10_scalenorm.py has it
(Mish, NAdam lr 1e-3, C = 1.5, Poisson sampling, RDP, epsilon 8 at delta
1e-5, no augmentation), shrunk for 2 CPU cores (aimed at about an hour; not
timed yet): channels x 0.25 (16 to 64; GroupNorm groups min(32, channels)),
expected batch 512 and 5 epochs (490 steps) on the full training set,
evaluations during training on 2,000 test images (the last on all 10,000).

    dpjax-train --config configs/cifar10_scalenorm_cpu.py --workdir runs/scalenorm_cpu
"""

from configs import cifar10_scalenorm


def get_config():
  config = cifar10_scalenorm.get_config()
  config.model.width = 0.25
  config.privacy.expected_batch_size = 512
  config.privacy.epochs = 5.0
  config.perf.microbatch_size = 128
  config.eval_size = 2000
  config.eval_every_steps = 49
  return config
