"""compress/: quantization, pruning and distillation, checked against hand-computed values and the fp32 model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.compress.distill import DistillTask, distillation_loss
from lamina.compress.prune import (GradualPruning, channel_prune, cubic_sparsity, global_magnitude_masks,
                                   magnitude_prune, sparsity)
from lamina.compress.quantize import (convert_qat, dynamic_int8, prepare_qat, serialized_bytes, static_int8,
                                      weight_only)
from lamina.errors import ConfigError, ModelError
from lamina.models import create_model


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    return x, torch.tensor(d.target)


def _acc(model, x, y) -> float:
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item()


@pytest.fixture(scope="module")
def digits_cnn():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = _digits()
    m = create_model("small_cnn", channels=(32, 64))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for step in range(150):
        idx = torch.randint(0, 1400, (64,))
        loss = F.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), x[1400:], y[1400:]


# ----- distillation --------------------------------------------------------------------------------
def test_distillation_loss_hand_computed():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    T = 2.0
    p_t = torch.softmax(t / T, -1)
    p_s = torch.softmax(s / T, -1)
    expected = T * T * float((p_t * (p_t.log() - p_s.log())).sum())
    assert distillation_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    # token-level logits (B, T, V): the mean over positions of the per-position KL
    s3, t3 = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    per = [distillation_loss(s3[b, i:i + 1], t3[b, i:i + 1], 3.0) for b in range(2) for i in range(5)]
    assert distillation_loss(s3, t3, 3.0).item() == pytest.approx(float(torch.stack(per).mean()), rel=1e-5)


def test_distill_task_mixes_soft_and_hard_only_when_training():
    from lamina.tasks import build_task

    torch.manual_seed(0)
    task = build_task("classification", num_classes=4)
    teacher, student = nn.Linear(6, 4), nn.Linear(6, 4)
    dt = DistillTask(task, teacher, temperature=3.0, alpha=0.7)
    batch = {"x": torch.randn(8, 6), "y": torch.randint(0, 4, (8,))}
    out = dt.forward(student, batch)
    hard = F.cross_entropy(out, batch["y"])
    soft = distillation_loss(out, teacher(batch["x"]), 3.0)
    assert dt.loss(out, batch).item() == pytest.approx(0.7 * soft.item() + 0.3 * hard.item(), rel=1e-5)
    with torch.no_grad():  # validation: the task's own loss, comparable with an undistilled run
        out = dt.forward(student, batch)
        assert dt.loss(out, batch).item() == pytest.approx(F.cross_entropy(out, batch["y"]).item(), rel=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert dt.num_classes == 4  # everything else is the wrapped task's
    with pytest.raises(ConfigError, match="task with logits"):
        DistillTask(build_task("regression", num_outputs=1), teacher)


def test_distill_run_trains_smaller_student_and_checks_teacher(tmp_path, digits_run):
    from conftest import DIGITS_RUN_ARGS
    from lamina.config import load_config
    from lamina.runs import train

    common = ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false",
              f"logging.root={tmp_path}"]
    # the teacher: the shared digits run (conftest; small_cnn, 4 epochs); the student sees the same inputs
    teacher_summary = json.loads((digits_run / "summary.json").read_text())
    augment = next(a for a in DIGITS_RUN_ARGS if a.startswith("data.augment="))
    student = train(load_config(None, [*common, "name=student", "trainer.max_epochs=4", "model.channels=[16,32]",
                                       augment, f"trainer.distill.teacher={digits_run}"]))
    assert student.summary["params"] * 4 <= teacher_summary["params"]
    assert student.summary["test"]["test/acc"] > 0.9
    bad = load_config(None, [*common, "name=bad", "data.name=iris", "model.name=mlp",
                             f"trainer.distill.teacher={digits_run}"])
    with pytest.raises(ConfigError, match="trained on 'digits'"):
        train(bad)


def test_distill_cli_bad_teacher_is_one_line(tmp_path, capsys):
    from lamina.cli.main import main

    assert main(["distill", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: TEACHER_RUN") and "\n" not in err


# ----- quantization --------------------------------------------------------------------------------
def test_dynamic_int8_linear_and_lstm_parity_and_size():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    x = torch.randn(16, 256)
    q = dynamic_int8(mlp)
    ref, out = mlp(x), q(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert serialized_bytes(mlp) / serialized_bytes(q) > 3.5
    lstm = create_model("char_lstm", vocab_size=20).eval()
    ids = torch.randint(0, 20, (2, 16))
    ql = dynamic_int8(lstm)
    assert any("quantized" in type(m).__module__ and "LSTM" in type(m).__name__ for m in ql.modules())
    assert (ql(ids) - lstm(ids)).abs().max() < 0.05
    with pytest.raises(ModelError, match="no Linear/LSTM/GRU"):
        dynamic_int8(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_static_int8_cnn_keeps_accuracy_and_shrinks(digits_cnn):
    model, x, y = digits_cnn
    acc = _acc(model, x, y)
    q = static_int8(model, [x[i:i + 64] for i in range(0, 256, 64)])
    assert acc > 0.9
    assert _acc(q, x, y) >= acc - 0.02
    # 21k parameters: per-tensor metadata is a visible share here (Fashion-MNIST's 288k-param CNN: 3.77x)
    assert serialized_bytes(model) / serialized_bytes(q) > 2.8
    assert any(type(m).__name__ == "ConvReLU2d" and "quantized" in type(m).__module__ for m in q.modules())
    with pytest.raises(ConfigError, match="no calibration"):
        static_int8(model, [])


def test_weight_only_int8_int4_gpt():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    gpt = create_model("gpt", vocab_size=65, n_layer=2, n_embd=64, n_head=2, block_size=32).eval()
    ids = torch.randint(0, 65, (2, 32))
    ref = gpt(ids)
    e8 = (weight_only(gpt, 8)(ids) - ref).abs().max().item()
    e4 = (weight_only(gpt, 4, group_size=32)(ids) - ref).abs().max().item()
    assert e8 < 0.05 < ref.abs().max().item()
    assert e8 < e4 < 0.5  # int4 is coarser than int8, and still close
    assert torch.equal(gpt(ids), ref)  # a copy was quantized, the original is untouched
    assert serialized_bytes(gpt) / serialized_bytes(weight_only(gpt, 8)) > 2.5
    with pytest.raises(ConfigError, match="group_size 48"):
        weight_only(gpt, 4, group_size=48)


def test_qat_fake_quant_then_convert(digits_cnn):
    model, x, y = digits_cnn
    prepared = prepare_qat(model, x[:2])
    assert any("FakeQuantize" in type(m).__name__ for m in prepared.modules())
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    loss = F.cross_entropy(prepared(x[:64]), y[:64])  # fake-quant forward trains
    loss.backward()
    opt.step()
    q = convert_qat(prepared)
    assert _acc(q, x, y) > _acc(model, x, y) - 0.03


# ----- pruning -------------------------------------------------------------------------------------
def test_global_magnitude_masks_hand_computed():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.1, -5.0], [3.0, 0.2]]))
        net[1].weight.copy_(torch.tensor([[-0.3, 4.0], [0.05, 2.0]]))
    masks = global_magnitude_masks(net, 0.5)  # one threshold over both layers: the 4 smallest |w| go
    assert masks[net[0]].tolist() == [[False, True], [True, False]]
    assert masks[net[1]].tolist() == [[False, True], [False, True]]
    magnitude_prune(net, 0.5)
    assert sparsity(net) == 0.5


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 100, 0.8) == 0.0
    assert cubic_sparsity(50, 100, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(100, 100, 0.8) == 0.8 and cubic_sparsity(150, 100, 0.8) == 0.8
    vals = [cubic_sparsity(t, 100, 0.8) for t in range(0, 101, 10)]
    assert vals == sorted(vals)


def test_gradual_pruning_in_the_trainer_reaches_target_and_keeps_zeros(digits_cnn):
    import copy

    from lamina.config.schema import TrainerConfig
    from lamina.data.loader import make_loader
    from lamina.data.base import TensorData
    from lamina.engine.trainer import Trainer
    from lamina.tasks import build_task

    model = copy.deepcopy(digits_cnn[0])
    x, y = _digits()
    loader = make_loader(TensorData(x=x[:1400], y=y[:1400]), 64, shuffle=True, seed=0)
    steps = 2 * len(loader)
    cb = GradualPruning(model, 0.7, steps, every=5)
    tr = Trainer(TrainerConfig(max_epochs=2, progress=False, device="cpu"), callbacks=[cb])
    tr.fit(model, build_task("classification", num_classes=10), loader, None,
           torch.optim.AdamW(model.parameters(), lr=1e-3))
    from lamina.compress.prune import prunable_weights

    ws = [m.weight for m, _ in prunable_weights(model)]  # the head is kept whole
    assert sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws) == pytest.approx(0.7, abs=1e-3)
    assert int((model.head.weight == 0).sum()) == 0
    targets = [s for _, s in cb.history]
    assert targets == sorted(targets) and targets[-1] == pytest.approx(0.7) and len(targets) > 3
    assert _acc(model, x[1400:], y[1400:]) > 0.85
    assert all(not k.endswith(("_orig", "_mask")) for k in model.state_dict())  # plain, loadable weights


def test_channel_prune_removes_dead_channels_exactly():
    torch.manual_seed(0)
    m = create_model("small_cnn", channels=(16, 32)).eval()
    with torch.no_grad():  # half of every stage's channels contribute nothing: pruning them is lossless
        for conv, bn in [(m.stages[0][0][0], m.stages[0][0][1]), (m.stages[1][0][0], m.stages[1][0][1])]:
            c = conv.out_channels // 2
            conv.weight[c:] = 0
            bn.weight[c:] = 0
            bn.bias[c:] = 0
            bn.running_mean[c:] = 0
    x = torch.rand(4, 1, 8, 8)
    pruned = channel_prune(m, x[:2], 0.5)
    assert [s[0][0].out_channels for s in pruned.stages] == [8, 16]
    assert pruned.head.in_features == 16 and pruned.stages[1][0][0].in_channels == 8
    torch.testing.assert_close(pruned(x), m(x), atol=1e-5, rtol=1e-5)
    n0, n1 = (sum(p.numel() for p in mm.parameters()) for mm in (m, pruned))
    assert n1 < 0.35 * n0


def test_head_pruning_drops_dead_heads_exactly():
    from lamina.compress.prune import _prune_heads
    from lamina.nn.attention import MultiHeadAttention

    torch.manual_seed(0)
    a = MultiHeadAttention(32, 4, causal=True).eval()
    with torch.no_grad():  # heads 1 and 3 write nothing into the output
        for h in (1, 3):
            a.v_proj.weight[h * 8:(h + 1) * 8] = 0
            a.v_proj.bias[h * 8:(h + 1) * 8] = 0
            a.q_proj.weight[h * 8:(h + 1) * 8] *= 0.01
            a.out_proj.weight[:, h * 8:(h + 1) * 8] = 0
    x = torch.randn(2, 5, 32)
    ref = a(x)
    _prune_heads(a, 0.5)
    assert a.n_head == 2 and a.q_proj.weight.shape == (16, 32) and a.out_proj.weight.shape == (32, 16)
    torch.testing.assert_close(a(x), ref, atol=1e-6, rtol=1e-5)


def test_channel_prune_transformer_heads_and_errors():
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    gpt = create_model("gpt", vocab_size=65, n_layer=2, n_embd=64, n_head=4, block_size=32).eval()
    ids = torch.randint(0, 65, (2, 32))
    pruned = channel_prune(gpt, ids, 0.5)
    attn = pruned.blocks[0].attn
    assert attn.n_head == 2 and attn.q_proj.out_features == 32 and attn.out_proj.in_features == 32
    assert pruned.blocks[0].mlp.fc.out_features == 128 and pruned.lm_head.out_features == 65
    assert pruned(ids).shape == (2, 32, 65)
    with pytest.raises(ModelError, match="no longer runs"):  # option-A (zero-pad) shortcuts are not traceable
        channel_prune(create_model("resnet20", in_chans=1), torch.rand(2, 1, 16, 16), 0.5)


# ----- a trained run, end to end -------------------------------------------------------------------
def test_quantize_and_prune_cli_on_a_run(digits_run_copy, capsys):
    from lamina.cli.main import main
    from lamina.compress.run import evaluate_model, load_variant, open_context

    run = digits_run_copy  # the shared digits run (conftest; small_cnn, 4 epochs), copied: the verbs write into it
    assert main(["quantize", str(run), "--method", "static", "--repeats", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    fp32, q = res["rows"]
    assert q["size_x"] > 3.0 and q["acc_delta_points"] > -2.0
    # saved as safetensors + recipe.json, rebuilt on load (no pickle): the same int8 model that was measured
    assert (Path(res["saved"]) / "recipe.json").is_file() and not (Path(res["saved"]) / "model.pt").exists()
    loaded = load_variant(res["saved"])
    x = torch.rand(3, 1, 8, 8)
    with torch.inference_mode():
        assert loaded(x).shape == (3, 10)
    ctx = open_context(run)
    assert evaluate_model(loaded, ctx)["acc"] == pytest.approx(q["test_acc"])
    assert main(["prune", str(run), "--method", "channels", "--epochs", "1", "--repeats", "3", "--json",
                 "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rows"][-1]["params"] < 0.35 * res["rows"][0]["params"]
    assert res["rows"][-1]["test_acc"] > 0.9
    pruned = load_variant(res["saved"])  # the same channels cut again, then the fine-tuned weights loaded
    assert sum(p.numel() for p in pruned.parameters()) == res["rows"][-1]["params"]
    assert evaluate_model(pruned, ctx)["acc"] == pytest.approx(res["rows"][-1]["test_acc"])
    assert main(["quantize", str(run), "--method", "int3"]) == 2
    assert "accepted: dynamic, static" in capsys.readouterr().err
    assert main(["prune", str(run), "--amount", "1.5"]) == 2
    assert math.isfinite(fp32["latency_b1_ms"])
