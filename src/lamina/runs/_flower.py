"""The Flower side of runs/federated.py (imported only once flwr is known to be installed): lamina's NumPyClient,
an in-process ClientProxy, a strategy wrapper that records who took part in each round, a client manager with its
own random stream, and the two engines. Flower's strategies, sampling, server loop and gRPC transport do the work.
"""

from __future__ import annotations

import os
import random
import socket
import warnings

from flwr.client import NumPyClient
from flwr.common import (DisconnectRes, EvaluateIns, EvaluateRes, FitIns, FitRes, GetParametersIns, GetParametersRes,
                         GetPropertiesIns, GetPropertiesRes, ReconnectIns, ndarrays_to_parameters)
from flwr.server import Server, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx, Strategy

from lamina.runs.federated import FedSetup, GlobalModel, local_fit, make_setup


class LaminaClient(NumPyClient):
    """One client: its partition index (`cid`) and the shared setup; it builds a model only inside `fit`."""

    def __init__(self, setup: FedSetup, cid: int, leave=None):
        self.setup, self.cid, self.leave = setup, int(cid), leave
        self.models_built = 0

    def get_properties(self, config):
        return {"partition": self.cid}

    def get_parameters(self, config):  # the strategy holds the initial weights; never asked
        raise RuntimeError("lamina's federated clients do not provide initial parameters")

    def fit(self, parameters, config):
        self.models_built += 1
        mu = float(config.get("proximal_mu", 0.0))  # Flower's FedProx sends it; FedAvg does not
        return local_fit(self.setup, self.cid, parameters, int(config["server_round"]), mu, self.leave)

    def evaluate(self, parameters, config):  # the server tests the global model centrally
        return 0.0, 0, {}


class InProcessClientProxy(ClientProxy):
    """A client proxy that calls its client in this process: a fresh LaminaClient per call, through Flower's own
    NumPyClient -> Client conversion, so the client's model exists only while it fits."""

    def __init__(self, setup: FedSetup, cid: int, counter: dict):
        super().__init__(str(cid))
        self.setup, self.counter = setup, counter

    def _client(self):
        self.counter["built"] = self.counter.get("built", 0) + 1
        return LaminaClient(self.setup, int(self.cid)).to_client()

    def get_properties(self, ins: GetPropertiesIns, timeout, group_id) -> GetPropertiesRes:
        return self._client().get_properties(ins)

    def get_parameters(self, ins: GetParametersIns, timeout, group_id) -> GetParametersRes:
        return self._client().get_parameters(ins)

    def fit(self, ins: FitIns, timeout, group_id) -> FitRes:
        return self._client().fit(ins)

    def evaluate(self, ins: EvaluateIns, timeout, group_id) -> EvaluateRes:
        return self._client().evaluate(ins)

    def reconnect(self, ins: ReconnectIns, timeout, group_id) -> DisconnectRes:
        return DisconnectRes(reason="")


class SeededClientManager(SimpleClientManager):
    """Flower's SimpleClientManager (its sampling code, unchanged) drawing from a private random stream, so a
    run's client choice depends on its seed alone; `expect`: wait once for that many clients (gRPC engine)."""

    def __init__(self, seed: int, expect: int = 0, wait_s: int = 300):
        super().__init__()
        self._state = random.Random(seed).getstate()
        self.expect, self.wait_s = expect, wait_s

    def wait_expected(self) -> None:
        """Before round 1 (the strategy sizes its sample by the clients connected at that moment)."""
        if self.expect and not self.wait_for(self.expect, timeout=self.wait_s):
            raise RuntimeError(f"only {len(self)} of {self.expect} federated clients connected in {self.wait_s}s")
        self.expect = 0

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        outer = random.getstate()
        random.setstate(self._state)
        try:
            return super().sample(num_clients, min_num_clients, criterion)
        finally:
            self._state = random.getstate()
            random.setstate(outer)


class Recorder(Strategy):
    """Forwards to the real strategy; records, per round, the clients sampled, those that trained, those that
    failed, and each one's metrics. `partition(proxy)` maps a proxy to its client index."""

    def __init__(self, inner: Strategy, server_model: GlobalModel, partition, counter: dict | None = None):
        self.inner, self.server_model, self.partition, self.counter = inner, server_model, partition, counter
        self._sampled: dict[int, list[int]] = {}

    def __repr__(self) -> str:
        return f"Recorder({self.inner!r})"

    def initialize_parameters(self, client_manager):  # Server.fit's first call: wait for the gRPC clients here
        if isinstance(client_manager, SeededClientManager):
            client_manager.wait_expected()
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        if self.counter is not None:
            self.counter["built"] = 0
        ins = self.inner.configure_fit(server_round, parameters, client_manager)
        self._sampled[server_round] = sorted(self.partition(p) for p, _ in ins)
        return ins

    def aggregate_fit(self, server_round, results, failures):
        trained = sorted(int(r.metrics["cid"]) for _, r in results)
        sampled = self._sampled.get(server_round, [])
        messages = [(str(e) or type(e).__name__) if isinstance(e, BaseException) else f"status {e[1].status.code}"
                    for e in failures]
        rec = {"sampled": sampled, "trained": trained, "failed": sorted(set(sampled) - set(trained)),
               "failure_messages": sorted(messages),
               "client_metrics": sorted((dict(r.metrics) for _, r in results), key=lambda m: m["cid"])}
        if self.counter is not None:
            rec["models_built"] = self.counter["built"]
        self.server_model.participation[server_round] = rec
        # Flower gathers results from a set of futures (arbitrary order); a fixed order makes the float sums, and
        # so the whole run, repeat exactly
        results = sorted(results, key=lambda pr: int(pr[1].metrics["cid"]))
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(server_round, parameters)


def _mean_train_loss(metrics: list[tuple[int, dict]]) -> dict:
    n = sum(k for k, _ in metrics)
    return {"train_loss": sum(k * m["train_loss"] for k, m in metrics) / n} if n else {}


def build_strategy(s: FedSetup, server_model: GlobalModel, partition, counter=None) -> Strategy:
    f = s.cfg.federated
    common = {"fraction_fit": f.fraction_fit, "fraction_evaluate": 0.0, "min_fit_clients": f.min_fit_clients,
              "min_evaluate_clients": 0, "min_available_clients": f.min_fit_clients,
              "evaluate_fn": server_model.evaluate, "accept_failures": True,
              "on_fit_config_fn": lambda r: {"server_round": r}, "fit_metrics_aggregation_fn": _mean_train_loss,
              "initial_parameters": ndarrays_to_parameters(server_model.initial())}
    inner = FedProx(proximal_mu=f.mu, **common) if f.strategy == "fedprox" else FedAvg(**common)
    if f.clip is not None:
        expected = max(int(f.clients * f.fraction_fit), f.min_fit_clients)
        inner = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=f.noise, clipping_norm=f.clip,
                                                          num_sampled_clients=expected)
    return Recorder(inner, server_model, partition, counter)


def run_inprocess(s: FedSetup, server_model: GlobalModel) -> None:
    counter: dict = {}
    manager = SeededClientManager(s.seed)
    for cid in range(len(s.parts)):
        manager.register(InProcessClientProxy(s, cid, counter))
    server = Server(client_manager=manager, strategy=build_strategy(s, server_model, lambda p: int(p.cid), counter))
    server.set_max_workers(1)  # one client model in memory at a time; 2 CPU threads gain nothing from more
    server.fit(num_rounds=s.cfg.federated.rounds, timeout=None)


# ----- the gRPC engine: Flower's server here, one process per client ------------------------------------------
def _free_address(address: str) -> str:
    host, _, port = address.rpartition(":")
    if int(port or 0):
        return address
    with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as sock:
        sock.bind((host.strip("[]"), 0))
        return f"{host}:{sock.getsockname()[1]}"


def client_main() -> None:
    """A client process (`python -c "from lamina.runs._flower import client_main; client_main()" CID ADDRESS
    THREADS`, the run's config as JSON on stdin): loads the data and keeps its own partition, then serves Flower's
    gRPC client loop until the server sends it home. A dropout exits the process mid-fit, as a crashed device
    would. A plain subprocess, not multiprocessing: spawn would re-import the caller's __main__."""
    import json
    import logging
    import sys

    import torch

    from lamina.config import validate

    cid, address, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    raw = json.loads(sys.stdin.read())
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")  # start_client's deprecation notice, once per process
    logging.getLogger("flwr").setLevel(logging.ERROR)
    from flwr.client import start_client

    s = make_setup(validate(raw))
    keep = s.parts[cid]
    s.parts = [keep if i == cid else keep[:0] for i in range(len(s.parts))]  # the others' indices: not ours
    start_client(server_address=address, client=LaminaClient(s, cid, leave=lambda: os._exit(17)).to_client(),
                 insecure=True, max_retries=30, max_wait_time=120)


def run_processes(s: FedSetup, server_model: GlobalModel) -> None:
    import json
    import subprocess
    import sys

    from flwr.server import start_server

    from lamina.config import to_dict

    f = s.cfg.federated
    address = _free_address(f.address)
    threads = max(1, (os.cpu_count() or 1) // max(1, min(f.clients, 4)))
    raw = json.dumps(to_dict(s.cfg))
    log = (server_model.folder.path / "clients.log").open("w")
    procs = []
    for cid in range(f.clients):
        p = subprocess.Popen([sys.executable, "-c", "from lamina.runs._flower import client_main; client_main()",
                              str(cid), address, str(threads)], stdin=subprocess.PIPE, stdout=log,
                             stderr=subprocess.STDOUT, text=True)
        p.stdin.write(raw)
        p.stdin.close()
        procs.append(p)
    ids: dict[str, int] = {}

    def partition(proxy) -> int:  # a gRPC proxy's cid is its peer address; ask the client once
        if proxy.cid not in ids:
            res = proxy.get_properties(GetPropertiesIns(config={}), timeout=60, group_id=None)
            ids[proxy.cid] = int(res.properties["partition"])
        return ids[proxy.cid]

    manager = SeededClientManager(s.seed, expect=f.clients)
    server = Server(client_manager=manager, strategy=build_strategy(s, server_model, partition))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start_server(server_address=address, server=server,
                         config=ServerConfig(num_rounds=f.rounds, round_timeout=f.round_timeout))
    finally:
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(timeout=5)
        log.close()
    server_model.result["client_exitcodes"] = [p.returncode for p in procs]


__all__ = ["InProcessClientProxy", "LaminaClient", "Recorder", "SeededClientManager", "build_strategy",
           "run_inprocess", "run_processes"]
