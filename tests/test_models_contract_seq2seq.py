"""Registry-wide contract tests for encoder-decoder models (input_kind "seq2seq"): the single-tensor harness of
test_models_contract.py does not fit models that read a source and a target, so the same guarantees are
checked here for every registered seq2seq model: forward shapes, no NaNs, a gradient on every parameter,
the head contract, a safetensors round trip, unknown options rejected, cached = uncached decoding, and
greedy/beam decoding that is deterministic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lamina.engine.checkpoint import _weights
from lamina.errors import ModelError
from lamina.models import create_model, get_entry, list_models
from lamina.models.generation import seq2seq_generate

SEQ2SEQ = [n for n in list_models() if get_entry(n).input_kind == "seq2seq"]
VOCAB = 40
SMALL = dict(vocab_size=VOCAB, d_model=32, n_head=4, d_ff=64, n_enc_layer=2, n_dec_layer=2, block_size=16)


def build(name: str, **kw):
    return create_model(name, **{**SMALL, **kw})


def inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(5, VOCAB, (batch, 9), generator=g)
    src[0, 6:] = 0  # padding in one row
    return src, torch.randint(5, VOCAB, (batch, 7), generator=g)


def test_seq2seq_family_registered():
    assert {"t5_mini", "t5_small"} <= set(SEQ2SEQ)


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build(name).train()
    src, tgt = inputs()
    out = model(src, tgt)
    assert out.shape == (2, 7, VOCAB) and torch.isfinite(out).all()
    F.cross_entropy(out.reshape(-1, VOCAB), torch.randint(0, VOCAB, (14,))).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_head_contract_and_padding_is_ignored(name):
    model = build(name).eval()
    src, tgt = inputs()
    with torch.no_grad():
        feats = model.forward_features(src, tgt)
        torch.testing.assert_close(model.forward_head(feats), model(src, tgt))
        assert model.forward_head(feats, pre_logits=True).shape == (2, 7, model.num_features)
        longer = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], 1)  # more padding: same output
        torch.testing.assert_close(model(longer, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)
        model.reset_classifier(5)
        assert model(src, tgt).shape == (2, 7, 5)


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_safetensors_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = build(name).eval()
    save_file(_weights(model), str(tmp_path / "m.safetensors"))
    torch.manual_seed(1)
    twin = build(name).eval()
    twin.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    src, tgt = inputs()
    with torch.no_grad():
        assert torch.equal(model(src, tgt), twin(src, tgt))
    if twin.cfg.tie_weights:
        assert twin.lm_head.weight is twin.shared.weight


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_unknown_option_is_model_error(name):
    with pytest.raises(ModelError, match=f"unknown option for model {name} 'not_an_option'"):
        create_model(name, not_an_option=1)


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_cached_decoding_and_deterministic_generation(name):
    model = build(name, eos_id=VOCAB - 1).eval()
    src, tgt = inputs()
    with torch.no_grad():
        memory = model.encode(src)
        cache = model.make_cache(2, 16)
        step = torch.cat([model.decode(tgt[:, t:t + 1], memory, src != 0, cache=cache) for t in range(7)], 1)
        torch.testing.assert_close(step, model(src, tgt), atol=1e-5, rtol=1e-5)
    for beam in (1, 3):
        a, b = seq2seq_generate(model, src, beam_size=beam, max_len=8), seq2seq_generate(model, src, beam_size=beam, max_len=8)
        assert torch.equal(a, b) and a.shape[0] == 2 and a.shape[1] <= 8
