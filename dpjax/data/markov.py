"""Token sequences from fixed random Markov chains: a text task, no download.

``NUM_CHAINS`` first-order Markov chains over ``VOCAB_SIZE`` tokens, drawn
once from a fixed seed, each a perturbation of one shared chain (so that
they are hard to tell apart from a few tokens). An example is a sequence of
``LENGTH`` tokens from one chain, the chain chosen uniformly. Two tasks:

* ``'markov'``: sequence classification, the label is the chain (4
  classes). The Bayes-optimal classifier (the chain of highest likelihood,
  the chains known) scores **86.8%** on the test split.
* ``'markov_lm'``: next-token prediction, labels [T] are the tokens shifted
  by one (the sequences have T + 1 tokens). The Bayes-optimal predictor
  (the posterior mixture of the chains given the prefix) scores **43.9%**
  per token on the test split.

Splits: 20,000 private training sequences, 2,000 test sequences, and
``'markov_public'``, the classification task whose training split is 2,000
OTHER sequences of the same chains (another sampling seed): public data to
pretrain on before private fine-tuning. Every split is a pure function of
its seed, generated in well under a second on a CPU.

Example fields as the training step sees them: ``{'tokens': int32 [T],
'label': int32 [] or [T]}`` (:class:`dpjax.data.ArrayDataset` holds the
tokens as its ``images``, [N, T] int32).
"""

from __future__ import annotations

import numpy as np

from dpjax.data import base

VOCAB_SIZE = 16
NUM_CHAINS = 4
LENGTH = 32
TRAIN_SIZE, TEST_SIZE, PUBLIC_SIZE = 20_000, 2_000, 2_000
CHAIN_SEED = 0
# Sampling seeds of the splits: part of the dataset's definition, not a run's
# randomness (they never touch the key schedule).
SPLIT_SEEDS = {'train': 1, 'test': 2, 'public': 3}
# Peaked transitions (a Dirichlet of low concentration), and how far each
# chain's depart from the shared one.
_CONCENTRATION = 0.1
_MIX = 0.12
NAMES = ('markov', 'markov_lm', 'markov_public')


def chains(seed: int = CHAIN_SEED) -> tuple[np.ndarray, np.ndarray]:
  """``(initial [K, V], transitions [K, V, V])`` of the K chains."""
  rng = np.random.default_rng(seed)
  shared = rng.dirichlet(np.full(VOCAB_SIZE, _CONCENTRATION), size=VOCAB_SIZE)
  own = rng.dirichlet(np.full(VOCAB_SIZE, _CONCENTRATION),
                      size=(NUM_CHAINS, VOCAB_SIZE))
  transitions = (1 - _MIX) * shared + _MIX * own
  initial = np.full((NUM_CHAINS, VOCAB_SIZE), 1.0 / VOCAB_SIZE)
  return initial, transitions


def sample(n: int, length: int, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens [n, length] int32, chain [n] int32)``, vectorized over n."""
  initial, transitions = chains()
  rng = np.random.default_rng(seed)
  chain = rng.integers(0, NUM_CHAINS, n)
  uniform = rng.random((n, length))
  tokens = np.empty((n, length), np.int32)

  def draw(probs, u):
    return np.minimum((probs.cumsum(-1) < u[:, None]).sum(-1),
                      VOCAB_SIZE - 1)

  tokens[:, 0] = draw(initial[chain], uniform[:, 0])
  for t in range(1, length):
    tokens[:, t] = draw(transitions[chain, tokens[:, t - 1]], uniform[:, t])
  return tokens, chain.astype(np.int32)


def chain_log_posterior(tokens: np.ndarray) -> np.ndarray:
  """log p(chain | tokens[:t + 1]) for every prefix: [n, T, K]."""
  initial, transitions = chains()
  logp = np.log(transitions)[:, tokens[:, :-1], tokens[:, 1:]]  # [K, n, T-1]
  first = np.log(initial)[:, tokens[:, 0]][..., None]  # [K, n, 1]
  joint = np.concatenate([first, logp], -1).cumsum(-1).transpose(1, 2, 0)
  return joint - np.logaddexp.reduce(joint, -1, keepdims=True)


def bayes_accuracy(tokens: np.ndarray, chain: np.ndarray) -> float:
  """Accuracy of the Bayes-optimal chain classifier."""
  return float((chain_log_posterior(tokens)[:, -1].argmax(-1) == chain).mean())


def bayes_next_token_accuracy(tokens: np.ndarray) -> float:
  """Per-token accuracy of the Bayes-optimal predictor of tokens[:, 1:]."""
  _, transitions = chains()
  post = np.exp(chain_log_posterior(tokens[:, :-1]))  # [n, T, K]
  next_probs = np.einsum('ntk,kntv->ntv', post,
                         transitions[:, tokens[:, :-1]])
  return float((next_probs.argmax(-1) == tokens[:, 1:]).mean())


def _split(task: str, n: int, seed: int) -> base.ArrayDataset:
  if task == 'lm':
    tokens, _ = sample(n, LENGTH + 1, seed)
    return base.ArrayDataset(tokens[:, :-1], tokens[:, 1:])
  tokens, chain = sample(n, LENGTH, seed)
  return base.ArrayDataset(tokens, chain)


def load(name: str) -> base.DataSplits:
  """The splits of ``name`` ('markov', 'markov_lm' or 'markov_public')."""
  if name not in NAMES:
    raise ValueError(f'Unknown Markov task {name!r}; known: {NAMES}.')
  task = 'lm' if name == 'markov_lm' else 'classify'
  train = 'public' if name == 'markov_public' else 'train'
  return base.DataSplits(
      name=name,
      train=_split(task, PUBLIC_SIZE if train == 'public' else TRAIN_SIZE,
                   SPLIT_SEEDS[train]),
      test=_split(task, TEST_SIZE, SPLIT_SEEDS['test']),
      num_classes=VOCAB_SIZE if task == 'lm' else NUM_CHAINS)
