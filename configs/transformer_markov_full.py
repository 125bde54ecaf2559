"""Private full fine-tuning of the publicly pretrained Markov transformer.

Every parameter of transformer_markov_pretrain.py's model (its workdir,
``config.init_from``, default runs/markov_pretrain) is trained with DP-SGD
on the 20,000 private sequences, epsilon 3 at delta 1e-5. Compare with LoRA
(transformer_markov_lora.py); results: docs/EXPERIMENTS_transformers.md.

    dpjax-train --config configs/transformer_markov_full.py \\
        --workdir runs/markov_full
"""

import os

from configs import _markov


def get_config():
  config = _markov.get_config()
  config.init_from = os.path.join('runs', 'markov_pretrain')
  config.privacy.epochs = 2.0
  config.optimizer.learning_rate = 3e-4
  return config
