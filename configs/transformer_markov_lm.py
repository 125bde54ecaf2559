"""Next-token prediction on Markov sequences by a decoder-only transformer, DP.

The 'markov_lm' task (dpjax/data/markov.py): each position predicts the next
token; the per-example loss is the mean over positions. Bayes-optimal test
accuracy 43.9% per token. Dropout 0.1, each example's mask keyed by its
dataset index in the secret dropout stream.

    dpjax-train --config configs/transformer_markov_lm.py --workdir runs/markov_lm
"""

from configs import _markov


def get_config():
  config = _markov.get_config()
  config.data.name = 'markov_lm'
  config.model.pool = 'none'
  config.model.dropout_rate = 0.1
  return config
