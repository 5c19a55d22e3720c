"""Federated learning on Flower: client partitions, FedProx's term, FedAvg's aggregation, client sampling,
dropouts, DP clipping, the global model's run folder, and `lamina federated`'s one-line errors.

Numbers are checked by hand: the global model after a round must equal the sample-weighted mean of what each
client trained on its own (reproduced here by calling the client's training function directly), FedProx's loss
and gradient are written out, and clipped updates must respect the clipping norm. The loops run the digits MLP
(1,258 training samples), a second or two per run.
"""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from lamina.cli.main import main
from lamina.config import load_config
from lamina.data.partitions import class_counts, dirichlet_partition, iid_partition, label_skew
from lamina.errors import ConfigError
from lamina.runs.objectives.federated import FedProxTask

pytest.importorskip("flwr")

FAST = ["data.name=digits", "model.name=mlp", "model.width=32", "model.dropout=0", "optimizer.name=adam",
        "optimizer.lr=1e-3", "optimizer.weight_decay=0", "schedule.name=constant", "task.label_smoothing=0",
        "data.batch_size=32", "trainer.progress=false", "logging.tensorboard=false", "cost.energy=false",
        "logging.plots=false"]


def _cfg(tmp_path, *extra):
    return load_config(None, [*FAST, f"logging.root={tmp_path / 'runs'}", *extra])


def _weights(run_dir):
    from lamina.runs import open_run

    return {k: v.clone() for k, v in open_run(run_dir, "last").model.state_dict().items()}


# ----- partitions --------------------------------------------------------------------------------------------
def test_iid_partition_is_balanced_complete_and_seeded():
    parts = iid_partition(103, 10, seed=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(103))  # every sample once
    again = iid_partition(103, 10, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert not all(torch.equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=2)))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = torch.arange(10).repeat_interleave(200)  # 2,000 samples, 10 balanced classes
    skews = {}
    for alpha in (100.0, 1.0, 0.1):
        parts = dirichlet_partition(labels, 10, alpha, seed=0, min_size=5)
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(labels)))  # every sample exactly once
        assert min(len(p) for p in parts) >= 5
        assert all(torch.equal(a, b) for a, b in zip(parts, dirichlet_partition(labels, 10, alpha, 0, 5)))
        skews[alpha] = label_skew(parts, labels)
    assert skews[100.0] < 0.1 < skews[1.0] < skews[0.1]  # near IID ... most clients a few classes
    counts = class_counts(dirichlet_partition(labels, 10, 0.1, 0, 5), labels)
    held = sorted(sum(c > 10 for c in row) for row in counts)
    assert held[len(held) // 2] <= 4  # at alpha 0.1 the median client holds a handful of classes, not ten
    assert label_skew(iid_partition(len(labels), 10, 0), labels) < 0.1


def test_impossible_partitions_say_what_fits():
    with pytest.raises(ConfigError, match="11 clients but only 10 training samples"):
        iid_partition(10, 11, 0)
    with pytest.raises(ConfigError, match="min_client_samples"):
        dirichlet_partition(torch.arange(10) % 2, 5, 0.5, 0, min_size=3)


# ----- FedProx -----------------------------------------------------------------------------------------------
def test_fedprox_term_and_gradient_by_hand():
    from lamina.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    task = FedProxTask(ClassificationTask(num_classes=2, label_smoothing=0.0), model, mu=0.5)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    with torch.no_grad():
        model.weight.add_(0.3)
        model.bias.sub_(0.2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    out = model(x)
    loss = task.loss(out, {"x": x, "y": y})
    prox = ((model.weight - w0) ** 2).sum() + ((model.bias - b0) ** 2).sum()  # 6 * 0.09 + 2 * 0.04
    assert float(prox.detach()) == pytest.approx(0.62, abs=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(out, y) + 0.25 * prox)
    model.zero_grad()
    task.proximal_term().backward()
    torch.testing.assert_close(model.weight.grad, 2 * (model.weight.detach() - w0))  # d/dw ||w - w0||^2
    with torch.no_grad():  # validation: the plain task loss
        torch.testing.assert_close(task.loss(model(x), {"x": x, "y": y}), F.cross_entropy(model(x), y))


# ----- the loop ------------------------------------------------------------------------------------------------
def _initial_and_clients(cfg, server_round=1, mu=0.0, clients=None):
    """What the run's server starts from and what each client returns in round `server_round` from it, computed
    directly (run_federated builds the global model right after make_setup, from the same seeded state)."""
    from lamina.runs.build import build_run_model
    from lamina.runs.federated import get_weights, local_fit, make_setup

    s = make_setup(cfg)
    w0 = get_weights(build_run_model(cfg, s.facts))
    outs = {cid: local_fit(s, cid, w0, server_round, mu) for cid in (clients or range(len(s.parts)))}
    return s, w0, outs


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_round_one_global_model_is_the_sample_weighted_mean(tmp_path, strategy):
    from lamina.runs.federated import run_federated

    cfg = _cfg(tmp_path, "federated.clients=3", "federated.rounds=1", "federated.split=dirichlet",
               "federated.alpha=0.5", f"federated.strategy={strategy}", "federated.mu=0.5")
    r = run_federated(cfg)
    assert r["rounds"][1]["trained"] == [0, 1, 2] and r["rounds"][1]["models_built"] == 3
    _, _, outs = _initial_and_clients(cfg, mu=0.5 if strategy == "fedprox" else 0.0)
    sizes = [outs[c][1] for c in range(3)]
    assert sizes == r["client_sizes"] and len(set(sizes)) > 1  # unequal clients: weighting matters
    got = _weights(r["run_dir"])
    for i, name in enumerate(got):
        hand = sum(outs[c][1] * torch.from_numpy(outs[c][0][i]) for c in range(3)) / sum(sizes)
        torch.testing.assert_close(got[name], hand, rtol=1e-5, atol=1e-6)
        # the plain mean differs (the test would catch an unweighted average)
    plain = sum(torch.from_numpy(outs[c][0][0]) for c in range(3)) / 3
    assert not torch.allclose(got[next(iter(got))], plain, atol=1e-6)
    if strategy == "fedprox":  # the proximal term changed what the clients trained
        _, _, plain_outs = _initial_and_clients(cfg, mu=0.0, clients=[0])
        assert not torch.allclose(torch.from_numpy(plain_outs[0][0][0]), torch.from_numpy(outs[0][0][0]))


def test_client_sampling_and_memory_bound(tmp_path):
    from lamina.runs.federated import run_federated

    cfg = _cfg(tmp_path, "federated.clients=6", "federated.rounds=3", "federated.fraction_fit=0.5")
    r = run_federated(cfg)
    rounds = r["rounds"][1:]
    assert [len(x["sampled"]) for x in rounds] == [3, 3, 3]  # int(6 * 0.5) per round
    assert all(x["trained"] == x["sampled"] for x in rounds)
    assert all(x["models_built"] == 3 for x in rounds)  # only the sampled clients built a model
    assert len({tuple(x["sampled"]) for x in rounds}) > 1  # sampling, not a fixed subset
    again = run_federated(cfg)  # the same seed samples the same clients and repeats the run exactly
    assert [x["sampled"] for x in again["rounds"][1:]] == [x["sampled"] for x in rounds]
    w1, w2 = _weights(r["run_dir"]), _weights(again["run_dir"])
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_dropped_client_round_continues_with_the_others(tmp_path):
    from lamina.runs.federated import run_federated

    cfg = _cfg(tmp_path, "federated.clients=3", "federated.rounds=2", "federated.dropout_client=1",
               "federated.dropout_round=1")
    r = run_federated(cfg)
    r1, r2 = r["rounds"][1], r["rounds"][2]
    assert r1["sampled"] == [0, 1, 2] and r1["trained"] == [0, 2] and r1["failed"] == [1]
    assert "client 1 dropped out mid-fit in round 1" in r1["failure_messages"][0]
    assert r2["failed"] == [] and r2["trained"] == [0, 1, 2]  # back in the next round
    assert r["failures"] == 1
    saved = json.loads((tmp_path / "runs" / r["run_dir"].split("/")[-1] / "federated.json").read_text())
    assert saved["rounds"][1]["failed"] == [1]
    # round 1's global model: the weighted mean of the two clients that finished, client 1 left out
    one = run_federated(cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"rounds": 1})}))
    _, _, outs = _initial_and_clients(cfg, clients=[0, 2])
    n = outs[0][1] + outs[2][1]
    for i, (name, got) in enumerate(_weights(one["run_dir"]).items()):
        hand = (outs[0][1] * torch.from_numpy(outs[0][0][i]) + outs[2][1] * torch.from_numpy(outs[2][0][i])) / n
        torch.testing.assert_close(got, hand, rtol=1e-5, atol=1e-6)


def test_batchnorm_model_learns(tmp_path):
    """A BatchNorm CNN: each client's few steps must send running statistics of its final weights (recalibrated),
    or the averaged global model tests at chance (0.10 here without the recalibration)."""
    from lamina.runs.federated import run_federated

    cfg = load_config(None, [*(o for o in FAST if not o.startswith("model.")), "model.name=small_cnn",
                             f"logging.root={tmp_path / 'runs'}", "federated.clients=3", "federated.rounds=2"])
    r = run_federated(cfg)
    assert r["final_acc"] > 0.8
    assert _weights(r["run_dir"])["stages.0.0.1.num_batches_tracked"].dtype == torch.long  # averaged, cast back


def test_dp_clipping_bounds_the_global_update(tmp_path):
    from lamina.runs.federated import run_federated

    cfg = _cfg(tmp_path, "federated.clients=3", "federated.rounds=1", "federated.clip=0.05", "federated.noise=0")
    r = run_federated(cfg)
    _, w0, outs = _initial_and_clients(cfg, clients=[0])
    got = _weights(r["run_dir"])
    step = torch.sqrt(sum(((got[k] - torch.from_numpy(w)) ** 2).sum() for k, w in zip(got, w0)))
    raw = torch.sqrt(sum(((torch.from_numpy(a) - torch.from_numpy(w)) ** 2).sum() for a, w in zip(outs[0][0], w0)))
    assert raw > 0.2 and 0 < step <= 0.05 + 1e-5  # a client's own update is far larger than the clipped mean


def test_cli_runs_compares_and_the_global_model_opens_with_eval(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["federated", *FAST, "logging.plots=true", f"logging.root={tmp_path / 'runs'}", "federated.clients=4",
            "federated.rounds=2", "federated.alpha=0.1", "--compare", "fedavg-iid,fedavg-dirichlet,central",
            "--out", str(out), "--json"]
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out)
    st = s["settings"]
    assert s["non_iid_penalty"]["fedavg"] == pytest.approx(st["fedavg-iid"]["final_acc"]
                                                           - st["fedavg-dirichlet"]["final_acc"])
    assert st["fedavg-dirichlet"]["label_skew"] > st["fedavg-iid"]["label_skew"]
    assert len(st["central"]["acc_per_round"]) == 3 and (out / "comparison.png").is_file()
    run = out / "fedavg-iid"
    assert (run / "accuracy.png").is_file() and (run / "checkpoints" / "last" / "meta.json").is_file()
    assert main(["eval", str(run), "--split", "test", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test/acc"] == pytest.approx(st["fedavg-iid"]["final_acc"], abs=1e-6)


@pytest.mark.parametrize("extra, expect", [
    (["federated.strategy=fedsgd"], "federated.strategy: expected one of 'fedavg' or 'fedprox', got 'fedsgd'"),
    (["federated.clients=5000"], "federated.clients: 5000 clients but only 1258 training samples"),
    (["federated.split=dirichlet", "federated.clients=50", "federated.min_client_samples=30"],
     "min_client_samples: 30 samples for each of 50 clients"),
    (["federated.min_fit_clients=20"], "min_fit_clients: 20 is more than the 10 clients"),
    (["federated.noise=1"], "set federated.clip too"),
    (["--compare", "fedavg-iid,fedsgd-iid"], "--compare: unknown setting 'fedsgd-iid'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, expect):
    assert main(["federated", *FAST, f"logging.root={tmp_path}", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err and "Traceback" not in err
    assert not list(tmp_path.glob("*/checkpoints"))  # nothing trained


def test_missing_flower_says_which_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)  # `import flwr` now raises ImportError
    assert main(["federated", *FAST, f"logging.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'missing dependency: flwr is not installed; federated learning needs pip install "lamina[federated]"'


@pytest.mark.distributed
def test_grpc_engine_with_client_processes_and_a_crash(tmp_path):
    """Flower's real gRPC server and one process per client; client 1's process exits mid-fit in round 2."""
    from lamina.runs.federated import run_federated

    cfg = _cfg(tmp_path, "federated.engine=processes", "federated.clients=3", "federated.rounds=2",
               "federated.dropout_client=1", "federated.dropout_round=2", "federated.round_timeout=120")
    r = run_federated(cfg)
    r1, r2 = r["rounds"][1], r["rounds"][2]
    assert r1["trained"] == [0, 1, 2] and r2["trained"] == [0, 2] and r2["failed"] == [1]
    assert r["client_exitcodes"] == [0, 17, 0]  # 17: the dropout's exit, as a crashed device
    assert "GrpcBridgeClosed" in r2["failure_messages"][0]  # Flower saw the connection go
    assert main(["eval", r["run_dir"], "--json"]) == 0  # the global model's run folder, as any run
