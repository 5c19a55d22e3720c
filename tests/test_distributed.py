"""Distributed training under torchrun (gloo on CPU): DDP parity with one process, resume on another world size,
FSDP2 with sharded checkpoints, context parallelism through the CLI, and the lost-worker fault test.

The torchrun tests launch `python -m torch.distributed.run --standalone` exactly as a user would, on the small
built-in data (digits) or a slice of Tiny Shakespeare, with 1 thread per process.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SHARED_DATA, needs_shared
from lamina.config import load_config
from lamina.data import InMemoryLoader
from lamina.data.base import TensorData
from lamina.engine.distributed import Distributed, ShardedLoader
from lamina.errors import ConfigError

QUIET = ["logging.tensorboard=false", "logging.plots=false"]
TINY_GPT = ["data.name=tiny_shakespeare", "data.block_size=32", "data.batch_size=8", "data.eval_batch_size=64",
            "data.steps_per_epoch=10", "model.name=gpt", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
            "model.dropout=0.0", "optimizer.lr=3e-3", "schedule.name=constant",
            "trainer.perf.bf16=false"]  # parity with one process to 1e-4 is an fp32 property


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LAMINA_SHARED_DATA": str(SHARED_DATA),
            "PYTHONPATH": str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _train(tmp_path: Path, nproc: int, *args: str, resume: Path | None = None, timeout: int = 300) -> Path:
    """`lamina train ARGS` under torchrun with `nproc` processes (nproc 0: plain `lamina train`, no torchrun)."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
              if nproc else [sys.executable, "-m"])
    cmd = [*launch, "lamina.cli.main", "train", *args, *QUIET, "--no-progress",
           *(["--resume", str(resume)] if resume else [])]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return tmp_path / p.stdout.strip().splitlines()[-1]


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# ----- in-process units ------------------------------------------------------------------------------
def test_sharded_loader_gives_every_sample_to_exactly_one_rank_and_scales_the_loss():
    data = TensorData(x=torch.arange(23.0)[:, None], y=torch.arange(23))
    seen, scales = [], {}
    for rank in range(3):
        sl = ShardedLoader(InMemoryLoader(data, 10, shuffle=True, seed=5), rank, 3)
        assert len(sl) == 3  # 10, 10, 3: the last batch still has a sample per rank
        for b, batch in enumerate(sl):
            seen += batch["y"].tolist()
            scales.setdefault(b, []).append((len(batch["y"]), sl.loss_scale))
    assert sorted(seen) == list(range(23))
    for parts in scales.values():  # sum_r scale_r * mean_r * (1/world) == global mean
        n = sum(k for k, _ in parts)
        assert all(abs(s - k * 3 / n) < 1e-12 for k, s in parts)
    # same global order as one process: the loader's generator decides, not the rank count
    one = [b["y"].tolist() for b in InMemoryLoader(data, 10, shuffle=True, seed=5)]
    parts = [[b["y"].tolist() for b in ShardedLoader(InMemoryLoader(data, 10, shuffle=True, seed=5), r, 3)]
             for r in range(3)]
    assert one == [sum((parts[r][b] for r in range(3)), []) for b in range(3)]


def test_sharded_loader_skips_a_too_small_last_batch_in_training_and_pads_it_in_evaluation():
    data = TensorData(x=torch.zeros(21, 1), y=torch.arange(21))  # batches of 10, 10, 1 over 2 ranks
    train = ShardedLoader(InMemoryLoader(data, 10), 1, 2, train=True)
    assert len(train) == 2 and len(list(train)) == 2
    ev = ShardedLoader(InMemoryLoader(data, 10), 1, 2, train=False)
    batches = list(ev)
    assert len(batches) == 3 and ev.ignore_batch  # rank 1 has no sample of the last batch: a marked stand-in
    with pytest.raises(ConfigError, match="data.batch_size: 1 is smaller than the number of data-parallel"):
        ShardedLoader(InMemoryLoader(data, 1), 0, 2)


def test_strategy_and_context_parallel_are_checked_before_anything_starts(monkeypatch):
    cfg = load_config(None, ["trainer.context_parallel=3"]).trainer
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="context_parallel: 3 does not divide the number of processes"):
        Distributed.from_config(cfg, torch.device("cpu"))
    cfg = load_config(None, ["trainer.strategy=none"]).trainer
    with pytest.raises(ConfigError, match="strategy: none cannot run under torchrun with 2 processes"):
        Distributed.from_config(cfg, torch.device("cpu"))


def test_one_process_without_torchrun_is_the_plain_trainer(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = Distributed.from_config(load_config(None, []).trainer, torch.device("cpu"))
    assert (d.strategy, d.world_size, d.is_main) == ("none", 1, True)
    assert d.shard(["a", "b"]) == ["a", "b"] and not torch.distributed.is_initialized()


def test_sharded_checkpoint_in_one_process_round_trips_into_a_plain_model_and_detects_corruption(tmp_path, monkeypatch):
    """strategy=fsdp without torchrun: a private one-rank group; the DCP checkpoint loads into a plain model."""
    from lamina.engine import ModelCheckpoint, Trainer
    from lamina.engine.checkpoint import load_model_weights
    from lamina.errors import CheckpointError
    from lamina.models import create_model
    from lamina.tasks import ClassificationTask

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    torch.manual_seed(0)
    data = TensorData(x=torch.randn(64, 8), y=torch.randint(0, 3, (64,)))
    model = create_model("mlp", in_features=8, num_classes=3, depth=2, width=16)
    trainer = Trainer(max_epochs=2, strategy="fsdp", callbacks=[ModelCheckpoint(tmp_path / "ck", monitor="train/loss")])
    assert not torch.distributed.is_initialized()  # constructing a Trainer changes no global state
    try:
        assert trainer.dist.world_size == 1 and torch.distributed.is_initialized()  # a private group, on first use
        trainer.fit(model, ClassificationTask(3), InMemoryLoader(data, 16, shuffle=True),
                    optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
        assert type(next(model.parameters())).__name__ == "DTensor"
        x = data.tensors["x"][:5]
        with torch.no_grad():
            ref = model.eval()(x)
    finally:
        trainer.dist.close()
    assert not torch.distributed.is_initialized()
    plain = create_model("mlp", in_features=8, num_classes=3, depth=2, width=16).eval()
    load_model_weights(tmp_path / "ck" / "last", plain)
    with torch.no_grad():
        assert torch.allclose(plain(x), ref, atol=1e-6)
    shard = next((tmp_path / "ck" / "last" / "shards").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model_weights(tmp_path / "ck" / "last", plain)


# ----- torchrun (marked `distributed`: CI runs them as their own step) ----------------------------------------
@pytest.mark.distributed
@pytest.mark.slow  # ~145 s; CI keeps two-process DDP through the kill/recover test
def test_ddp_two_processes_match_one_and_a_two_process_checkpoint_resumes_on_one(tmp_path):
    ddp = _train(tmp_path, 2, "name=ddp2")
    one = _train(tmp_path, 0, "name=one", "trainer.threads=1")
    s2, s1 = _summary(ddp), _summary(one)
    assert (s2["strategy"], s2["world_size"]) == ("ddp", 2) and s1["world_size"] == 1
    # the default digits job: same global batches, gradients of the same global mean (BN sees half batches)
    assert abs(s2["test"]["test/acc"] - s1["test"]["test/acc"]) <= 0.005, (s2["test"], s1["test"])
    assert s2["steps"] == s1["steps"] == 20 * 20  # data.batch_size is the global batch: same number of steps

    # a checkpoint written by 2 processes continues on 1 (and on 2, for comparison): constant lr, 2 + 2 epochs
    short = ["schedule.name=constant", "optimizer.lr=3e-3", "trainer.max_epochs=2"]
    base = _train(tmp_path, 2, *short, "name=base")
    ckpt_meta = json.loads((base / "checkpoints" / "last" / "meta.json").read_text())
    assert ckpt_meta["epoch"] == 2 and not ckpt_meta.get("sharded")
    for name in ("r1", "r2"):
        subprocess.run(["cp", "-r", str(base), str(tmp_path / "runs" / name)], check=True)
    more = [str(tmp_path / "runs" / "r1" / "config.yaml"), "trainer.max_epochs=4"]
    r1 = _train(tmp_path, 0, *more, resume=tmp_path / "runs" / "r1")
    more[0] = str(tmp_path / "runs" / "r2" / "config.yaml")
    r2 = _train(tmp_path, 2, *more, resume=tmp_path / "runs" / "r2")
    rows1 = _rows(r1)
    assert [r["epoch"] for r in rows1] == [1, 2, 3, 4] and rows1[:2] == _rows(base)  # history kept, then continued
    assert [r["epoch"] for r in _rows(r2)] == [1, 2, 3, 4]
    assert rows1[2]["step"] == 60 and _summary(r1)["world_size"] == 1
    acc1, acc2 = _summary(r1)["test"]["test/acc"], _summary(r2)["test"]["test/acc"]
    assert acc1 > 0.95 and abs(acc1 - acc2) <= 0.01, (acc1, acc2)


@pytest.mark.distributed
@needs_shared("tinyshakespeare/input.txt")
def test_fsdp_trains_the_gpt_with_sharded_checkpoints_that_resume_on_one_process(tmp_path):
    fsdp = _train(tmp_path, 2, *TINY_GPT, "trainer.max_epochs=2", "trainer.strategy=fsdp", "name=fsdp")
    last = fsdp / "checkpoints" / "last"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["sharded"] and meta["world_size"] == 2
    assert sorted(p.name for p in (last / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # the full weights, consolidated beside the shards: single-process readers never unpickle DCP metadata
    assert "model.safetensors" in meta["sha256"] and (last / "model.safetensors").is_file()
    # FSDP on 2 ranks computes what one plain process computes (same global batches, no dropout)
    plain = _train(tmp_path, 0, *TINY_GPT, "trainer.max_epochs=2", "trainer.threads=1", "name=plain")
    for a, b in zip(_rows(fsdp), _rows(plain)):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-4 and abs(a["val/loss"] - b["val/loss"]) < 1e-4, (a, b)
    # the sharded checkpoint resumes on ONE process (DCP reshards 2 -> 1) and continues the run
    r = _train(tmp_path, 0, str(fsdp / "config.yaml"), "trainer.max_epochs=3", resume=fsdp)
    rows = _rows(r)
    assert [x["epoch"] for x in rows] == [1, 2, 3] and rows[2]["step"] == 30
    assert rows[2]["val/loss"] < rows[1]["val/loss"]
    plain3 = _train(tmp_path, 0, *TINY_GPT, "trainer.max_epochs=3", "trainer.threads=1", "name=plain3")
    assert abs(rows[2]["val/loss"] - _rows(plain3)[2]["val/loss"]) < 1e-4  # same as never stopping
    # bf16 compute through FSDP's MixedPrecisionPolicy (fp32 master weights and gradient reduction)
    bf16 = _train(tmp_path, 2, *TINY_GPT, "trainer.max_epochs=2", "trainer.strategy=fsdp", "trainer.precision=bf16",
                  "name=fsdp_bf16")
    assert abs(_rows(bf16)[1]["val/loss"] - _rows(fsdp)[1]["val/loss"]) < 0.05
    # `lamina eval` reads the sharded best checkpoint into a plain model
    p = subprocess.run([sys.executable, "-m", "lamina.cli.main", "eval", str(fsdp), "--split", "val", "--json"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    best_val = min(x["val/loss"] for x in _rows(fsdp))
    assert abs(json.loads(p.stdout)["val/loss"] - best_val) < 1e-5


@pytest.mark.distributed
@needs_shared("tinyshakespeare/input.txt")
def test_context_parallel_training_through_the_cli_equals_one_process(tmp_path):
    cp = _train(tmp_path, 2, *TINY_GPT, "trainer.max_epochs=2", "trainer.context_parallel=2", "name=cp2")
    one = _train(tmp_path, 0, *TINY_GPT, "trainer.max_epochs=2", "trainer.threads=1", "name=one")
    assert _summary(cp)["context_parallel"] == 2
    for a, b in zip(_rows(cp), _rows(one)):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-4 and abs(a["val/loss"] - b["val/loss"]) < 1e-4, (a, b)


@pytest.mark.distributed
@pytest.mark.slow  # ~47 s; two torchrun launchers
def test_two_node_launch_with_c10d_rendezvous(tmp_path):
    """`torchrun --nnodes 2 --node-rank {0,1} --rdzv-backend c10d --rdzv-endpoint HOST:PORT`, both nodes on this
    machine: one run, world size 2, and the same numbers as a single-node 2-process run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["trainer.max_epochs=3", "name=twonode", *QUIET, "--no-progress"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={r}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=twonode", "-m", "lamina.cli.main", "train", *args],
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    two_node = _summary(tmp_path / "runs" / "twonode")
    assert (two_node["world_size"], two_node["strategy"]) == (2, "ddp")
    single = _summary(_train(tmp_path, 2, "trainer.max_epochs=3", "name=single"))
    assert two_node["test"] == single["test"]


@pytest.mark.distributed
def test_killing_a_worker_mid_training_recovers_to_the_same_final_metrics(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_test.py"), "--workdir", str(tmp_path),
                        "trainer.max_epochs=5", "data.batch_size=16"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "PASS" in p.stdout, (p.stdout + p.stderr)[-4000:]
    result = json.loads((tmp_path / "fault_test.json").read_text())
    assert result["restarted"] and result["killed_pid"] and result["differ"] == []
    assert result["compared"] >= 20


@pytest.mark.distributed
def test_a_bad_distributed_config_is_one_line_from_rank_0_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "lamina.cli.main", "train", "trainer.context_parallel=2", "--no-progress"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("config error")]
    assert p.returncode != 0 and lines == ["config error: trainer.context_parallel: 2 applies to language-model "
                                           "runs (gpt, llama on token streams); this run is classification"], lines
