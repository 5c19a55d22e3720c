"""Export: ONNX (dynamo exporter, TorchScript fallback) and torch.export parity for every model family, the
metadata a server reads, int8 ONNX, and `lamina export` end to end on a real digits run.

Per family: a small instance, exported with a batch of 2 and checked on a larger batch (so the batch axis is
really dynamic) against PyTorch eager: max abs diff <= 1e-4 and argmax agreement 100%. Image models read real
handwritten digits (sklearn load_digits), token models real text (ids of characters of a sentence).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from conftest import copy_run  # noqa: E402
from lamina.cli.main import main  # noqa: E402
from lamina.deploy.export import (UNSUPPORTED, UNSUPPORTED_PROGRAM, ExportError, ParityError,  # noqa: E402
                                  check_parity, eager_fn, export_onnx, export_program, int8_method, onnx_fn, parity,
                                  program_fn)
from lamina.deploy.runtime import OnnxRunner  # noqa: E402
from lamina.models import create_model, get_entry, list_models  # noqa: E402

N = 8  # parity batch (export traces with 2)
TEXT = "the quick brown fox jumps over the lazy dog while lamina exports every model family to onnx"
CHARS = sorted(set(TEXT))
V = len(CHARS) + 1  # id 0 = padding


def _digits(n: int = N, side: int = 8) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float32)[:, None]  # (n, 1, 8, 8) real digits
    return torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear") if side != 8 else x


def _text(n: int = N, t: int = 12) -> torch.Tensor:
    ids = torch.tensor([CHARS.index(c) + 1 for c in TEXT])
    return torch.stack([ids[i * 5:i * 5 + t] for i in range(n)])  # (n, t) windows of real text


def _mask(ids: torch.Tensor) -> torch.Tensor:
    m = torch.ones_like(ids, dtype=torch.bool)
    m[0, ids.shape[1] // 2:] = False  # one padded row
    return m


TOK = dict(vocab_size=V, block_size=16)
# One small instance per family: (model name, options, inputs). Every registered family must appear here.
CASES = {
    "mlp": ("mlp", dict(in_features=64, num_classes=10, width=32), lambda: (_digits().flatten(1),)),
    "cnn": ("small_cnn", dict(in_chans=1, num_classes=10, channels=(8, 16)), lambda: (_digits(),)),
    "lenet": ("lenet5", dict(in_chans=1, num_classes=10), lambda: (_digits(side=28),)),
    "resnet": ("resnet20", dict(in_chans=1, num_classes=10, layers=(1, 1, 1), widths=(8, 16, 32)),
               lambda: (_digits(),)),
    "efficientnet": ("efficientnet_lite0", dict(in_chans=1, num_classes=10, width_mult=0.25, depth_mult=0.25,
                                                stem_stride=1), lambda: (_digits(side=16),)),
    "vit": ("vit_tiny", dict(in_chans=1, num_classes=10, img_size=8, patch_size=4, embed_dim=32, depth=1, n_head=2),
            lambda: (_digits(),)),
    "rnn": ("char_lstm", dict(**TOK, embed_dim=16, hidden_size=32, num_layers=1), lambda: (_text(),)),
    "gpt": ("gpt_mini", dict(**TOK, n_layer=1, n_head=2, n_embd=32), lambda: (_text(),)),
    "llama": ("llama_mini", dict(**TOK, n_layer=1, n_head=2, n_kv_head=1, n_embd=32), lambda: (_text(),)),
    "bert": ("bert_mini", dict(**TOK, n_layer=1, n_head=2, n_embd=32, ffn_hidden=64, num_classes=5),
             lambda: {"ids": (t := _text()), "attention_mask": _mask(t)}),
    "t5": ("t5_mini", dict(vocab_size=V, d_model=32, n_head=4, d_ff=64, n_enc_layer=1, n_dec_layer=1, block_size=16),
           lambda: {"src": _text(t=10), "tgt": _text(t=7)}),
    "multimodal": ("fusion_classifier", dict(num_classes=5, width=32, vocab_size=V, max_len=16, text_width=16,
                                             n_mels=6, audio_channels=(8, 8), image_options={"channels": (8, 16)}),
                   lambda: {"image": _digits(), "text": (t := _text()), "text_mask": _mask(t),
                            "audio": torch.randn(N, 20, 6, generator=torch.Generator().manual_seed(0)),
                            "audio_mask": torch.ones(N, 20, dtype=torch.bool)}),
    # the classical head: the quantum one simulates complex state vectors, which neither ONNX nor torch.export
    # handles (a one-line ExportError, tests/test_quantum.py)
    "hybrid": ("hybrid_mlp", dict(in_features=64, num_classes=10, head_kind="classical"),
               lambda: (_digits().flatten(1),)),
    # speech: log-mel frames of real digits' pixels would be meaningless; seeded frames, the whole length
    "ctc": ("ctc_bilstm", dict(n_mels=8, channels=8, hidden=8, layers=1),
            lambda: (torch.randn(N, 20, 8, generator=torch.Generator().manual_seed(0)),)),
    "detection": ("centernet_small", dict(in_chans=1, num_classes=3, widths=(8, 16, 32), neck=16, head=16),
                  lambda: (_digits(side=32),)),
    "face": ("face_cnn", dict(in_chans=1, num_classes=5, embed_dim=16, backbone_options={"channels": (8, 16)}),
             lambda: (_digits(),)),
    "cnn3d": ("cnn3d_small", dict(in_chans=1, num_classes=3, channels=(4, 8)),
              lambda: (_digits()[:, :, None].expand(N, 1, 8, 8, 8).contiguous(),)),
    # recommenders: user ids in, a score for every item out (what a server ranks); NeuMF, the family's widest graph
    "recsys": ("ncf", dict(n_users=20, n_items=12, gmf_dim=4, mlp=(8, 6, 4), init_std=1.0),
               lambda: (torch.arange(N) * 2 + 1,)),
}
# Each dynamo export costs seconds of tracing and translation: three families (a conv net, a decoder, an encoder
# that takes the TorchScript fallback) run by default, the rest are marked slow (`-m "not slow"` skips them).
FAST = {"cnn", "gpt", "bert"}


def _params(families, fast=FAST):
    return [pytest.param(f, marks=() if f in fast else pytest.mark.slow) for f in families]


SUPPORTED = [f for f, (name, _, _) in CASES.items() if name not in UNSUPPORTED]
# torch.export programs: one per input kind (conv net, vision transformer, recurrent, decoder, encoder with input
# checks that need the draft_export fallback); the dynamo ONNX exporter runs torch.export for every family anyway.
PROGRAM_CASES = ["cnn", "vit", "rnn", "llama", "bert"]


def _build(family: str):
    name, opts, make = CASES[family]
    torch.manual_seed(0)
    model = create_model(name, **opts).eval()
    with torch.no_grad():  # zero-initialised heads / residual gains would make every output 0 and parity vacuous
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.2)
    inputs = make()
    return model, (inputs if isinstance(inputs, dict) else dict(zip(["__pos__"], inputs)))


def _as_kw(model, inputs: dict) -> dict:
    if "__pos__" in inputs:  # positional: the forward's first parameter
        import inspect

        return {next(iter(inspect.signature(model.forward).parameters)): inputs["__pos__"]}
    return inputs


def test_every_registered_family_has_a_case():
    families = {get_entry(n).family for n in list_models()}
    assert families <= set(CASES), f"add an export case for {families - set(CASES)}"


@pytest.mark.parametrize("family", _params(SUPPORTED))
def test_onnx_export_parity(family, tmp_path):
    torch.set_num_threads(1)
    model, inputs = _build(family)
    kw = _as_kw(model, inputs)
    path = tmp_path / f"{family}.onnx"
    info = export_onnx(model, kw, path, metadata={"model": CASES[family][0], "normalize": None})
    assert info["exporter"] in ("dynamo", "torchscript")
    runner = OnnxRunner(path, threads=1)
    assert runner.metadata["model"] == CASES[family][0] and runner.metadata["exporter"] == info["exporter"]
    assert runner.input_names == list(kw) and runner.metadata["input_names"] == list(kw)
    assert all(isinstance(s[0], str) for s in runner.input_shapes)  # a named, free batch axis on every input
    with torch.no_grad():
        assert eager_fn(model)(kw).std() > 1e-2  # outputs that differ: a parity check with teeth
    res = parity(eager_fn(model), onnx_fn(path, threads=1), kw)  # batch N != the traced 2
    assert res["n"] == N
    assert res["max_abs_diff"] <= 1e-4 and res["argmax_agreement"] == 100.0, (family, info["exporter"], res)


@pytest.mark.parametrize("family", _params((f for f in PROGRAM_CASES if f in SUPPORTED), fast={"cnn"}))
def test_torch_export_program_parity(family, tmp_path):
    torch.set_num_threads(1)
    model, inputs = _build(family)
    kw = _as_kw(model, inputs)
    path = tmp_path / f"{family}.pt2"
    info = export_program(model, kw, path)
    assert path.is_file() and info["exporter"].startswith("torch.export")
    res = parity(eager_fn(model), program_fn(path), kw)
    assert res["max_abs_diff"] <= 1e-4 and res["argmax_agreement"] == 100.0, (family, res)


UNSUPPORTED_CASES = {  # name -> (options, inputs) that reproduce the reason given in UNSUPPORTED
    "lstm_classifier": (dict(**TOK, embed_dim=16, hidden_size=32, num_classes=5),
                        lambda: {"idx": _text(), "lengths": torch.tensor([12, 6, 12, 12, 9, 12, 12, 12])}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_models_raise_a_clear_error(name, tmp_path):
    assert UNSUPPORTED[name] and "\n" not in UNSUPPORTED[name] and name in list_models()
    opts, make = UNSUPPORTED_CASES[name]
    model = create_model(name, **opts).eval()
    with pytest.raises(ExportError, match=f"{name}: ONNX export failed with both exporters") as e:
        export_onnx(model, make(), tmp_path / "m.onnx")
    assert "\n" not in str(e.value)
    with pytest.raises(ExportError):
        export_program(model, make(), tmp_path / "m.pt2")


@pytest.mark.slow
def test_program_unsupported_models_raise_a_clear_error(tmp_path):
    """Multimodal models read token values in their input checks: draft_export fixes the batch axis; refused."""
    assert set(UNSUPPORTED_PROGRAM) <= set(list_models())
    model, inputs = _build("multimodal")
    assert CASES["multimodal"][0] in UNSUPPORTED_PROGRAM
    with pytest.raises(ExportError, match="fixed the batch axis"):
        export_program(model, inputs, tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


def test_parity_reports_and_limits():
    x = {"x": torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 1.0]])}
    same = parity(lambda d: d["x"], lambda d: d["x"].double() + 5e-5, x)
    assert same["max_abs_diff"] == pytest.approx(5e-5, abs=1e-7) and same["argmax_agreement"] == 100.0
    check_parity(same, "ok")
    flipped = parity(lambda d: d["x"], lambda d: d["x"].flip(-1), x)  # row 0 argmax 1 -> 1, row 1: 0 -> 2
    assert flipped["argmax_agreement"] == 50.0 and flipped["max_abs_diff"] == 1.0
    with pytest.raises(ParityError, match="argmax agreement 50.00%"):
        check_parity(flipped, "model.onnx")


def test_broken_export_fails_parity(tmp_path):
    """An artifact that differs from the model (weights changed after export) must fail the check."""
    model, inputs = _build("mlp")
    kw = _as_kw(model, inputs)
    export_onnx(model, kw, tmp_path / "m.onnx")
    with torch.no_grad():
        model.head.weight.mul_(-1) if hasattr(model, "head") else next(model.parameters()).mul_(-1)
    with pytest.raises(ParityError):
        check_parity(parity(eager_fn(model), onnx_fn(tmp_path / "m.onnx"), kw), "m.onnx")


def test_int8_method_by_architecture():
    assert int8_method(create_model("small_cnn", in_chans=1, num_classes=3)) == "static"
    assert int8_method(create_model("mlp", in_features=4, num_classes=3)) == "dynamic"
    assert int8_method(create_model("char_lstm", **TOK)) == "dynamic"
    assert int8_method(create_model("vit_tiny", in_chans=1, num_classes=3)) == "dynamic"


def test_export_rejects_bad_inputs(tmp_path):
    model = create_model("mlp", in_features=4, num_classes=3).eval()
    with pytest.raises(ExportError, match="batch of at least 2"):
        export_onnx(model, torch.randn(1, 4), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="do not fit"):
        export_onnx(model, {"nope": torch.randn(2, 4)}, tmp_path / "m.onnx")


# ----- CLI end to end on a real digits run -----------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_run):
    """This module's copy of conftest's shared digits run (small_cnn behind a normalize augment, mean 0.3, std 0.4):
    export writes into the run folder."""
    return copy_run(digits_run, tmp_path_factory.mktemp("runs") / "r")


def _table(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines()[2:]:
        cells = line.split()
        rows[Path(cells[0]).name] = cells
    return rows


def test_cli_export_onnx_and_int8(digits_run, capsys):
    torch.set_num_threads(1)
    assert main(["export", str(digits_run), "--format", "onnx", "--batch", "64"]) == 0
    rows = _table(capsys.readouterr().out)
    cells = rows["model.onnx"]
    assert cells[2] == "dynamo" and float(cells[3]) <= 1e-4 and cells[4] == "100.00%"
    art = digits_run / "export" / "model.onnx"
    report = json.loads((digits_run / "export" / "export.json").read_text())["onnx"]
    assert report["batch"] == 64 and report["split"] == "test"
    assert report["normalize"] == {"mean": [pytest.approx(0.3)], "std": [pytest.approx(0.4)]}
    summary = json.loads((digits_run / "summary.json").read_text())

    # The bare .onnx carries what a server needs: apply the normalization from metadata to raw test digits.
    runner = OnnxRunner(art)
    meta = runner.metadata
    assert meta["model"] == "small_cnn" and meta["exporter"] == "dynamo" and meta["input_name"] == "x"
    assert meta["facts"]["num_outputs"] == 10 and meta["facts"]["task"] == "classification"
    from lamina.runs import open_run

    test = open_run(digits_run).data().test
    x = ((test.x.numpy() - np.array(meta["normalize"]["mean"])[None, :, None, None])
         / np.array(meta["normalize"]["std"])[None, :, None, None]).astype(np.float32)
    acc = float((runner.run(x).argmax(1) == test.y.numpy()).mean())
    assert acc == pytest.approx(summary["test"]["test/acc"], abs=1e-6)  # the same model, the whole test split

    assert main(["export", str(digits_run), "--int8"]) == 0
    rows = _table(capsys.readouterr().out)
    q = rows["model.int8.onnx"]
    assert q[2] == "dynamo+int8-static"
    assert float(q[1]) < float(rows["model.onnx"][1])  # int8 weights (this tiny net: QDQ scales weigh as much)
    # int8 has no hard limit, only a report: the weights really changed, and most predictions survive (this tiny
    # 2-epoch net has small logit margins: ~75-85% agreement; the Fashion-MNIST CNN in README keeps 94%)
    assert float(q[3]) > 1e-3 and 50.0 <= float(q[4].rstrip("%")) <= 100.0 and q[5].endswith("%")
    report = json.loads((digits_run / "export" / "export.json").read_text())["onnx"]
    assert report["artifacts"][1]["quantization"] == "static"
    assert OnnxRunner(digits_run / "export" / "model.int8.onnx").metadata["quantization"] == "static"


def test_cli_export_torch_export(digits_run, capsys, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "prog.pt2"
    assert main(["export", str(digits_run), "--format", "torch-export", "--out", str(out), "--batch", "32"]) == 0
    cells = _table(capsys.readouterr().out)["prog.pt2"]
    assert cells[2] == "torch.export" and float(cells[3]) <= 1e-4 and cells[4] == "100.00%"
    assert json.loads((tmp_path / "export.json").read_text())["torch-export"]["format"] == "torch-export"


@pytest.mark.parametrize("args, msg", [
    (["export", "{tmp}", "--format", "onnx"], "not a run folder"),
    (["export", "{run}", "--format", "tflite"], "unknown format 'tflite'"),
    (["export", "{run}", "--format", "torch-export", "--int8"], "--int8: quantized export is ONNX only"),
])
def test_cli_export_bad_input_is_one_line_exit_2(args, msg, digits_run, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, run=digits_run) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("module", ["onnx", "onnxruntime"])
def test_missing_deploy_extra_is_one_line(module, digits_run, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # `import module` now raises ImportError
    assert main(["export", str(digits_run), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("missing dependency:") and 'pip install "lamina[deploy]"' in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_cli_export_failing_parity_is_one_line_and_writes_nothing(digits_run, capsys, monkeypatch, tmp_path):
    import lamina.deploy.export as ex

    real = ex.onnx_fn
    monkeypatch.setattr(ex, "onnx_fn", lambda path, threads=None: (lambda d: real(path)(d) + 1e-3))  # a drifted graph
    assert main(["export", str(digits_run), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parity error: m.onnx (dynamo exporter): max abs diff 0.001") and "\n" not in err
    assert not list(tmp_path.iterdir())  # neither the artifact nor its staged copy nor export.json
