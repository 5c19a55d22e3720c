"""Search and sweeps over runs: hyperparameter tuning (Optuna), architecture search, seed repeats, learning-rate
range tests and scaling-law sweeps. Every search trains through `lamina.runs.train`, so it works on any config
and any model family; nothing here knows a model's internals beyond its config options.

Optuna is an optional dependency (`pip install "lamina[tune]"`), imported lazily.
"""
