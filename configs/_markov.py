"""Shared settings of the transformer configs on the generated Markov task."""

import ml_collections

from configs import default
from dpjax.data import markov


def get_config() -> ml_collections.ConfigDict:
  """transformer_tiny (64 wide, 2 blocks, 4 heads, mean-pooled) on 'markov', DP, eps 3."""
  config = default.get_config()
  config.data.name = 'markov'
  config.model.name = 'transformer_tiny'
  config.model.vocab_size = markov.VOCAB_SIZE
  config.model.max_length = markov.LENGTH
  config.model.pool = 'mean'
  config.privacy.clip_norm = 1.0
  config.privacy.target_epsilon = 3.0
  config.privacy.delta = 1e-5
  config.privacy.expected_batch_size = 512
  config.privacy.epochs = 5.0
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.log_every_steps = 10
  return config
