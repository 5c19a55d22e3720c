"""HF-layout export of T5, ViT and ResNet (lamina.hub.hf_write, lamina.deploy.hf_export, `lamina export --format hf`):
small random models written as T5ForConditionalGeneration / ViTForImageClassification / ResNetForImageClassification
folders load in `transformers` with every tensor in place and the same fp32 logits (1e-5), T5's greedy generation
gives lamina's tokens, the folders read back through load_hf_folder, the exported image processor turns raw images
into lamina's model input, and variants HF cannot express are one line (exit 2 from the CLI)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED_DATA, scramble

from lamina.cli.main import main
from lamina.errors import CheckpointError, ModelError
from lamina.hub.hf import load_hf_folder
from lamina.hub.hf_write import write_hf_folder
from lamina.models import create_model

transformers = pytest.importorskip("transformers", reason="the reference models come from transformers")
from test_hf_export import FAST, TOL, _hf, _one_thread  # noqa: E402,F401  (the autouse fixture applies here too)


def _scramble_bn(model) -> None:
    """BatchNorm statistics away from 0 / 1 too, so the running mean / var names are checked by the logits."""
    g = torch.Generator().manual_seed(5)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(0.2 * torch.randn(buf.shape, generator=g))
        elif name.endswith("running_var"):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=g))


# ----- T5 -> T5ForConditionalGeneration ---------------------------------------------------------------------------
T5_SMALL = dict(vocab_size=90, d_model=32, n_head=4, d_ff=48, rel_buckets=8, rel_max_distance=20, dropout=0.0,
                block_size=24)


@pytest.mark.parametrize("ffn, tied, scaled, layers", [
    ("gated-gelu", True, False, (2, 2)),   # T5 v1.0-style tied head: HF scales the decoder output by d_model^-0.5
    ("relu", False, True, (2, 3)),         # lamina's Adam-friendly scaled attention, folded into q
    ("gated-gelu", False, True, (2, 2)),   # the multi30k_t5.yaml settings
])
def test_t5_exports_as_t5_for_conditional_generation(tmp_path, ffn, tied, scaled, layers):
    from lamina.deploy.hf_export import greedy_mismatches

    torch.manual_seed(0)
    model = create_model("t5_mini", **T5_SMALL, ffn=ffn, tie_weights=tied, scaled_attention=scaled,
                         n_enc_layer=layers[0], n_dec_layer=layers[1]).eval()
    spec = write_hf_folder(model, tmp_path / "hf")
    c = spec.config
    assert (c["d_kv"], c["num_layers"], c["num_decoder_layers"], c["feed_forward_proj"]) == (8, *layers, ffn)
    assert (c["decoder_start_token_id"], c["pad_token_id"], c["eos_token_id"]) == (2, 0, 3)
    hf = _hf("T5ForConditionalGeneration", tmp_path / "hf")
    g = torch.Generator().manual_seed(1)
    src = torch.randint(5, 90, (3, 14), generator=g)
    src[:, -1] = 3
    src[1, 9:] = 0  # a padded source: both models must mask it
    src[1, 8] = 3
    tgt = torch.randint(5, 90, (3, 11), generator=g)
    tgt[:, 0] = 2
    mask = src != 0
    with torch.no_grad():
        want = model(src, tgt, mask)
        d = (hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits - want).abs().max().item()
        back, info = load_hf_folder(tmp_path / "hf")
        r = (back.eval()(src, tgt, mask) - want).abs().max().item()
    mism = greedy_mismatches(model, hf, {"src": src, "mask": mask})
    # measured: transformers 1.2e-06 .. 1.5e-06, round trip 0 .. 1.3e-06 (|logits| ~ 3-5), 0 greedy mismatches
    print(f"\n[hf t5 {ffn} tied={tied} scaled={scaled} {layers}] transformers {d:.2e}, round trip {r:.2e}, "
          f"greedy mismatches {mism}")
    assert want.abs().max() > 0.5 and d <= TOL and r <= TOL and mism == 0
    assert info["family"] == "t5" and back.cfg.tie_weights == tied and not back.cfg.scaled_attention


# ----- ViT -> ViTForImageClassification ---------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_vit_exports_as_vit_for_image_classification(tmp_path, bias):
    model = create_model("vit_fashion", img_size=12, patch_size=4, in_chans=3, embed_dim=24, depth=2, n_head=3,
                         mlp_ratio=2.0, pool="cls", bias=bias, num_classes=5).eval()
    scramble(model)
    spec = write_hf_folder(model, tmp_path / "hf")
    assert spec.config["qkv_bias"] == bias and spec.config["intermediate_size"] == 48
    hf = _hf("ViTForImageClassification", tmp_path / "hf")
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
        d = (hf(pixel_values=x).logits - want).abs().max().item()
        back, info = load_hf_folder(tmp_path / "hf")
        r = (back(x) - want).abs().max().item()
    print(f"\n[hf vit bias={bias}] transformers {d:.2e}, round trip {r:.2e}")  # measured: 0 and 0 (|logits| ~ 2)
    assert want.abs().max() > 0.5 and d <= TOL and r <= TOL
    assert info["family"] == "vit" and back.cfg.bias == bias


# ----- ResNet -> ResNetForImageClassification ---------------------------------------------------------------------
@pytest.mark.parametrize("name, widths", [("resnet18", (8, 16)), ("resnet50", (4, 8))])
def test_resnet_exports_as_resnet_for_image_classification(tmp_path, name, widths):
    model = create_model(name, layers=(1, 2), widths=widths, in_chans=1, num_classes=3).eval()
    scramble(model)
    _scramble_bn(model)
    spec = write_hf_folder(model, tmp_path / "hf")
    assert spec.config["hidden_sizes"] == [w * (4 if name == "resnet50" else 1) for w in widths]
    hf = _hf("ResNetForImageClassification", tmp_path / "hf")
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
        d = (hf(pixel_values=x).logits - want).abs().max().item()
        back, info = load_hf_folder(tmp_path / "hf")
        r = (back(x) - want).abs().max().item()
    print(f"\n[hf {name}] transformers {d:.2e}, round trip {r:.2e}")  # measured: 0 and 0
    assert want.abs().max() > 0.5 and d <= TOL and r <= TOL
    assert info["family"] == "resnet" and back.cfg.block == model.cfg.block


# ----- what HF cannot express ----------------------------------------------------------------------------------
VIT = dict(img_size=8, patch_size=4, embed_dim=16, depth=1, n_head=2, num_classes=3)
RESNET = dict(layers=(1, 1), widths=(8, 16), in_chans=1, num_classes=3)


@pytest.mark.parametrize("build, msg", [
    (lambda: create_model("resnet18", **RESNET, small_input=True), "resnet small_input=True"),
    (lambda: create_model("resnet20"), "resnet small_input=True"),
    (lambda: create_model("resnet18", **RESNET, shortcut="A"), "resnet shortcut='A'"),
    (lambda: create_model("vit_fashion", **VIT, pool="mean"), "vit pool='mean'"),
    (lambda: create_model("vit_fashion", **{**VIT, "num_classes": 0}, pool="cls"), "a vit without a classification"),
])
def test_what_hf_cannot_express_is_one_line(tmp_path, build, msg):
    with pytest.raises(ModelError) as e:
        write_hf_folder(build(), tmp_path / "hf")
    text = str(e.value)
    assert msg in text and "has no Hugging Face equivalent; supported:" in text and "\n" not in text
    assert not (tmp_path / "hf").exists()


def test_t5_with_a_replaced_head_is_refused():
    model = create_model("t5_mini", **T5_SMALL)
    model.reset_classifier(7)
    with pytest.raises(ModelError, match="a t5 whose head was replaced"):
        write_hf_folder(model, "unused")


@pytest.mark.parametrize("edit, msg", [
    (lambda c, s: c.update(layer_norm_eps=1e-12), "layer_norm_eps=1e-12 is not supported by lamina's vit"),
    (lambda c, s: s.update({"vit.encoder.layer.0.attention.output.dense.bias": torch.ones(16)}),
     "vit.encoder.layer.0.attention.output.dense.bias is not zero"),
    (lambda c, s: c.update(num_hidden_layers=2), "12 model tensor(s) not in"),  # a layer the weights lack
])
def test_reader_refuses_vit_folders_it_cannot_build(tmp_path, edit, msg):
    from safetensors.torch import load_file, save_file

    write_hf_folder(create_model("vit_fashion", **VIT, pool="cls", bias=False), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    state = load_file(str(tmp_path / "model.safetensors"))
    edit(config, state)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_hf_folder(tmp_path)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_reader_refuses_a_t5_declaring_more_layers_than_its_weights_hold(tmp_path):
    write_hf_folder(create_model("t5_mini", **T5_SMALL, n_enc_layer=1, n_dec_layer=1), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_decoder_layers"] = 10 ** 9  # checked before anything is built, even on the meta device
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="declares 1,000,000,001 layers but the weights hold"):
        load_hf_folder(tmp_path)


def test_reader_checks_resnet_shapes_against_config(tmp_path):
    write_hf_folder(create_model("resnet18", **RESNET), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_sizes"] = [8, 32]  # stage 2 declared wider than its weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape config.json and the weights disagree on"):
        load_hf_folder(tmp_path)


# ----- the CLI on real trained runs ---------------------------------------------------------------------------
def _train(root, name, extra, config=None):
    import lamina

    n = torch.get_num_threads()
    try:
        cfg = lamina.load_config(config, [*FAST, f"logging.root={root}", f"name={name}", *extra])
        return lamina.train(cfg).run_dir
    finally:
        torch.set_num_threads(n)


TINY_VIT = ["model.name=vit_fashion", "model.img_size=8", "model.patch_size=2", "model.embed_dim=32",
            "model.depth=2", "model.n_head=2", "model.pool=cls", "trainer.max_epochs=1",
            "data.augment=[{name: normalize, mean: 0.3, std: 0.4}]"]


def test_cli_exports_a_trained_digits_vit_that_transformers_runs_on_raw_images(tmp_path, capsys):
    """A ViT trained on sklearn's digits (pixels 0..16, a normalize step): exported, the folder's image processor
    turns the raw 0..16 digit images into the normalized input lamina trained on, and the logits agree."""
    from sklearn.datasets import load_digits

    from lamina.runs import open_run

    run = _train(tmp_path, "vit", TINY_VIT)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "ViTForImageClassification (hf)" in printed and "8x1x8x8 images), transformers: " in printed
    assert "max abs pixel diff (8x1x8x8 images), transformers_preprocessor: " in printed
    result = json.loads((tmp_path / "hf.export.json").read_text())
    assert set(result["parity"]) == {"lamina_roundtrip_max_abs_diff", "transformers_max_abs_diff",
                                     "transformers_preprocessor_max_abs_diff"}
    assert max(result["parity"].values()) <= TOL
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"]["7"] == "7" and config["label2id"]["3"] == 3
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "AutoImageProcessor" in card

    lam = open_run(run)
    raw = load_digits().images[:6].astype("uint8")  # (6, 8, 8) in 0..16, what a user of the data set has
    proc = transformers.AutoImageProcessor.from_pretrained(str(out))
    pixels = proc(images=[r[None] for r in raw], return_tensors="pt", input_data_format="channels_first")["pixel_values"]
    ours = (torch.from_numpy(raw).float()[:, None] / 16 - 0.3) / 0.4  # lamina's data + normalize step
    assert (pixels - ours).abs().max() <= 1e-6
    hf = _hf("AutoModelForImageClassification", out)
    with torch.no_grad():
        d = (hf(pixel_values=pixels).logits - lam.model.eval()(ours)).abs().max().item()
    print(f"[cli vit digits] transformers on processor output vs lamina: {d:.2e}")  # measured: 0
    assert d <= TOL


@pytest.mark.parametrize("model, msg", [
    (["model.name=resnet18", "model.small_input=true", "model.layers=[1]", "model.widths=[8]"],
     "hf export: resnet small_input=True (HF's ResNet always starts with the 7x7/2 conv"),
    (["model.name=resnet18", "model.shortcut=A", "model.layers=[1,1]", "model.widths=[8,16]"],
     "hf export: resnet shortcut='A' (HF's ResNet has projection shortcuts only, B)"),
    (["model.name=vit_fashion", "model.img_size=8", "model.patch_size=4", "model.embed_dim=16", "model.depth=1",
      "model.n_head=2"], "hf export: vit pool='mean' (ViTForImageClassification classifies the [CLS] token"),
])
def test_cli_refuses_what_hf_cannot_express_in_one_line(tmp_path, capsys, model, msg):
    run = _train(tmp_path, "run", [*model, "trainer.max_steps=2", "trainer.max_epochs=1"])
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "has no Hugging Face equivalent" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cli_refuses_an_hf_resnet_folder_lamina_cannot_build_in_one_line(tmp_path, capsys):
    """The reader's refusals reach users through model.pretrained=FOLDER (fine-tuning from an HF folder)."""
    write_hf_folder(create_model("resnet18", **RESNET), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["layer_type"] = "preactivation"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["train", f"model.pretrained={tmp_path / 'hf'}", *FAST, f"logging.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json: layer_type='preactivation' is not supported by lamina's resnet; accepted: basic" in err
    assert len(err.splitlines()) == 1


def test_cli_exports_a_trained_multi30k_t5(tmp_path, capsys):
    """A tiny T5 trained a few steps on Multi30k: exported with its BPE tokenizer (sources end in </s>, as lamina's
    pipeline makes them) and generation_config; transformers' logits and greedy tokens are lamina's."""
    if not (SHARED_DATA / "multi30k").exists():
        pytest.skip("needs ../shared/data/multi30k")
    from lamina.runs import open_run

    run = _train(tmp_path, "t5", ["data.limit=500", "data.vocab_size=400", "model.d_model=32", "model.d_ff=64",
                                  "model.n_head=2", "model.n_enc_layer=1", "model.n_dec_layer=1",
                                  "trainer.max_steps=5", "trainer.max_epochs=1", "schedule.warmup_steps=2",
                                  "task.beam_size=1"], "configs/multi30k_t5.yaml")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "T5ForConditionalGeneration (hf)" in printed and "transformers greedy token mismatches" in printed
    result = json.loads((tmp_path / "hf.export.json").read_text())
    assert max(result["parity"].values()) <= TOL and result["parity"]["transformers_greedy_token_mismatches"] == 0
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["decoder_start_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 3, 0)

    lam = open_run(run)
    val = lam.data().val.tensors
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    from lamina.data.tokenizers import load_tokenizer

    text = "A man in a blue shirt is standing on a ladder."
    assert tok(text)["input_ids"] == load_tokenizer(lam.folder.tokenizer).encode(text) + [3]
    hf = _hf("AutoModelForSeq2SeqLM", out)
    src, tgt = val["src"][:3], val["tgt"][:3, :-1]
    with torch.no_grad():
        d = (hf(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=tgt).logits
             - lam.model.eval()(src, tgt, src != 0)).abs().max().item()
    print(f"[cli t5 multi30k] transformers vs lamina: {d:.2e}")
    assert d <= TOL


def test_cli_peft_of_a_vit_lora_run_is_one_line_pointing_at_format_hf(tmp_path, capsys):
    run = _train(tmp_path, "lora", [*TINY_VIT, "trainer.max_steps=2", "finetune.mode=lora",
                                    "finetune.lora_targets=[q_proj,v_proj]"])
    capsys.readouterr()
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
    assert "LoRA adapters of a vit run are not written as PEFT adapters; supported: gpt, llama, bert" in err
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0  # merged instead
