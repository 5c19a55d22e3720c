"""Registry-wide contract tests: every registered model, same harness (timm's test_models.py in spirit)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lamina.engine.checkpoint import _weights
from lamina.errors import InputShapeError, ModelError
from lamina.models import check_input_shape, create_model, example_input, get_entry, list_models

NUM_CLASSES = 7
IN_FEATURES = 13
VOCAB, BLOCK, SEQ = 50, 16, 12  # token models: vocabulary, context length, test sequence length (< BLOCK)
# multimodal and seq2seq models take several inputs: their own sections below and in test_models_contract_seq2seq.py;
# audio models (CTC acoustic models) take frames + lengths: tests/test_speech.py; volume models: test_medical.py;
# detectors: test_detection.py; recommenders (user and item ids): test_recsys.py
MODELS = [n for n in list_models()
          if get_entry(n).input_kind not in ("multimodal", "seq2seq", "audio", "volume", "detection", "interactions")]


def is_tokens(name: str) -> bool:
    return get_entry(name).input_kind == "tokens"


# Token models that are not language models: one label per sequence, or one label per token.
SEQ_CLASSIFIERS, TAGGERS = {"lstm_classifier", "bert_mini", "bert_minilm_l6"}, {"lstm_tagger"}
TAGGERS |= {"bert_qa_mini", "bert_qa_minilm_l6"}  # extractive QA: a (start, end) pair of logits per token
# Masked LMs are built and shaped like language models, (B, T, vocab), but are not causal.
MASKED_LMS = {"bert_mlm_mini"}


def is_lm(name: str) -> bool:
    return is_tokens(name) and name not in SEQ_CLASSIFIERS | TAGGERS


def build(name: str, **extra) -> torch.nn.Module:
    kind = get_entry(name).input_kind
    if kind == "tokens" and not is_lm(name):
        return create_model(name, vocab_size=VOCAB, block_size=BLOCK, num_classes=NUM_CLASSES, **extra)
    if kind == "tokens":  # language models: the head is the vocabulary, no num_classes
        return create_model(name, vocab_size=VOCAB, block_size=BLOCK, **extra)
    size = {"in_chans": 1} if kind == "image" else {"in_features": IN_FEATURES}
    return create_model(name, num_classes=NUM_CLASSES, **size, **extra)


def make_input(name: str, model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    if is_tokens(name):
        return torch.randint(0, VOCAB, (batch, SEQ))
    return example_input(model, batch=batch)


def out_shape(name: str, batch: int, width: int) -> tuple:
    """Classifiers: (B, classes); token models: a distribution per position (B, T, classes)."""
    return (batch, SEQ, width) if is_tokens(name) and name not in SEQ_CLASSIFIERS else (batch, width)


def test_registry_lists_the_families():
    assert {"mlp", "lenet5", "small_cnn", "cnn_medium", "resnet18", "resnet34", "resnet50",
            "resnet20", "resnet32", "resnet56"} <= set(MODELS)
    for name in MODELS:
        entry = get_entry(name)
        assert entry.description and "\n" not in entry.description
        assert entry.input_kind in ("image", "vector", "tokens")
    assert {"gpt", "gpt_mini"} <= set(MODELS) and is_tokens("gpt")


def test_unknown_model_name_is_one_line_model_error():
    with pytest.raises(ModelError, match=r"unknown model 'resnet19' \(did you mean 'resnet18'\?\)"):
        create_model("resnet19")


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build(name).train()
    x = make_input(name, model, batch=2)
    out = model(x)
    width = VOCAB if is_lm(name) else NUM_CLASSES
    assert out.shape == out_shape(name, 2, width)
    assert torch.isfinite(out).all()
    target = torch.randint(0, width, out.shape[:-1])
    F.cross_entropy(out.reshape(-1, width), target.reshape(-1)).backward()
    total = 0.0
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
            total += p.grad.abs().sum().item()
    assert total > 0


@pytest.mark.parametrize("name", MODELS)
def test_head_contract(name):
    torch.manual_seed(0)
    model = build(name).eval()
    x = make_input(name, model, batch=2)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == out_shape(name, 2, model.num_features)
        model.reset_classifier(3)
        assert model(x).shape == out_shape(name, 2, 3) and model.num_classes == 3
        model.reset_classifier(0)
        assert isinstance(model.forward_head(feats), torch.Tensor)
        torch.testing.assert_close(model(x), pooled)  # no head: forward returns the pooled features


@pytest.mark.parametrize("name", MODELS)
def test_safetensors_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = build(name)
    x = make_input(name, model, batch=2)
    model.train()(x)  # move BN running stats away from their initial values
    model.eval()
    path = tmp_path / f"{name}.safetensors"
    # what checkpoints save: unique clones, since safetensors refuses shared tensors (GPT's tied lm_head/wte)
    save_file(_weights(model), str(path))
    torch.manual_seed(1)  # a differently initialised twin
    twin = build(name)
    twin.load_state_dict(load_file(str(path)))
    twin.eval()
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    if is_tokens(name) and getattr(twin.cfg, "tie_weights", False):
        assert twin.lm_head.weight is twin.wte.weight  # loading keeps the tie


@pytest.mark.parametrize("name", MODELS)
def test_unknown_option_is_model_error(name):
    with pytest.raises(ModelError, match=f"unknown option for model {name} 'not_an_option'"):
        create_model(name, not_an_option=1)


@pytest.mark.parametrize("name", MODELS)
def test_check_input_shape(name):
    model = build(name)
    if get_entry(name).input_kind == "image":
        check_input_shape(model, (1, 28, 28))  # free H, W
        bad, want, got = (3, 32, 32), "(B, 1, H, W)", "(B, 3, 32, 32)"
    elif is_tokens(name):
        check_input_shape(model, (SEQ,))  # any length (forward enforces <= block_size)
        bad, want, got = (2, SEQ), "(B, D0)", f"(B, 2, {SEQ})"
    else:
        check_input_shape(model, (IN_FEATURES,))
        bad, want, got = (12,), f"(B, {IN_FEATURES})", "(B, 12)"
    with pytest.raises(InputShapeError) as err:
        check_input_shape(model, bad)
    assert str(err.value) == f"input error: model {name} expects input of shape {want}, got {got}"


def test_check_input_shape_rank_mismatch_and_mlp_flattening():
    cnn = create_model("small_cnn", in_chans=1)
    with pytest.raises(InputShapeError, match=r"expects input of shape \(B, 1, H, W\), got \(B, 64\)$"):
        check_input_shape(cnn, (64,))
    mlp = create_model("mlp", in_features=64)
    check_input_shape(mlp, (1, 8, 8))  # the MLP flattens 8x8 digits
    with pytest.raises(InputShapeError):
        check_input_shape(mlp, (1, 8, 9))


def test_example_input_by_name_and_sizes():
    assert example_input("mlp").shape == (2, 64)
    assert example_input("resnet18", batch=3).shape == (3, 3, 32, 32)  # ImageNet stem downsamples 32x
    assert example_input("small_cnn").shape == (2, 1, 8, 8)  # handles digits-sized inputs


def test_invalid_option_values_are_model_errors():
    with pytest.raises(ModelError, match="unknown activation 'relux'"):
        create_model("mlp", activation="relux")
    with pytest.raises(ModelError, match="unknown mlp norm 'group'"):
        create_model("mlp", norm="group")
    with pytest.raises(ModelError, match="residual=True needs a constant width"):
        create_model("mlp", depth=2, width=(64, 32), residual=True)
    with pytest.raises(ModelError, match="unknown resnet shortcut 'C'"):
        create_model("resnet20", shortcut="C")
    with pytest.raises(ModelError, match="blocks_per_stage"):
        create_model("small_cnn", blocks_per_stage=0)


@pytest.mark.parametrize("name", [n for n in MODELS if is_lm(n)])
def test_token_model_sequence_contract(name):
    model = build(name).eval()
    assert model.input_spec == (None,) and model.vocab_size == VOCAB and model.block_size == BLOCK
    x = make_input(name, model)
    with torch.no_grad():
        if name not in MASKED_LMS:  # causal: a prefix's logits ignore the rest
            torch.testing.assert_close(model(x[:, :5]), model(x)[:, :5])
    with pytest.raises(InputShapeError, match=f"model {name} handles at most block_size={BLOCK} positions"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))
    with pytest.raises(InputShapeError, match="expects token ids"):
        model(x.float())


# ----- multimodal models (input_kind "multimodal"): keyword inputs from model.example_inputs(batch) -----------
# They take several named inputs (image, text + text_mask, audio + audio_mask), so the single-tensor harness above
# does not apply; the same guarantees are checked here: forward shapes, no NaNs, a gradient on every parameter,
# a safetensors round trip, unknown options rejected. Output: a tuple of (B, B) similarity matrices (dual
# encoders) or (B, num_classes) logits (fusion classifiers).
MULTIMODAL = [n for n in list_models() if get_entry(n).input_kind == "multimodal"]


def _mm_outputs(model, inputs) -> tuple:
    out = model(**inputs)
    return out if isinstance(out, tuple) else (out,)


def test_multimodal_models_are_registered():
    assert {"clip_tiny", "clip_small", "fusion_classifier"} <= set(MULTIMODAL)
    for name in MULTIMODAL:
        assert get_entry(name).description and "\n" not in get_entry(name).description


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    inputs = model.example_inputs(3)
    outs = _mm_outputs(model, inputs)
    for out in outs:
        width = 3 if model.output_kind == "similarity" else model.num_classes
        assert out.shape == (3, width) and torch.isfinite(out).all()
    loss = sum(F.cross_entropy(o, torch.randint(0, o.shape[-1], (3,))) for o in outs)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    assert sum(p.grad.abs().sum().item() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_safetensors_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name)
    inputs = model.example_inputs(2)
    model.train()(**inputs)  # move BN running stats
    model.eval()
    path = tmp_path / f"{name}.safetensors"
    save_file(_weights(model), str(path))
    torch.manual_seed(1)
    twin = create_model(name)
    twin.load_state_dict(load_file(str(path)))
    twin.eval()
    with torch.no_grad():
        for a, b in zip(_mm_outputs(model, inputs), _mm_outputs(twin, inputs)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_unknown_option_is_model_error(name):
    with pytest.raises(ModelError, match=f"unknown option for model {name} 'not_an_option'"):
        create_model(name, not_an_option=1)
