"""The DP-SGD training program, in step order.

``state`` (the train state, the run's keys and optimizer) -> ``features``
(typed feature objects built once from the config, and the one table of
refusals) -> ``step`` (sample -> gather -> engine -> accumulate -> noise ->
optimizer -> mix -> average, one logical step) -> ``loop``
(``train_and_evaluate``: ledger, evaluation, checkpoints) -> ``summary``
(summary.json: what is private, what is a diagnostic).
"""
