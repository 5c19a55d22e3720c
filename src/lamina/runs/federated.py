"""Federated learning on Flower: the run's training split cut into client partitions (data/partitions.py), each
client training lamina's model with lamina's task and Trainer on its own partition, Flower's server loop and
strategies (FedAvg, FedProx; McMahan et al. 2017, Li et al. 2020) sampling clients and aggregating their weights.

Who does what:
- Flower: `flwr.server.Server` runs the rounds (configure_fit -> fit_clients -> aggregate_fit -> evaluate);
  `SimpleClientManager.sample` picks the round's clients; FedAvg / FedProx aggregate (weighted by sample count)
  and accept failures; `DifferentialPrivacyServerSideFixedClipping` clips each update and adds Gaussian noise
  when federated.clip / noise are set. None of this is re-implemented here.
- lamina (this module): the client's local training (`local_fit`: a fresh model from the global weights,
  runs.train.fit_part for federated.local_epochs over the partition, BatchNorm statistics recomputed after the
  short fit, FedProx's proximal term as the task wrapper in runs/objectives/federated.py), the central test of the global model after every round, its
  checkpoint (checkpoints/last, written atomically, so `lamina eval RUN`, `predict`, `export` and
  `model.pretrained=RUN` open it like any run) and federated.json (per round: test accuracy and loss, the clients
  sampled, those that trained and those that failed).

Engines (federated.engine):
- **inprocess**: Flower's Server, SimpleClientManager and strategy, with one ClientProxy per client that calls
  the client's NumPyClient in this process (Flower's own NumPyClient -> Client conversion, no Ray, no network).
  The server runs sampled clients one after another (max_workers=1): at any time the memory holds the global
  model and one client model; a client's samples are gathered from its index array only while it trains.
- **processes**: Flower's gRPC server (`flwr.server.start_server`, a deprecated but working compat API in
  flwr 1.42) and one spawned process per client connected with `flwr.client.start_client`. Each process loads
  the data itself and keeps only its own partition. Sampled clients train concurrently.

Dropouts: a client told to drop out (federated.dropout_client in dropout_round, or any sampled client with
probability dropout_prob, seeded) fails half-way through its local epoch: in process it raises, as a process it
exits. Flower counts it among the round's failures, FedAvg averages the others (accept_failures), and the
history records who failed. The clients that drop stay registered in process (they come back next round); a
dead process is gone for good.

Centralised baseline: `central` is the same loop with one client holding the whole training split (aggregation
is then the identity): the same optimizer, local epochs per round and evaluation points, so its curve lines up
with the federated ones round by round. With federated.fraction_fit < 1 it sees more samples per round than the
federated runs do; the comparison table says so.

Nothing here prints; `on_event` reports progress to the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lamina.config import RunConfig, to_dict, to_yaml, validate
from lamina.data.base import DataBundle
from lamina.data.facts import DataFacts
from lamina.data.partitions import class_counts, label_skew, make_partition
from lamina.engine import Trainer, seed_everything
from lamina.engine.callbacks import Callback
from lamina.engine.checkpoint import save_checkpoint
from lamina.errors import ConfigError, MissingDependencyError
from lamina.io import atomic_write_text
from lamina.runs.build import (build_run_model, check_finite_data, count_params, data_facts, load_data, make_task,
                               task_class)
from lamina.runs.folder import RunFolder
from lamina.runs.objectives.federated import FedProxTask
from lamina.runs.outputs import jsonable
from lamina.runs.train import checkpoint_info, fit_part
from lamina.tasks import TASKS
from lamina.tasks.classification import ClassificationTask

STRATEGIES = ("fedavg", "fedprox")
SPLITS = ("iid", "dirichlet")
SETTINGS = tuple(f"{s}-{p}" for s in STRATEGIES for p in SPLITS) + ("central",)


def require_flwr():
    """Import Flower, or one line saying how to get it."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise MissingDependencyError('flwr is not installed; federated learning needs '
                                     'pip install "lamina[federated]"') from None
    from lamina.runs import _flower

    return _flower


class ClientDropout(RuntimeError):
    """A client leaving mid-round (in-process engine); Flower records it as the round's failure."""


# ----- the data side: what every client and the server share ----------------------------------------------------
@dataclasses.dataclass
class FedSetup:
    cfg: RunConfig
    bundle: DataBundle
    facts: DataFacts
    task: object
    parts: list[torch.Tensor]  # each client's sample indices into bundle.train
    seed: int


def fed_seed(cfg: RunConfig) -> int:
    return cfg.federated.seed if cfg.federated.seed is not None else cfg.seed


def make_setup(cfg: RunConfig) -> FedSetup:
    f = cfg.federated
    seed = fed_seed(cfg)
    seed_everything(cfg.seed)
    bundle = load_data(cfg)
    check_finite_data(bundle)
    task_cls = task_class(cfg, bundle)
    facts = data_facts(bundle, task_cls)
    if f.split == "dirichlet" and not issubclass(task_cls, ClassificationTask):
        raise ConfigError(f"federated.split: dirichlet splits by class label and needs a classification task; this "
                          f"run's task is {facts.task} (use federated.split=iid)")
    if bundle.test is None or len(bundle.test) == 0:
        raise ConfigError(f"federated: data set '{bundle.name}' has no test split; the global model is tested on it "
                          "after every round")
    labels = bundle.train.y if "y" in bundle.train.tensors else torch.zeros(len(bundle.train), dtype=torch.long)
    parts = make_partition(f.split, labels, f.clients, seed, f.alpha, f.min_client_samples if f.split ==
                           "dirichlet" else 1)
    return FedSetup(cfg, bundle, facts, make_task(cfg, facts), parts, seed)


def get_weights(model: torch.nn.Module) -> list[np.ndarray]:
    """Every state-dict entry (parameters and BatchNorm statistics: FedAvg averages both), in state-dict order."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: torch.nn.Module, weights: Sequence[np.ndarray]) -> None:
    state = model.state_dict()
    if len(weights) != len(state):
        raise ConfigError(f"federated: received {len(weights)} arrays for a model with {len(state)} tensors")
    new = {}
    for (name, ref), w in zip(state.items(), weights):
        t = torch.from_numpy(np.asarray(w))
        if tuple(t.shape) != tuple(ref.shape):
            raise ConfigError(f"federated: tensor {name} has shape {tuple(t.shape)}, the model's is {tuple(ref.shape)}")
        # aggregation turns integer counters (num_batches_tracked) into floats: round back
        new[name] = (t.round() if not ref.dtype.is_floating_point else t).to(ref.dtype)
    model.load_state_dict(new)


def drops_out(cfg: RunConfig, cid: int, server_round: int) -> bool:
    """Does client `cid` drop out in this round? The named client in its round, or a seeded coin per
    (round, client) so every engine and every rerun drops the same ones."""
    f = cfg.federated
    if f.dropout_client == cid and f.dropout_round == server_round:
        return True
    if f.dropout_prob > 0:
        g = np.random.default_rng([fed_seed(cfg), server_round, cid, 7])
        return bool(g.random() < f.dropout_prob)
    return False


class _DropMidway(Callback):
    """Leaves local training after half of the first epoch's batches (`leave()` raises or exits)."""

    def __init__(self, after: int, leave: Callable[[], None]):
        self.after, self.leave, self.seen = max(1, after), leave, 0

    def on_train_batch_end(self, trainer, loss) -> None:
        self.seen += 1
        if self.seen >= self.after:
            self.leave()


def _raise_dropout(cid: int, server_round: int) -> Callable[[], None]:
    def leave():
        raise ClientDropout(f"client {cid} dropped out mid-fit in round {server_round}")

    return leave


def local_fit(s: FedSetup, cid: int, weights: Sequence[np.ndarray], server_round: int, mu: float = 0.0,
              leave: Callable[[], None] | None = None) -> tuple[list[np.ndarray], int, dict]:
    """One client's round: a fresh model with the global weights, `local_epochs` over its partition (a fresh
    optimizer, as every client starts the round from the server's weights), FedProx's term when mu > 0. Returns
    (weights, samples, metrics). The model and the gathered samples live only for this call."""
    cfg = s.cfg
    local = cfg.model_copy(deep=True)
    local.trainer.max_epochs = cfg.federated.local_epochs
    local.trainer.max_steps = None
    local.trainer.progress = False
    model = build_run_model(cfg, s.facts)
    set_weights(model, weights)
    task = FedProxTask(s.task, model, mu) if mu > 0 else s.task
    data = s.bundle.train.subset(s.parts[cid])
    sub = dataclasses.replace(s.bundle, train=data, val=None, test=None)
    # a different shuffle per client and round, the same on every engine and rerun
    loader = task.train_loader(sub, cfg.data, s.seed * 100_003 + server_round * 1_009 + cid, None)
    torch.manual_seed(s.seed * 100_003 + server_round * 1_009 + cid)  # dropout masks, like the shuffle
    callbacks = []
    if drops_out(cfg, cid, server_round):
        callbacks.append(_DropMidway(len(loader) // 2, leave or _raise_dropout(cid, server_round)))
    # a client's few steps leave BatchNorm's running statistics trailing its weights (fit_part recalibrates short
    # fits): each client sends statistics of its own final weights on its own data, which FedAvg then averages
    trainer = fit_part(local, model, task, loader, None, callbacks, None)
    last = trainer.history[-1] if trainer.history else {}
    metrics = {"cid": int(cid), "train_loss": float(last.get("train/loss", float("nan"))),
               "train_s": float(trainer.train_time)}
    return get_weights(model), len(data), metrics


# ----- the server side: central test, checkpoints, history ----------------------------------------------------
class GlobalModel:
    """The server's copy of the global model: tested on the test split after each round and saved as the run's
    checkpoints/last (atomic, like every lamina checkpoint); federated.json is rewritten with the history."""

    def __init__(self, s: FedSetup, folder: RunFolder, label: str, on_event: Callable[[dict], None]):
        self.s, self.folder, self.label, self.emit = s, folder, label, on_event
        self.model = build_run_model(s.cfg, s.facts)
        self.trainer = Trainer(s.cfg.trainer)
        self.loader = s.task.eval_loader(s.bundle.test, s.bundle, s.cfg.data, None)
        self.info = checkpoint_info(s.cfg, self.model, s.facts, [f"federated:{label}"])
        self.rounds: list[dict] = []
        self.participation: dict[int, dict] = {}  # filled by the strategy recorder
        self.t_round = time.perf_counter()
        self.result: dict = {}

    def initial(self) -> list[np.ndarray]:
        return get_weights(self.model)

    def evaluate(self, server_round: int, weights: list[np.ndarray], config: dict) -> tuple[float, dict]:
        t0 = time.perf_counter()
        set_weights(self.model, weights)
        m = self.trainer.evaluate(self.model, self.s.task, self.loader, prefix="test")
        acc, loss = float(m.get("test/acc", float("nan"))), float(m["test/loss"])
        eval_s = time.perf_counter() - t0
        row = {"round": server_round, "test/acc": acc, "test/loss": loss,
               "round_s": t0 - self.t_round, "eval_s": eval_s, **self.participation.get(server_round, {})}
        self.rounds.append(row)
        meta = {**self.info, "epoch": server_round, "global_step": server_round, "batch_in_epoch": 0,
                "metrics": {"test/acc": acc, "test/loss": loss}, "federated_round": server_round}
        save_checkpoint(self.folder.checkpoints / "last", self.model, {"round": server_round}, meta)
        self.write()
        self.emit({"event": "round_end", "setting": self.label, **row})
        self.t_round = time.perf_counter()
        return loss, {"acc": acc}

    def write(self) -> None:
        atomic_write_text(self.folder.path / "federated.json",
                          json.dumps({**self.result, "rounds": self.rounds}, indent=2, default=jsonable))


@contextmanager
def _quiet_flower():
    """Flower logs every round (and its deprecation notices) to the console; the CLI reports progress itself."""
    log = logging.getLogger("flwr")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def setting_config(cfg: RunConfig, setting: str) -> RunConfig:
    """The config of one compared setting: 'fedavg-iid', 'fedprox-dirichlet', ... or 'central' (one client with
    every training sample, no sampling, no dropouts, no DP)."""
    raw = to_dict(cfg)
    f = raw.setdefault("federated", {})
    if setting == "central":
        f.update(strategy="fedavg", clients=1, split="iid", fraction_fit=1.0, min_fit_clients=1,
                 dropout_client=None, dropout_round=None, dropout_prob=0.0, clip=None, noise=0.0)
    else:
        strategy, split = setting.split("-")
        f.update(strategy=strategy, split=split)
    return validate(raw)


def parse_settings(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--compare: expected comma-separated settings from {', '.join(SETTINGS)}, got {text!r}")
    for n in names:
        if n not in SETTINGS:
            raise ConfigError(f"--compare: unknown setting '{n}'; expected names from {', '.join(SETTINGS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--compare: a setting is named twice in {text!r}")
    return names


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise ConfigError(f"federated.strategy: unknown strategy '{name}'; expected one of {', '.join(STRATEGIES)}")


def run_federated(cfg: RunConfig, on_event: Callable[[dict], None] | None = None, run_dir: str | Path | None = None,
                  label: str | None = None) -> dict:
    """Federated training per cfg.federated; returns the result written to the run folder's federated.json."""
    f = cfg.federated
    check_strategy(f.strategy)
    fl = require_flwr()
    wall0 = time.perf_counter()
    emit = on_event or (lambda ev: None)
    label = label or f"{f.strategy}-{f.split}"
    s = make_setup(cfg)
    folder = RunFolder(run_dir) if run_dir else RunFolder.new(cfg.logging.root, cfg.name or
                                                              f"{cfg.data.name}-federated-{label}",
                                                              cfg.data.name, cfg.model.name)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_text("config.yaml", to_yaml(cfg))
    folder.write_text("data.json", json.dumps(s.facts.to_dict(), indent=2, default=jsonable))
    server_model = GlobalModel(s, folder, label, emit)
    labels = s.bundle.train.y if issubclass(TASKS[s.facts.task], ClassificationTask) else None
    sizes = [len(p) for p in s.parts]
    server_model.result = {
        "run_dir": str(folder.path), "data": s.bundle.name, "model": cfg.model.name,
        "params": count_params(server_model.model), "setting": label, "strategy": f.strategy, "split": f.split,
        "engine": f.engine, "clients": f.clients, "client_sizes": sizes,
        "label_skew": label_skew(s.parts, labels) if labels is not None else None,
        "client_classes": class_counts(s.parts, labels) if labels is not None else None,
        "settings": f.model_dump(), "seed": s.seed,
    }
    emit({"event": "setup", "setting": label, "clients": f.clients, "sizes": sizes,
          "label_skew": server_model.result["label_skew"], "engine": f.engine})
    with _quiet_flower():
        t0 = time.perf_counter()
        if f.engine == "inprocess":
            fl.run_inprocess(s, server_model)
        else:
            fl.run_processes(s, server_model)
        loop_s = time.perf_counter() - t0
    rounds = server_model.rounds
    trained = [r for r in rounds if r["round"] > 0]
    result = {
        **server_model.result, "rounds": rounds, "final_acc": rounds[-1]["test/acc"],
        "final_loss": rounds[-1]["test/loss"], "loop_s": loop_s, "wall_time_s": time.perf_counter() - wall0,
        "eval_s": sum(r["eval_s"] for r in rounds),
        "failures": sum(len(r.get("failed", [])) for r in trained),
        "models_built_per_round_max": max((r.get("models_built", 0) for r in trained), default=0),
    }
    server_model.result = {k: v for k, v in result.items() if k != "rounds"}
    server_model.write()
    if cfg.logging.plots:
        from lamina.plots import plot_federated

        plot_federated({label: [r["test/acc"] for r in rounds]}, folder.path / "accuracy.png",
                       title=f"{s.bundle.name}, {f.clients} clients, {label}: final test acc "
                             f"{result['final_acc']:.3f}")
    return result


def compare_settings(cfg: RunConfig, settings: Sequence[str], out: str | Path,
                     on_event: Callable[[dict], None] | None = None) -> dict:
    """Each setting on the same data, model init, seed and rounds, one run folder each under `out`; then
    comparison.json (final accuracies, the non-IID penalty) and comparison.png (test accuracy vs round)."""
    out = Path(out)
    results = {}
    for name in settings:
        if on_event:
            on_event({"event": "setting_start", "setting": name})
        results[name] = run_federated(setting_config(cfg, name), on_event, run_dir=out / name, label=name)
    f = cfg.federated
    summary = {
        "data": cfg.data.name, "model": cfg.model.name, "clients": f.clients, "rounds": f.rounds,
        "local_epochs": f.local_epochs, "fraction_fit": f.fraction_fit, "alpha": f.alpha, "mu": f.mu,
        "seed": fed_seed(cfg),
        "settings": {n: {"final_acc": r["final_acc"], "best_acc": max(x["test/acc"] for x in r["rounds"]),
                         "acc_per_round": [x["test/acc"] for x in r["rounds"]], "label_skew": r["label_skew"],
                         "failures": r["failures"], "loop_s": r["loop_s"], "run_dir": r["run_dir"]}
                     for n, r in results.items()},
    }
    for strategy in STRATEGIES:  # accuracy lost to label skew, same strategy
        iid, non = results.get(f"{strategy}-iid"), results.get(f"{strategy}-dirichlet")
        if iid and non:
            summary.setdefault("non_iid_penalty", {})[strategy] = iid["final_acc"] - non["final_acc"]
    if "central" in results:
        summary["gap_to_central"] = {n: results["central"]["final_acc"] - r["final_acc"]
                                     for n, r in results.items() if n != "central"}
    atomic_write_text(out / "comparison.json", json.dumps(summary, indent=2, default=jsonable))
    if cfg.logging.plots:
        from lamina.plots import plot_federated

        plot_federated({n: v["acc_per_round"] for n, v in summary["settings"].items()}, out / "comparison.png",
                       title=f"{cfg.data.name}: {f.clients} clients, {f.local_epochs} local epoch(s)/round, "
                             f"Dirichlet alpha {f.alpha}")
    summary["out"] = str(out)
    return summary


__all__ = ["SETTINGS", "STRATEGIES", "ClientDropout", "FedSetup", "check_strategy", "compare_settings", "drops_out",
           "get_weights", "local_fit", "make_setup", "parse_settings", "require_flwr", "run_federated", "set_weights",
           "setting_config"]
