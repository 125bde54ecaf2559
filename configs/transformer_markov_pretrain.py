"""Public pretraining: transformer_tiny on 'markov_public', NOT private.

The 2,000 public sequences of the Markov task (the same chains, drawn with
another seed; disjoint from the private set), trained without DP: they are
public. Its checkpoint initializes the private fine-tuning runs
(transformer_markov_lora.py, transformer_markov_full.py; config.init_from).

    dpjax-train --config configs/transformer_markov_pretrain.py \\
        --workdir runs/markov_pretrain
"""

from configs import _markov


def get_config():
  config = _markov.get_config()
  config.data.name = 'markov_public'
  config.privacy.enabled = False
  config.privacy.target_epsilon = None
  config.privacy.expected_batch_size = 128
  config.privacy.epochs = 20.0
  return config
