"""MNIST, tanh CNN: DP-SGD + ModelMix against DP-SGD at the same noise.

CPU-sized comparison for docs/EXPERIMENTS_modelmix.md: 5 epochs (585 steps)
of plain SGD at batch 512, in the regime ModelMix is built for: a large clip
norm (c = 5, few examples clipped) and little Gaussian noise (sigma = 0.2),
whose standard epsilon is large; the secret mixing (tau = 0.15 eta) and the
refined clipping (p = 100) bring the ModelMix epsilon to about 3. Baselines
are the same command with overrides (see the experiments doc):

    dpjax-train --config configs/mnist_modelmix.py --workdir runs/mnist_mm
    dpjax-train --config configs/mnist_modelmix.py --workdir runs/mnist_dpsgd \
        --config.modelmix.enabled=False
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.privacy.clip_norm = 5.0
  config.privacy.noise_multiplier = 0.2
  config.privacy.target_epsilon = None
  config.privacy.expected_batch_size = 512
  config.privacy.epochs = None
  config.privacy.steps = 585
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.2
  config.optimizer.momentum = 0.0
  config.optimizer.schedule = 'constant'
  config.modelmix.enabled = True
  config.modelmix.tau_over_lr = 0.15
  config.modelmix.p = 100.0
  config.perf.pad_to_multiple_of = 64
  config.log_every_steps = 25
  config.eval_every_steps = 65
  return config
