"""A decoder-only transformer classifies Markov sequences, trained under DP.

Which of 4 fixed random Markov chains generated a sequence of 32 tokens
(dpjax/data/markov.py, generated, no download; Bayes-optimal test accuracy
86.8%), by transformer_tiny from scratch on the 20,000 private sequences,
epsilon 3 at delta 1e-5 (Poisson sampling, RDP).

    dpjax-train --config configs/transformer_markov.py --workdir runs/markov
"""

from configs import _markov


def get_config():
  return _markov.get_config()
