"""PEFT LoRA adapters in from the CLI: `--adapter FOLDER` on eval / generate / predict puts an adapter on a run's
model; `model.adapter=FOLDER` (with model.pretrained=<its base>, finetune.mode=lora) trains on from one.

Round trip on real (tiny) runs: a char GPT, a LoRA run on it, `lamina export --format peft`; the base run with the
exported adapter gives the LoRA run's logits (1e-5), greedy text and eval metrics, and a run started from the
adapter starts where the LoRA run ended. Bad adapters are one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from lamina.cli.main import main

TOL = 1e-5
FAST = ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false", "trainer.threads=1",
        "trainer.perf=false", "cost.energy=false", "cost.flops=false"]
TINY = ["model.name=gpt", "data.block_size=16", "data.batch_size=8", "data.steps_per_epoch=5",
        "data.eval_batch_size=64", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.dropout=0.0",
        "trainer.max_epochs=1", "schedule.warmup_steps=1"]
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(120))


def _train(root, name, extra):
    import lamina

    n = torch.get_num_threads()
    try:
        cfg = lamina.load_config(None, ["data.name=text", f"data.path={root / 'text.txt'}", *FAST, *TINY,
                                        f"logging.root={root}", f"name={name}", *extra])
        return lamina.train(cfg).run_dir
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base char GPT, LoRA run on it, its PEFT export): q, v and mlp.fc adapters, moved well away from zero."""
    root = tmp_path_factory.mktemp("peft_cli")
    (root / "text.txt").write_text(TEXT)
    base = _train(root, "base", ["trainer.max_steps=5"])
    lora = _train(root, "lora", [f"model.pretrained={base}", "finetune.mode=lora", "finetune.lora_rank=4",
                                 "finetune.lora_targets=[q_proj,v_proj,mlp.fc]", "optimizer.lr=0.05",
                                 "trainer.max_steps=5"])
    assert main(["export", str(lora), "--format", "peft", "--out", str(root / "peft")]) == 0
    return base, lora, root / "peft"


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


def _ids(vocab):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def test_base_with_exported_adapter_is_the_lora_run(runs, capsys):
    from lamina.runs import open_run

    base, lora, peft = runs
    capsys.readouterr()
    plain, want = open_run(base).model, open_run(lora).model
    got = open_run(base, adapter=peft).model
    ids = _ids(plain.vocab_size)
    d = (_logits(got, ids) - _logits(want, ids)).abs().max().item()
    assert d <= TOL and (_logits(plain, ids) - _logits(want, ids)).abs().max() > 1e-2  # the adapter matters

    gen = ["--prompt", "line 3", "--max-new-tokens", "24", "--greedy"]
    assert main(["generate", str(lora), *gen]) == 0
    lora_text = capsys.readouterr().out
    assert main(["generate", str(base), *gen, "--adapter", str(peft)]) == 0
    assert capsys.readouterr().out == lora_text and len(lora_text) > 24

    assert main(["eval", str(lora), "--split", "val", "--json"]) == 0
    want_m = json.loads(capsys.readouterr().out)
    assert main(["eval", str(base), "--split", "val", "--json", "--adapter", str(peft)]) == 0
    got_m = json.loads(capsys.readouterr().out)
    assert got_m["val/loss"] == pytest.approx(want_m["val/loss"], abs=1e-5) and got_m["n"] == want_m["n"]


def test_training_goes_on_from_the_adapter(runs, tmp_path):
    """model.adapter on the exported HF base: the model starts as the LoRA run ended; with lr ~ 0 it stays there,
    and the run reopens (eval, export) with the adapter's LoRA layout."""
    from lamina.runs import open_run

    _, lora, peft = runs
    (tmp_path / "text.txt").write_text(TEXT)
    run = _train(tmp_path, "from-adapter", [f"model.pretrained={peft / 'base'}", f"model.adapter={peft}",
                                            "finetune.mode=lora", "optimizer.lr=1e-12", "trainer.max_steps=2"])
    want, again = open_run(lora).model, open_run(run).model
    ids = _ids(want.vocab_size)
    assert (_logits(again, ids) - _logits(want, ids)).abs().max().item() <= 1e-4
    from lamina.nn.lora import lora_modules

    mods = lora_modules(again)
    assert "blocks.0.attn.q_proj" in mods and "blocks.0.mlp.fc" in mods and "blocks.0.attn.k_proj" not in mods
    # the adapter's layout, not finetune.lora_rank's default 8: fc r=4; q gets c_attn's A of rank 2 x 4 (q and v)
    assert (mods["blocks.0.mlp.fc"].rank, mods["blocks.0.attn.q_proj"].rank) == (4, 8)


@pytest.mark.parametrize("case, msg", [
    ("missing", "checkpoint error: hub: {peft}-gone: no such folder; a PEFT adapter is a folder holding"),
    ("ia3", "peft_type='IA3' is not supported by lamina's LoRA; accepted: LORA"),
    ("targets", "4 tensor(s) with no place in lamina's gpt2: base_model.model.transformer.h.7.attn.c_attn.lora_A"),
    ("shapes", "lora_A (8, 48) / lora_B (144, 8) do not fit a (96, 32) layer of rank 8"),
    ("lora_run", "hub: the model already carries LoRA adapters; load a PEFT adapter into a plain base"),
    ("digits", "a PEFT adapter goes onto a model with a Hugging Face layout; model small_cnn has no Hugging Face"),
    ("predict", "a PEFT adapter goes onto a model with a Hugging Face layout; model small_cnn has no Hugging Face"),
])
def test_bad_adapter_is_one_line_exit_2(case, msg, runs, digits_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    base, lora, peft = runs
    adapter, target = tmp_path / "adapter", base
    shutil.copytree(peft, adapter, ignore=shutil.ignore_patterns("base"))
    if case == "missing":
        adapter = f"{peft}-gone"
    elif case == "ia3":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    elif case == "targets":  # an adapter for a deeper model: layer 7 does not exist here
        state = load_file(str(adapter / "adapter_model.safetensors"))
        state = {k.replace(".h.1.", ".h.7."): v for k, v in state.items()}
        save_file(state, str(adapter / "adapter_model.safetensors"))
    elif case == "shapes":  # an adapter trained on a wider model (n_embd 48)
        from lamina.hub.hf_write import write_peft_folder
        from lamina.models import create_model
        from lamina.nn.lora import apply_lora

        other = create_model("gpt", vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=48, bias=False)
        apply_lora(other, ["q_proj", "v_proj"], rank=4, alpha=8)
        shutil.rmtree(adapter)
        write_peft_folder(other, adapter)
    elif case == "lora_run":
        target = lora
    elif case in ("digits", "predict"):
        target = digits_run
    capsys.readouterr()
    args = ["generate", str(target), "--prompt", "line", "--max-new-tokens", "4", "--adapter", str(adapter)]
    if case in ("digits", "predict"):
        args = ["eval", str(target)] if case == "digits" else ["predict", str(target), str(tmp_path / "x.npy")]
        args += ["--adapter", str(adapter)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert msg.format(peft=peft) in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("extra, msg", [
    (["model.adapter={peft}", "finetune.mode=lora"],
     "config error: model.adapter: a PEFT adapter goes onto the base it was trained on; set model.pretrained"),
    (["model.pretrained={base}", "model.adapter={peft}"],
     ("config error: model.adapter: a run goes on from a LoRA adapter by training it as LoRA; set "
      "finetune.mode=lora (got full)")),
    (["model.pretrained={base}", "model.adapter={peft}-gone", "finetune.mode=lora"],
     "checkpoint error: hub: {peft}-gone: no such folder"),
])
def test_cli_train_bad_adapter_config_is_one_line_exit_2(extra, msg, runs, tmp_path, capsys):
    base, _, peft = runs
    (tmp_path / "text.txt").write_text(TEXT)
    args = ["train", "data.name=text", f"data.path={tmp_path / 'text.txt'}", *FAST, *TINY, f"logging.root={tmp_path}",
            "name=bad", *[e.format(base=base, peft=peft) for e in extra]]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert msg.format(base=base, peft=peft) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()  # refused before the run folder


def test_hf_and_peft_exports_count_their_stages_and_draw_a_bar(runs, tmp_path, capsys, monkeypatch):
    """Writing, then the parity check (transformers' import included: seconds): 2 stages, a bar on a terminal."""
    from lamina.deploy.hf_export import export_peft_run

    _, lora, _ = runs
    calls = []
    export_peft_run(lora, out=tmp_path / "peft", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 2), (1, 2), (2, 2)]
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats stderr as a terminal
    capsys.readouterr()
    assert main(["export", str(lora), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "\x1b[1mexport hf" in capsys.readouterr().err
    assert main(["export", str(lora), "--format", "hf", "--out", str(tmp_path / "hf"), "--no-progress"]) == 0
    assert "export hf" not in capsys.readouterr().err
