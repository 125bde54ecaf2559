"""Private LoRA fine-tuning of the publicly pretrained Markov transformer.

The pretrained model (transformer_markov_pretrain.py's workdir,
``config.init_from``, default runs/markov_pretrain) is frozen; LoRA adapters
of rank 4 on every dense layer and attention projection, and the head, are
trained with DP-SGD on the 20,000 private sequences (Hu et al. 2022; Yu et
al. 2022), epsilon 3 at delta 1e-5. Compare with full fine-tuning
(transformer_markov_full.py); results: docs/EXPERIMENTS_transformers.md.

    dpjax-train --config configs/transformer_markov_lora.py \\
        --workdir runs/markov_lora
"""

from configs import transformer_markov_full


def get_config():
  config = transformer_markov_full.get_config()
  config.model.lora_rank = 4
  config.model.lora_alpha = 8.0
  config.optimizer.learning_rate = 2e-3
  return config
