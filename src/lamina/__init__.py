"""lamina: a PyTorch deep-learning toolkit. `create_model`, `load_dataset`, `Trainer`, `train`.

Layering (issue 13). Packages are ranked; a module imports only from its own package or from a lower rank,
imports inside functions and under `if TYPE_CHECKING` included:

    9  cli, __main__                    parse, validate, call the library; the only place that prints or exits
    8  trust  compress  deploy  report  tools: read a run through runs.open_run, target the model contract
       search                        tuning, NAS, seeds, lr range test, scaling sweeps: many runs.train calls
    7  runs                             a config becomes data + model + task + Trainer + run folder; open_run;
                                        objectives (adversarial, distillation, SSL, continual, federated) plug
                                        in here, one file each under runs/objectives, chosen by their config
    6  engine                           Trainer, callbacks, checkpoints, precision, distributed; knows no tool
                                        and no objective
    5  tasks  hub                       what a problem is; pretrained weights in and out
    4  models  data                     model families + registry; datasets, tokenizers, transforms, loaders
    3  nn                               reusable layers (incl. Normalize / Normalized), no model knowledge
    2  config                           typed run configs, YAML, dotted overrides
    1  io  plots                        leaves over errors: atomic writes, safetensors, hashing; figures
    0  errors                           user-facing errors

Packages of one rank do not import each other; the one exception is trust -> report (public names: the
audit writes the report). No package imports another package's private (`_underscore`) names or modules. A
new package gets a rank before it is written. This module is exempt: its lazy `__getattr__` re-exports the
user-facing names from above without importing them (so `import lamina` stays torch-free).
tests/test_layering.py walks every import in src/lamina and fails on any edge that breaks these rules; its
RANKS table is the source of truth.
"""

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
    if name in ("train", "evaluate", "predict", "generate", "open_run"):
        from lamina import runs

        return getattr(runs, name)
    if name in ("load_config", "RunConfig"):
        from lamina import config

        return getattr(config, name)
    raise AttributeError(name)
