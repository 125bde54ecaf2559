"""Shared settings of the ScatterNet configs (Tramer & Boneh 2021).

Not a config of its own (hence the underscore, which tests/test_configs.py
skips): ``configs/scatternet_{mnist,fashion_mnist,cifar10}.py`` call
:func:`scatternet_config`. Features: the scattering transform (J = 2, L = 8,
order 2) of each image, computed once and cached with the prepared data
(``config.data.features``, :mod:`dpjax.data.features`). Models:
``scatter_linear``, ``scatter_cnn`` and ``scatter_cnn_tb``, the features normalized by GroupNorm
with 27 groups and no scale or bias (the paper's data-independent
normalization), or, where a recipe sets ``stats_clip_norm``, by BatchNorm on
statistics released once over the private set (policy ``privatized_once``,
noise multiplier 8: the paper's private data normalization, its cost composed
into epsilon). Privacy: epsilon 3 at delta 1e-5,
Poisson sampling, RDP unless a recipe names its ``accountant`` (PLD is
tighter: the same epsilon with about 7% less noise); the paper's clip norm 0.1
and SGD with momentum 0.9.
"""

import os

from configs import default

MODELS = {'linear': 'scatter_linear', 'cnn': 'scatter_cnn',
          'cnn_tb': 'scatter_cnn_tb'}


def data_dir(*parts: str) -> str:
  return os.path.join(
      os.environ.get('DPJAX_DATA_DIR', os.path.join('..', 'shared', 'data')),
      *parts)


def scatternet_config(dataset: str, manual_dir: str, model: str,
                      recipes: dict[str, dict[str, float | str]]):
  """The ScatterNet config of ``dataset`` for ``model``, a key of ``recipes``
  (each the batch_size, learning_rate and epochs of one model of MODELS,
  and optionally the stats_clip_norm of privatized_once statistics and the
  accountant)."""
  if model not in recipes:
    raise ValueError(
        f'this ScatterNet config takes a model argument, one of'
        f' {sorted(recipes)} (e.g. --config configs/scatternet_{dataset}.py:'
        f'linear); got {model!r}.')
  batch_size, learning_rate, epochs = (
      recipes[model]['batch_size'], recipes[model]['learning_rate'],
      recipes[model]['epochs'])
  config = default.get_config()
  config.data.name = dataset
  config.data.manual_dir = manual_dir
  config.data.features = 'scatternet'
  config.model.name = MODELS[model]
  config.model.norm = 'group'
  config.model.num_groups = 27
  config.model.affine = False
  stats_clip_norm = recipes[model].get('stats_clip_norm')
  if stats_clip_norm is not None:
    config.model.norm = 'batch'
    config.normalization.policy = 'privatized_once'
    config.normalization.stats_clip_norm = stats_clip_norm
  config.privacy.clip_norm = 0.1
  config.privacy.target_epsilon = 3.0
  config.privacy.delta = 1e-5
  config.privacy.expected_batch_size = batch_size
  config.privacy.epochs = epochs
  config.privacy.accountant = recipes[model].get('accountant', 'rdp')
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = learning_rate
  config.optimizer.momentum = 0.9
  config.eval_every_steps = 0
  config.log_every_steps = 5
  return config
