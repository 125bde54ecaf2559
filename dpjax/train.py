"""The DP-SGD training program: ``train_and_evaluate(config, workdir)``.

The entry point of ``dpjax-train`` and of the flax-examples-shaped API. The
program lives in :mod:`dpjax.training`, one module per stage in step order:
``state`` (train state, keys, optimizer), ``features`` (typed features and
the one refusal table), ``run`` (everything built from the config once),
``step`` (one logical step), ``loop`` (ledger, evaluation, checkpoints) and
``summary`` (summary.json). The names below are the stable ones.
"""

from dpjax.training.features import example_loss
from dpjax.training.loop import train_and_evaluate
from dpjax.training.run import privacy_config
from dpjax.training.state import create_train_state
from dpjax.training.state import key_schedule
from dpjax.training.state import make_optimizer
from dpjax.training.state import TrainState
from dpjax.training.step import make_eval_fn
from dpjax.training.step import make_train_step
from dpjax.training.step import tune_microbatch
from dpjax.training.summary import DIAGNOSTICS
from dpjax.training.summary import LOSS_LABEL

__all__ = [
    'DIAGNOSTICS', 'LOSS_LABEL', 'TrainState', 'create_train_state',
    'example_loss', 'key_schedule', 'make_eval_fn', 'make_optimizer',
    'make_train_step', 'privacy_config', 'train_and_evaluate',
    'tune_microbatch',
]
