"""The speed preset (engine/perf.py): what it decides, that the Trainer really applies it, and that each
optimization keeps the numbers (bf16 within a stated tolerance of fp32, compiled == eager, fused == for-loop)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lamina
from lamina import allocator
from lamina.config.schema import OptimizerConfig, RunConfig, TrainerConfig
from lamina.engine import Trainer, build_optimizer
from lamina.engine import perf as perf_mod
from lamina.engine.perf import PerfPlan, plan_perf
from lamina.models import create_model
from lamina.nn.attention import MultiHeadAttention

CPU = torch.device("cpu")


def _cnn():
    return create_model("small_cnn", in_chans=1, num_classes=10)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend the CPU has (or lacks) native bf16, so the decision is tested on any machine."""
    def set_(ok: bool):
        monkeypatch.setattr(perf_mod, "native_bf16", lambda dev: (ok, "CPU has AVX512_BF16" if ok else "no bf16"))
    return set_


def test_run_configs_default_to_perf_and_bare_trainer_does_not():
    assert RunConfig().trainer.perf.enabled
    assert RunConfig(trainer={"max_epochs": 2}).trainer.perf.enabled
    assert not RunConfig(trainer={"perf": False}).trainer.perf.enabled
    assert not TrainerConfig().perf.enabled and not Trainer().cfg.perf.enabled
    with pytest.raises(lamina.errors.ConfigError, match="trainer.perf: expected true, false or a mapping"):
        lamina.load_config(None, ["trainer.perf=maybe"])
    cfg = lamina.load_config(None, ["trainer.perf.compile=never", "trainer.perf.bf16=false"])
    assert cfg.trainer.perf.enabled and cfg.trainer.perf.compile == "never" and not cfg.trainer.perf.bf16


def test_plan_conv_net_with_native_bf16(bf16_cpu):
    bf16_cpu(True)
    model = _cnn()
    opt = build_optimizer(model, OptimizerConfig())
    plan = plan_perf(TrainerConfig(perf=True), model, CPU, opt)
    assert (plan.precision, plan.channels_last, plan.compile) == ("bf16", True, False)
    note = plan.note()
    assert "bf16 autocast (CPU has AVX512_BF16)" in note and "channels_last" in note and "fused AdamW" in note
    assert "skipped: torch.compile" in note  # CPU auto: skipped, with the reason


def test_plan_without_native_bf16_or_preset(bf16_cpu):
    bf16_cpu(False)
    model = nn.Sequential(nn.Linear(4, 4))
    plan = plan_perf(TrainerConfig(perf=True), model, CPU)
    assert plan.precision == "fp32" and not plan.channels_last and "bf16 (no bf16)" in plan.skipped
    off = plan_perf(TrainerConfig(), _cnn(), CPU)
    assert (off.precision, off.channels_last, off.compile, off.applied) == ("fp32", False, False, [])
    # explicit settings say more than the preset: they stay
    bf16_cpu(True)
    kept = plan_perf(TrainerConfig(perf={"enabled": True, "bf16": False}, precision="fp32"), model, CPU)
    assert kept.precision == "fp32" and any("perf.bf16=false" in s for s in kept.skipped)
    assert plan_perf(TrainerConfig(perf=True, precision="bf16"), model, CPU).applied[0].startswith("bf16 (set")


def test_plan_compiles_long_cpu_runs_of_non_conv_models(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++")
    cfg, gpt = TrainerConfig(perf=True), nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    long_run = perf_mod.CPU_COMPILE_MIN_STEPS
    assert plan_perf(cfg, gpt, CPU, planned_steps=long_run).compile
    short = plan_perf(cfg, gpt, CPU, planned_steps=2000)  # the char GPT's 2000: a cold compile does not pay back
    assert not short.compile and "2000 steps" in _compile_note(short)
    assert not plan_perf(cfg, gpt, CPU).compile  # unknown length: not worth the risk
    assert not plan_perf(cfg, gpt, CPU, planned_steps=long_run, context_parallel=2).compile  # ring: eager
    conv = plan_perf(cfg, _cnn(), CPU, planned_steps=10 * long_run)
    assert not conv.compile and "conv net" in _compile_note(conv)


def _compile_note(plan):
    return next(s for s in plan.skipped if s.startswith("torch.compile"))


def test_allocator_is_reported_on_cpu(monkeypatch):
    monkeypatch.setattr(allocator, "loaded", lambda: "tcmalloc")
    plan = plan_perf(TrainerConfig(perf=True), nn.Linear(2, 2), CPU)
    assert plan.applied[-1] == "tcmalloc"
    monkeypatch.setattr(allocator, "loaded", lambda: None)
    monkeypatch.setattr(allocator, "find", lambda: None)
    note = plan_perf(TrainerConfig(perf=True), nn.Linear(2, 2), CPU).note()
    assert "tcmalloc (glibc malloc" in note and allocator.INSTALL_HINT in note
    assert not any("tcmalloc" in s for s in plan_perf(TrainerConfig(), nn.Linear(2, 2), CPU).skipped)  # preset off


def test_allocator_preload_env(monkeypatch, tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    env = allocator.preload_env({"LAMINA_ALLOCATOR": str(lib), "LD_PRELOAD": "/x/libother.so"})
    assert env["LD_PRELOAD"] == f"{lib} /x/libother.so" and env["LAMINA_ALLOCATOR_PRELOADED"] == "1"
    assert allocator.preload_env(env) is None  # the re-executed process never re-executes again
    assert allocator.preload_env({"LAMINA_ALLOCATOR": "system"}) is None
    assert allocator.preload_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None  # the user chose one
    assert allocator.preload_env({"LAMINA_ALLOCATOR": str(tmp_path / "missing.so")}) is None
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.preload_env({"LAMINA_ALLOCATOR": str(lib)}) is None


@pytest.mark.skipif(allocator.find() is None or not sys.platform.startswith("linux"),
                    reason="no tcmalloc/jemalloc on this machine (apt install libtcmalloc-minimal4)")
def test_lamina_command_runs_on_the_fast_allocator():
    """The entry point re-executes itself once with LD_PRELOAD: this process prints None, the re-executed one the
    allocator, then main() (no re-exec the second time) prints the usage."""
    code = ("import lamina.allocator as a; print('allocator', a.loaded(), flush=True); "
            "from lamina.cli.main import main; main()")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LAMINA_ALLOCATOR_PRELOADED",
                                                            "LAMINA_ALLOCATOR")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if x.startswith("allocator")]
    assert lines[0] == "allocator None" and lines[1].split()[1] in ("tcmalloc", "jemalloc") and len(lines) == 2
    assert "usage: lamina" in out.stdout


def test_plan_compile_always_needs_a_compiler(monkeypatch):
    cfg = TrainerConfig(perf={"enabled": True, "compile": "always"})
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not plan_perf(cfg, nn.Linear(2, 2), CPU).compile
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++")
    assert plan_perf(cfg, nn.Linear(2, 2), CPU).compile


class _Probe(nn.Module):
    """A conv net that records, on each forward, the autocast state and its input's memory format."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                          x.is_contiguous(memory_format=torch.channels_last)))
        return self.fc(F.relu(self.conv(x)).flatten(1))


class _ClassifyTask:
    def forward(self, model, batch):
        return model(batch["x"])

    def loss(self, out, batch):
        return F.cross_entropy(out.float(), batch["y"])

    def train_stats(self, out, batch):
        return {}

    def summarize_train(self, sums, n):
        return {}


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(8, 2, 8, 8, generator=g), "y": torch.randint(0, 3, (8,), generator=g)}
            for _ in range(n)]


def test_trainer_applies_the_plan(bf16_cpu):
    """The Trainer really runs what the plan says: bf16 autocast in forward, NHWC weights and inputs, fused step."""
    bf16_cpu(True)
    model = _Probe()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3))
    trainer = Trainer(perf=True, device="cpu", max_epochs=1, progress=False)
    trainer.fit(model, _ClassifyTask(), _batches(), optimizer=opt)
    assert trainer.perf.precision == "bf16" and trainer.precision._dtype == torch.bfloat16
    assert model.seen and all(s == (True, torch.bfloat16, True) for s in model.seen)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert opt.defaults["fused"] is True
    plain = _Probe()
    Trainer(device="cpu", max_epochs=1).fit(plain, _ClassifyTask(), _batches(),
                                            optimizer=torch.optim.AdamW(plain.parameters()))
    assert plain.seen and all(s[0] is False and s[2] is False for s in plain.seen)


def test_fused_adamw_matches_for_loop():
    """optimizer.impl auto picks torch's fused AdamW on CPU; 20 steps match the for-loop form to 1e-6."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    b = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    b.load_state_dict(a.state_dict())
    oa = build_optimizer(a, OptimizerConfig(lr=1e-2))
    ob = build_optimizer(b, OptimizerConfig(lr=1e-2, impl="for_loop"))
    assert oa.defaults["fused"] and not ob.defaults.get("fused") and ob.defaults["foreach"] is False
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(20):
        for m, o in ((a, oa), (b, ob)):
            F.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert build_optimizer(a, OptimizerConfig(name="sgd")).defaults["foreach"] is True


def test_compiled_matches_eager_losses():
    """trainer.perf.compile=always wraps the model in torch.compile; 5 fp32 steps give eager's losses (1e-4 rel)."""
    if not perf_mod._cxx_compiler():
        pytest.skip("torch.compile on CPU needs a C++ compiler (none here)")
    losses = {}
    for mode in ("never", "always"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 3))
        trainer = Trainer(perf={"enabled": True, "bf16": False, "compile": mode}, device="cpu", max_epochs=1)
        seen = []
        task = _ClassifyTask()
        batches = [{"x": b["x"].flatten(1)[:, :12], "y": b["y"]} for b in _batches(5)]

        class Record:
            def on_train_batch_end(self, t, loss):
                seen.append(float(loss.detach()))

            def __getattr__(self, name):  # the other callback hooks: no-ops
                return lambda *a, **k: None

        trainer.callbacks = [Record()]
        trainer.fit(model, task, batches, optimizer=build_optimizer(model, OptimizerConfig(lr=1e-2)))
        assert trainer.perf.compile == (mode == "always")
        assert isinstance(trainer._forward_model, torch._dynamo.eval_frame.OptimizedModule) == (mode == "always")
        losses[mode] = seen
    torch.testing.assert_close(torch.tensor(losses["always"]), torch.tensor(losses["never"]), rtol=1e-4, atol=1e-5)


def test_bf16_training_reaches_fp32_accuracy(tmp_path):
    """The default job (digits small_cnn, 8 epochs) with the preset's bf16 on vs off: test accuracy within 1.5
    points (bf16 keeps fp32's range; only the matmul inputs round). Skipped where the CPU has no native bf16."""
    if not perf_mod.native_bf16("cpu")[0]:
        pytest.skip("this CPU has no native bf16: the preset keeps fp32 here")
    acc = {}
    for bf16 in (True, False):
        cfg = lamina.load_config(None, ["trainer.max_epochs=8", "trainer.threads=1", "trainer.progress=false",
                                        "logging.tensorboard=false", "cost.energy=false", "cost.flops=false",
                                        f"trainer.perf.bf16={str(bf16).lower()}", f"logging.root={tmp_path}",
                                        f"name=bf16-{bf16}"])
        res = lamina.train(cfg)
        assert res.summary["precision"] == ("bf16" if bf16 else "fp32")
        assert res.summary["perf"]["channels_last"]
        acc[bf16] = res.summary["test"]["test/acc"]
    assert acc[False] > 0.95 and abs(acc[True] - acc[False]) <= 0.015, acc


def test_narrow_attention_runs_fp32_under_cpu_autocast(monkeypatch):
    """head_dim <= 32 under CPU bf16 autocast: SDPA gets fp32 q/k/v (its bf16 backward is 2-3x slower there);
    the output matches fp32 attention on the same (bf16-rounded) projections."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.dtype)
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    narrow, wide = MultiHeadAttention(64, 4, causal=True), MultiHeadAttention(256, 4, causal=True)
    x = torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = narrow(x)
        wide(torch.randn(2, 16, 256))
    assert seen == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(y.float(), narrow(x), rtol=0.05, atol=0.02)  # bf16 projections: ~3 digits
    y.float().sum().backward()
    assert narrow.q_proj.weight.grad is not None and torch.isfinite(narrow.q_proj.weight.grad).all()


def test_perf_plan_is_plain_data():
    plan = PerfPlan("bf16", True, False, ["bf16 autocast (x)"], ["torch.compile (y)"])
    assert plan.to_dict()["applied"] == ["bf16 autocast (x)"]
    assert plan.note() == "perf: bf16 autocast (x); skipped: torch.compile (y)"


def test_stop_at_ends_the_run_at_its_quality_target(tmp_path):
    """trainer.early_stopping.stop_at: the run stops at the first evaluation that meets the target, and says so."""
    cfg = lamina.load_config(None, ["trainer.max_epochs=20", "trainer.threads=1", "trainer.progress=false",
                                    "trainer.monitor=val/acc", "trainer.monitor_mode=max",
                                    "trainer.early_stopping.stop_at=0.9", "logging.tensorboard=false",
                                    "logging.plots=false", "cost.energy=false", "cost.flops=false",
                                    f"logging.root={tmp_path}"])
    res = lamina.train(cfg)
    accs = [r["val/acc"] for r in res.history]
    assert accs[-1] >= 0.9 and all(a < 0.9 for a in accs[:-1]) and len(accs) < 20
    assert res.summary["stop_at"] == {"monitor": "val/acc", "target": 0.9, "reached_epoch": len(accs)}
