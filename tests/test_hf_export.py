"""Weights out (lamina.hub.hf_write, lamina.deploy.hf_export, `lamina export --format hf|peft`): small gpt / llama /
bert models written as HF-layout folders load in `transformers` with the same fp32 logits (1e-5) and back into
lamina through load_hf_folder; LoRA adapters written as PEFT folders give, through peft.PeftModel, the logits of
lamina's LoRA model (1e-5); tokenizers encode to the run's ids; what HF cannot represent is one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED_DATA, scramble

from lamina.cli.main import main
from lamina.errors import ModelError
from lamina.hub.hf import load_hf_folder
from lamina.hub.hf_write import hf_tokenizer_files, write_hf_folder, write_peft_folder
from lamina.models import create_model
from lamina.nn.lora import apply_lora, remove_lora

transformers = pytest.importorskip("transformers", reason="the reference models come from transformers")
TOL = 1e-5
FAST = ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false", "trainer.threads=1",
        "trainer.perf=false"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models on a busy machine (conftest restores the count)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _ids(vocab: int, T: int = 24, lo: int = 5) -> torch.Tensor:
    return torch.randint(lo, vocab, (2, T), generator=torch.Generator().manual_seed(1))


def _hf(cls_name: str, folder):
    model, info = getattr(transformers, cls_name).from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # every tensor has its place
    return model.float().eval()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert b.abs().max() > 0.5  # logits large enough that 1e-5 is a real bound
    return (a - b).abs().max().item()


def _roundtrip(model, folder, ids, **kw) -> float:
    back, info = load_hf_folder(folder)
    with torch.no_grad():
        return (back.eval()(ids, **kw) - model(ids, **kw)).abs().max().item()


# ----- HF layout: parity with transformers and lamina's own reader ---------------------------------------------
@pytest.mark.parametrize("bias, tied, act", [(True, True, "gelu_tanh"), (False, False, "gelu"),
                                             (False, True, "relu")])
def test_gpt_exports_as_gpt2(tmp_path, bias, tied, act):
    model = create_model("gpt", vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=bias,
                         tie_weights=tied, activation=act).eval()
    scramble(model)
    spec = write_hf_folder(model, tmp_path / "hf")
    assert spec.architecture == "GPT2LMHeadModel" and spec.config["tie_word_embeddings"] == tied
    hf = _hf("AutoModelForCausalLM", tmp_path / "hf")
    ids = _ids(50)
    with torch.no_grad():
        d = _diff(hf(input_ids=ids).logits, model(ids))
    r = _roundtrip(model, tmp_path / "hf", ids)
    print(f"\n[hf gpt bias={bias} tied={tied} {act}] transformers {d:.2e}, lamina round trip {r:.2e}")
    assert d <= TOL and r <= TOL
    from lamina.models.generation import generate

    with torch.no_grad():  # transformers' KV-cached greedy decoding: lamina's tokens, and lamina's logits per step
        out = hf.generate(ids[:1, :8], max_new_tokens=12, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        seq = out.sequences
        want = model(seq[:, :-1])[0, 7:]  # (12, V): the logits that chose tokens 8 .. 19
    ours = generate(model, ids[:1, :8], 12, greedy=True)
    assert seq.tolist() == ours.tolist()
    assert (torch.cat(out.logits) - want).abs().max() <= TOL


@pytest.mark.parametrize("tied", [True, False])
def test_llama_exports_as_llama(tmp_path, tied):
    model = create_model("llama", vocab_size=60, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         rope_base=500.0, tie_weights=tied).eval()
    scramble(model)
    write_hf_folder(model, tmp_path / "hf")
    hf = _hf("AutoModelForCausalLM", tmp_path / "hf")
    ids = _ids(60)
    with torch.no_grad():
        d = _diff(hf(input_ids=ids).logits, model(ids))
    r = _roundtrip(model, tmp_path / "hf", ids)
    print(f"\n[hf llama tied={tied}] transformers {d:.2e}, lamina round trip {r:.2e}")
    assert d <= TOL and r <= TOL


BERT = dict(vocab_size=70, block_size=32, n_layer=2, n_head=2, n_embd=32, ffn_hidden=48, dropout=0.0)


@pytest.mark.parametrize("name, opts, auto", [
    ("bert_mlm_mini", {}, "AutoModelForMaskedLM"),
    ("bert_mini", {"num_classes": 3, "pool": "cls"}, "AutoModelForSequenceClassification"),
    ("bert_qa_mini", {}, "AutoModelForQuestionAnswering"),
    ("bert_mini", {"num_classes": 0, "pool": "mean"}, "AutoModel"),
])
def test_bert_exports_by_head(tmp_path, name, opts, auto):
    model = create_model(name, **BERT, **opts).eval()
    scramble(model)
    write_hf_folder(model, tmp_path / "hf")
    hf = _hf(auto, tmp_path / "hf")
    ids = _ids(70)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # a padded second row: the key masks must agree too
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask)
        want = model(ids, attention_mask=mask.bool())
    if auto == "AutoModelForQuestionAnswering":
        got = torch.stack([out.start_logits, out.end_logits], -1)
    elif auto == "AutoModel":  # mean pooling over the real tokens (sentence-transformers' Pooling)
        m = mask[..., None].float()
        got = (out.last_hidden_state * m).sum(1) / m.sum(1)
    else:
        got = out.logits
    if want.dim() == 3:  # positions past the padding are not compared: neither model looks at them
        got, want = got[0], want[0]
    d = _diff(got, want)
    r = _roundtrip(model, tmp_path / "hf", ids)
    print(f"\n[hf {name} {opts}] transformers {d:.2e}, lamina round trip {r:.2e}")
    assert d <= TOL and r <= TOL


@pytest.mark.parametrize("build, msg", [
    (lambda: create_model("small_cnn", num_classes=10, in_chans=1), "model small_cnn has no Hugging Face equivalent"),
    (lambda: create_model("gpt", vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8, activation="elu"),
     "gpt activation='elu'"),
    (lambda: create_model("bert_mini", **BERT, num_classes=3, pool="mean"), "bert pool=mean with a classification"),
])
def test_what_hf_cannot_represent_is_one_line(tmp_path, build, msg):
    with pytest.raises(ModelError) as e:
        write_hf_folder(build(), tmp_path / "hf")
    text = str(e.value)
    assert msg in text and "supported: gpt (GPT2LMHeadModel), llama" in text and "\n" not in text
    assert not (tmp_path / "hf").exists()


# ----- tokenizers ----------------------------------------------------------------------------------------------
def _fast(files: dict, tmp_path):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return transformers.AutoTokenizer.from_pretrained(str(tmp_path))


def test_char_lm_vocabulary_becomes_a_tokenizer_with_the_same_ids(tmp_path):
    from lamina.data.files import encode_text

    text = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n"
    vocab = sorted(set(text))
    tok = _fast(hf_tokenizer_files(None, vocab, block_size=64), tmp_path)
    want = encode_text({"vocab": vocab}, text).tolist()
    assert tok(text)["input_ids"] == want and tok.decode(want) == text


def test_char_tokenizer_keeps_specials_and_unknown(tmp_path):
    from lamina.data.tokenizers import CharTokenizer

    lam = CharTokenizer.train(["hello world"])
    tok = _fast(hf_tokenizer_files(lam.to_json(), None, block_size=16), tmp_path)
    assert tok("hello, world")["input_ids"] == lam.encode("hello, world")  # "," is unknown: <unk> = 1
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)


def test_missing_tokenizers_is_one_line(monkeypatch):
    from lamina.errors import MissingDependencyError

    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # `import tokenizers` now raises
    with pytest.raises(MissingDependencyError, match=r'pip install "lamina\[hf\]"'):
        hf_tokenizer_files(None, ["a", "b"], block_size=8)


def test_bpe_tokenizer_for_bert_adds_the_specials_lamina_adds(tmp_path):
    from lamina.data.tokenizers import BPETokenizer

    lam = BPETokenizer.train(["to be or not to be that is the question"] * 20, vocab_size=300)
    tok = _fast(hf_tokenizer_files(lam.to_json(), None, block_size=32, bert=True), tmp_path)
    ids, _ = lam.pad([lam.encode("to be or not")], bos=True, eos=True)
    assert tok("to be or not")["input_ids"] == ids[0].tolist()
    assert (tok.cls_token, tok.sep_token, tok.mask_token) == ("<s>", "</s>", "<mask>")


# ----- PEFT adapters ---------------------------------------------------------------------------------------------
def _lora(model, targets, rank=4, alpha=8.0):
    torch.manual_seed(0)  # lora_A's kaiming init draws from the global generator
    apply_lora(model, targets, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # trained adapters: B away from its zero init
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _peft_diff(model, auto, tmp_path, ids, trained=()) -> tuple[float, dict]:
    peft = pytest.importorskip("peft", reason="the reference adapters come from peft")
    import copy

    base = copy.deepcopy(model)
    remove_lora(base, merge=False)
    write_hf_folder(base, tmp_path / "base")
    adapter = write_peft_folder(model, tmp_path / "adapter", trained=list(trained))
    hf = peft.PeftModel.from_pretrained(_hf(auto, tmp_path / "base"), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        out = hf(input_ids=ids)
        want, plain = model(ids), base(ids)
    assert (want - plain).abs().max() > 100 * TOL  # the adapters change the output: parity is about them
    return _diff(out.logits, want), adapter.config


def test_gpt_lora_as_peft_fuses_q_v_into_c_attn(tmp_path):
    model = create_model("gpt", vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32).eval()
    scramble(model)
    _lora(model, ["q_proj", "v_proj", "mlp.fc"])
    d, cfg = _peft_diff(model, "AutoModelForCausalLM", tmp_path, _ids(50))
    print(f"\n[peft gpt q,v,fc] PeftModel vs lamina LoRA: {d:.2e}; {cfg['target_modules']} r={cfg['r']} "
          f"rank_pattern={cfg['rank_pattern']}")
    assert d <= TOL
    assert cfg["target_modules"] == ["c_attn", "c_fc"] and cfg["fan_in_fan_out"]
    assert (cfg["r"], cfg["lora_alpha"]) in ((8, 16.0), (4, 8.0))  # c_attn: rank 2r, alpha 2 alpha; c_fc: r, alpha
    keys = set(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()))
    assert {"peft_type", "r", "lora_alpha", "target_modules", "task_type"} <= keys


def test_llama_lora_as_peft(tmp_path):
    model = create_model("llama", vocab_size=60, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32).eval()
    scramble(model)
    _lora(model, ["q_proj", "v_proj", "attn.out_proj"])
    d, cfg = _peft_diff(model, "AutoModelForCausalLM", tmp_path, _ids(60))
    print(f"\n[peft llama q,v,o] PeftModel vs lamina LoRA: {d:.2e}; {cfg['target_modules']}")
    assert d <= TOL and cfg["target_modules"] == ["o_proj", "q_proj", "v_proj"] and cfg["task_type"] == "CAUSAL_LM"
    from safetensors.torch import load_file

    names = sorted(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert names[0] == "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"


def test_bert_classifier_lora_with_its_trained_head_as_peft(tmp_path):
    model = create_model("bert_mini", **BERT, num_classes=3, pool="cls").eval()
    scramble(model)
    _lora(model, ["q_proj", "v_proj"])
    d, cfg = _peft_diff(model, "AutoModelForSequenceClassification", tmp_path, _ids(70),
                        trained=["head.weight", "head.bias"])
    print(f"\n[peft bert cls q,v + head] PeftModel vs lamina LoRA: {d:.2e}; {cfg['target_modules']}")
    assert d <= TOL and cfg["target_modules"] == ["query", "value"] and cfg["modules_to_save"] == ["classifier"]


# ----- the CLI on real trained runs -----------------------------------------------------------------------------
TINY_GPT = ["data.block_size=32", "data.batch_size=8", "data.steps_per_epoch=10", "data.eval_batch_size=64",
            "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "trainer.max_steps=20", "trainer.max_epochs=2",
            "schedule.warmup_steps=2"]


def _train(root, name, extra):
    import lamina

    n = torch.get_num_threads()
    try:
        cfg = lamina.load_config("configs/shakespeare_char_gpt.yaml",
                                 [*FAST, *TINY_GPT, f"logging.root={root}", f"name={name}", *extra])
        return lamina.train(cfg).run_dir
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def char_gpt(tmp_path_factory):
    """A real char-level GPT run on Tiny Shakespeare, 20 steps (read-only: exports go to tmp folders)."""
    if not (SHARED_DATA / "tinyshakespeare").exists():
        pytest.skip("needs ../shared/data/tinyshakespeare")
    return _train(tmp_path_factory.mktemp("hf_runs"), "gpt", [])


def test_cli_exports_a_trained_char_gpt_that_transformers_runs(char_gpt, tmp_path, capsys):
    from lamina.data.files import encode_text
    from lamina.runs import open_run

    out = tmp_path / "hf"
    assert main(["export", str(char_gpt), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "GPT2LMHeadModel (hf)" in printed and "transformers:" in printed
    result = json.loads((tmp_path / "hf.export.json").read_text())
    assert max(result["parity"].values()) <= TOL
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / f).is_file(), f
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "val/loss" in card and "tiny_shakespeare" in card

    lam = open_run(char_gpt)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    prompt = "ROMEO:\nWhat light"
    ids = encode_text(lam.facts.meta, prompt)[None]
    assert tok(prompt, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    assert tok.decode(ids[0]) == prompt
    hf = _hf("AutoModelForCausalLM", out)
    with torch.no_grad():
        d = _diff(hf(input_ids=ids).logits, lam.model.eval()(ids))
        new = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    from lamina.models.generation import generate

    ours = generate(lam.model, ids, 12, greedy=True)[0, ids.shape[1]:]
    print(f"[cli gpt] transformers vs lamina on {prompt!r}: {d:.2e}; greedy: {tok.decode(new)!r}")
    assert d <= TOL and new.tolist() == ours.tolist()


def test_cli_lora_on_a_trained_run_exports_as_peft(char_gpt, tmp_path, capsys):
    """LoRA on the trained run (model.pretrained=RUN, finetune.mode=lora), then --format peft: PeftModel over the
    exported base gives the LoRA run's logits."""
    pytest.importorskip("peft", reason="the reference adapters come from peft")
    run = _train(tmp_path, "lora", [f"model.pretrained={char_gpt}", "finetune.mode=lora", "finetune.lora_rank=4",
                                    "optimizer.lr=0.05"])
    out = tmp_path / "peft"
    assert main(["export", str(run), "--format", "peft", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "target_modules: c_attn; r=8, lora_alpha=32" in printed and "peft:" in printed
    result = json.loads((tmp_path / "peft.export.json").read_text())
    assert max(result["parity"].values()) <= TOL
    assert {"adapter_config.json", "adapter_model.safetensors", "base", "README.md"} <= set(result["files"])
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "merged")]) == 0  # adapters merged
    merged = json.loads((tmp_path / "merged.export.json").read_text())["parity"]
    assert merged["lora_merge_max_abs_diff"] <= TOL and merged["transformers_max_abs_diff"] <= TOL
    from lamina.runs import open_run

    base, lora = open_run(char_gpt).model.eval(), open_run(run).model.eval()
    ids = _ids(base.vocab_size)
    with torch.no_grad():  # the run started from the trained weights: its frozen base is the first run's model
        assert torch.equal(_hf("AutoModelForCausalLM", out / "base")(input_ids=ids).logits, base(ids))
        assert (lora(ids) - base(ids)).abs().max() > 1e-3


def test_cli_exports_a_trained_char_llama(tmp_path, capsys):
    if not (SHARED_DATA / "tinyshakespeare").exists():
        pytest.skip("needs ../shared/data/tinyshakespeare")
    import lamina

    n = torch.get_num_threads()
    try:
        run = lamina.train(lamina.load_config("configs/shakespeare_char_llama.yaml", [
            *FAST, *TINY_GPT, "model.n_kv_head=1", f"logging.root={tmp_path}", "name=llama"])).run_dir
    finally:
        torch.set_num_threads(n)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    print(printed)
    parity = json.loads((tmp_path / "hf.export.json").read_text())["parity"]
    assert "LlamaForCausalLM (hf)" in printed and parity["transformers_max_abs_diff"] <= TOL
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["eos_token_id"]) == (1, None)  # no Llama default eos (2) in a char LM


def test_pretrained_lm_with_other_characters_is_one_line(char_gpt, tmp_path, capsys):
    text = tmp_path / "other.txt"
    text.write_text("0123456789 " * 400)  # 11 characters: not the run's 65
    args = ["train", "configs/shakespeare_char_gpt.yaml", *FAST, *TINY_GPT, f"logging.root={tmp_path}",
            "data.name=text", f"data.path={text}", f"model.pretrained={char_gpt}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "model.pretrained: a language-modeling run continues a next-token model over the data's 11-token" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("args, msg", [
    (["export", "{run}", "--format", "hf"], "hf export: model small_cnn has no Hugging Face equivalent; supported:"),
    (["export", "{run}", "--format", "peft"], "--format peft: {run} is not a LoRA run"),
    (["export", "{run}", "--format", "hf", "--int8"], "--int8: quantized export is ONNX only"),
    (["export", "{run}", "--format", "safetensors"], "unknown format 'safetensors'"),
    (["export", "{tmp}", "--format", "peft"], "{tmp}: not a run folder"),
])
def test_cli_hf_export_bad_input_is_one_line_exit_2(args, msg, digits_run, tmp_path, capsys):
    args = [a.format(run=digits_run, tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert msg.format(run=digits_run, tmp=tmp_path) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ----- PEFT adapters in: peft's own adapters, and lamina's round trip --------------------------------------------
def _peft_reference(hf, lora_kwargs, tmp_path):
    """A base saved by transformers and a LoRA adapter made and saved by peft itself (B random: init False)."""
    peft = pytest.importorskip("peft", reason="the reference adapters come from peft")
    scramble(hf)
    hf.save_pretrained(tmp_path / "base", safe_serialization=True)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **lora_kwargs)).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    return pm


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_adapter_loads_into_lamina(tmp_path, family):
    from lamina.hub.peft_adapter import load_peft_adapter

    if family == "gpt2":  # "c_proj" names both attn.c_proj and mlp.c_proj; c_attn is split into q, k, v
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2,
                                                                  n_head=2, tie_word_embeddings=True))
        kw = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                  rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"h.1.attn.c_attn": 3.0})
    else:  # rsLoRA scaling alpha / sqrt(r)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False))
        kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    pm = _peft_reference(hf.eval(), kw, tmp_path)
    model, _ = load_hf_folder(tmp_path / "base")
    wrapped = load_peft_adapter(model, tmp_path / "adapter")
    ids = _ids(50)
    with torch.no_grad():
        d = _diff(pm(input_ids=ids).logits, model.eval()(ids))
    print(f"\n[peft -> lamina {family}] {len(wrapped)} LoRA modules, max abs diff {d:.2e}")
    assert d <= TOL and len(wrapped) == (10 if family == "gpt2" else 6)  # gpt2: q, k, v, attn and mlp c_proj


def test_lamina_peft_export_reads_back(tmp_path):
    import copy

    from lamina.hub.peft_adapter import load_peft_adapter

    model = create_model("bert_mini", **BERT, num_classes=3, pool="cls").eval()
    scramble(model)
    _lora(model, ["q_proj", "v_proj", "mlp.fc"])
    base = copy.deepcopy(model)
    remove_lora(base, merge=False)
    with torch.no_grad():
        base.head.weight.mul_(-1)  # the adapter's modules_to_save must restore the trained head
    write_peft_folder(model, tmp_path / "adapter", trained=["head.weight", "head.bias"])
    assert sorted(load_peft_adapter(base, tmp_path / "adapter"))[:2] == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"]
    ids = _ids(70)
    with torch.no_grad():
        assert (base.eval()(ids) - model(ids)).abs().max() <= TOL


@pytest.mark.parametrize("edit, msg", [
    (lambda c, s: c.update(peft_type="IA3"), "peft_type='IA3' is not supported by lamina's LoRA; accepted: LORA"),
    (lambda c, s: c.update(use_dora=True), "use_dora=True is not supported"),
    (lambda c, s: c.update(rank_pattern={"h.0.attn.c_attn": "8"}), "rank_pattern={'h.0.attn.c_attn': '8'} is not"),
    (lambda c, s: c.update(alpha_pattern={"(": 2.0}), "pattern '(' is not a regular expression"),
    (lambda c, s: s.update({"base_model.model.transformer.h.0.attn.c_attn.lora_C.weight": torch.zeros(2)}),
     "1 tensor(s) with no place in lamina's gpt2"),
    (lambda c, s: s.update({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 31)}),
     "do not fit a (96, 32) layer of rank 4"),
])
def test_bad_peft_adapter_is_one_line(tmp_path, edit, msg):
    from safetensors.torch import load_file, save_file

    from lamina.errors import CheckpointError
    from lamina.hub.peft_adapter import load_peft_adapter

    model = create_model("gpt", vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32).eval()
    _lora(model, ["q_proj"])
    write_peft_folder(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    edit(cfg, state)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(state, str(tmp_path / "a" / "adapter_model.safetensors"))
    remove_lora(model, merge=False)
    with pytest.raises(CheckpointError) as e:
        load_peft_adapter(model, tmp_path / "a")
    assert msg in str(e.value) and "\n" not in str(e.value)
