"""lamina: a PyTorch deep-learning toolkit. `create_model`, `load_dataset`, `Trainer`, `train`."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `lamina --version` must not import torch
    if name in ("create_model", "list_models"):
        from lamina import models

        return getattr(models, name)
    if name in ("load_dataset", "list_datasets"):
        from lamina import data

        return getattr(data, name)
    if name == "Trainer":
        from lamina.engine import Trainer

        return Trainer
    if name in ("train", "evaluate", "predict"):
        from lamina import runner

        return getattr(runner, name)
    if name in ("load_config", "RunConfig"):
        from lamina import config

        return getattr(config, name)
    raise AttributeError(name)
