"""Recurrent family: parity with hand-built torch modules, packing vs one-at-a-time, cached decoding, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lamina.errors import InputShapeError, ModelError
from lamina.models import create_model, generate
from lamina.models.rnn import RNNCache

from conftest import REPEATED_CHARS, greedy_text, overfit_repeated_text

V = 23  # vocabulary of the small test models


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny recurrent models run thousands of small per-step ops: a second thread only adds OpenMP sync,
    # which stalls badly when the cores are shared. conftest restores the thread count afterwards.
    torch.set_num_threads(1)


def small(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    base = dict(vocab_size=V, embed_dim=12, hidden_size=16, num_layers=2)
    return create_model(name, **{**base, **kw}).eval()


def test_registered_defaults_and_param_count():
    m = create_model("char_lstm")
    assert (m.cfg.cell, m.cfg.num_layers, m.cfg.hidden_size, m.cfg.embed_dim) == ("lstm", 2, 256, 64)
    # wte 65*64 + layer 0: 4*256*(64+256) + 2*4*256 + layer 1: 4*256*(256+256) + 2*4*256 + head 256*65 + 65
    assert sum(p.numel() for p in m.parameters()) == 65 * 64 + 329_728 + 526_336 + 256 * 65 + 65
    assert isinstance(create_model("char_gru").rnn, nn.GRU) and isinstance(create_model("char_rnn").rnn, nn.RNN)
    assert create_model("lstm_classifier").cfg.bidirectional and create_model("lstm_tagger").num_features == 256


@pytest.mark.parametrize("cell,module", [("lstm", nn.LSTM), ("gru", nn.GRU), ("rnn", nn.RNN)])
def test_lm_matches_hand_built_embedding_rnn_linear(cell, module):
    model = small(f"char_{cell}", cell=cell)
    emb, rnn, head = nn.Embedding(V, 12), module(12, 16, num_layers=2, batch_first=True), nn.Linear(16, V)
    emb.load_state_dict({"weight": model.wte.weight})
    rnn.load_state_dict(model.rnn.state_dict())
    head.load_state_dict(model.lm_head.state_dict())
    idx = torch.randint(0, V, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), head(rnn(emb(idx))[0]), atol=1e-6, rtol=0)


def test_lstm_forget_gate_bias_starts_at_one():
    model = small("char_lstm")
    H = 16
    for layer in range(2):
        b = getattr(model.rnn, f"bias_ih_l{layer}") + getattr(model.rnn, f"bias_hh_l{layer}")  # gates i, f, g, o
        assert torch.equal(getattr(model.rnn, f"bias_ih_l{layer}")[H:2 * H], torch.ones(H))
        assert torch.equal(getattr(model.rnn, f"bias_hh_l{layer}")[H:2 * H], torch.zeros(H))
        assert b[:H].abs().max() < 2 / H ** 0.5  # the other gates keep PyTorch's uniform(-1/sqrt(H), 1/sqrt(H))


def test_tied_head_shares_the_embedding():
    model = small("char_lstm", embed_dim=16, tie_weights=True)
    assert model.lm_head.weight is model.wte.weight
    twin = create_model("char_lstm", vocab_size=V, embed_dim=16, hidden_size=16, num_layers=2, tie_weights=True)
    twin.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert twin.lm_head.weight is twin.wte.weight and torch.equal(twin.wte.weight, model.wte.weight)
    model.reset_classifier(5)
    assert model.lm_head.weight is not model.wte.weight
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 5)


def test_bad_configs_are_one_line_model_errors():
    with pytest.raises(ModelError, match="bidirectional=True would let each position see"):
        create_model("char_lstm", bidirectional=True)
    with pytest.raises(ModelError, match=r"rnn: unknown cell 'transformer'; valid: rnn, lstm, gru"):
        create_model("char_lstm", cell="transformer")
    with pytest.raises(ModelError, match="rnn: hidden_size must be a positive integer, got 0"):
        create_model("char_gru", hidden_size=0)
    with pytest.raises(ModelError, match=r"rnn: dropout must be in \[0, 1\), got 1.0"):
        create_model("char_rnn", dropout=1.0)
    with pytest.raises(ModelError, match="tie_weights needs embed_dim == hidden_size, got 64 and 256"):
        create_model("char_lstm", tie_weights=True)
    with pytest.raises(ModelError, match="rnn: unknown pooling 'max'; valid: last, mean"):
        create_model("lstm_classifier", pooling="max")
    with pytest.raises(ModelError, match="tie_weights applies to language models only"):
        create_model("lstm_tagger", tie_weights=True)
    with pytest.raises(ModelError, match="unknown option for model char_lstm 'pooling'"):
        create_model("char_lstm", pooling="mean")


def test_cached_decoding_equals_full_recomputation_and_streams_past_block_size():
    model = small("char_lstm", block_size=8)
    idx = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        cache = model.make_cache(2)
        steps = [model(idx[:, :5], cache=cache)]  # a prompt, then one token at a time, past block_size=8
        steps += [model(idx[:, t:t + 1], cache=cache) for t in range(5, 14)]
        long = small("char_lstm", block_size=16)  # same weights (same seed), a window that fits 14 tokens
        torch.testing.assert_close(torch.cat(steps, dim=1), long(idx), atol=1e-6, rtol=0)
    assert isinstance(cache, RNNCache) and cache.length == 14 and cache.state[0].shape == (2, 2, 16)
    with pytest.raises(InputShapeError, match="handles at most block_size=8 positions, got T=14"):
        model(idx)  # uncached input is held to the training window
    with pytest.raises(ModelError, match="cache was made for batch size 2, got a batch of 3"):
        model(torch.zeros(3, 1, dtype=torch.long), cache=cache)


def test_cache_detach_cuts_the_graph():
    model = small("char_gru").train()
    cache = model.make_cache(1)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    assert cache.state.requires_grad and not cache.detach_().state.requires_grad


def test_greedy_generation_is_deterministic_and_cache_free_equivalent():
    model = small("char_lstm", block_size=6)
    prompt = torch.randint(0, V, (2, 3))
    a = generate(model, prompt, 12, greedy=True)  # beyond block_size: the cache gives way to a cropped window
    assert a.shape == (2, 15) and torch.equal(a[:, :3], prompt)
    assert torch.equal(a, generate(model, prompt, 12, greedy=True))
    assert torch.equal(a, generate(model, prompt, 12, greedy=True, use_cache=False))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(generate(model, prompt, 8, top_k=5, generator=g1), generate(model, prompt, 8, top_k=5,
                                                                                  generator=g2))


def padded_batch(lengths: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(1, V, (len(lengths), T), generator=g)
    for i, n in enumerate(lengths):
        idx[i, n:] = 0  # padding: any id; packing keeps it out of the recurrence
    return idx, torch.tensor(lengths)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_packed_batch_equals_each_sequence_alone(cell, bidirectional, pooling):
    model = small("lstm_classifier", cell=cell, bidirectional=bidirectional, pooling=pooling, num_classes=4)
    lengths = [5, 9, 2, 7]  # unsorted, shortest != first: enforce_sorted=False must restore the order
    idx, lens = padded_batch(lengths, 9)
    with torch.no_grad():
        batched = model(idx, lengths=lens)
        alone = torch.cat([model(idx[i:i + 1, :n]) for i, n in enumerate(lengths)])
        assert batched.shape == (4, 4)
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
        assert not torch.allclose(model(idx), batched, atol=1e-3)  # without lengths the padding is read


def test_classifier_last_pooling_is_the_final_forward_and_first_backward_output():
    model = small("lstm_classifier", num_layers=1)
    idx, lens = padded_batch([4, 6], 6)
    with torch.no_grad():
        feats = model.forward_features(idx, lens)  # (B, 2H)
        for i, n in enumerate([4, 6]):
            out, _ = model.rnn(model.wte(idx[i:i + 1, :n]))  # (1, n, 2H): [forward | backward]
            torch.testing.assert_close(feats[i], torch.cat([out[0, n - 1, :16], out[0, 0, 16:]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_tagger_shapes_and_packed_parity(cell):
    model = small("lstm_tagger", cell=cell, num_classes=5)
    lengths = [3, 8, 6]
    idx, lens = padded_batch(lengths, 8)
    with torch.no_grad():
        out = model(idx, lengths=lens)
        assert out.shape == (3, 8, 5) and model.forward_features(idx, lens).shape == (3, 8, 32)
        for i, n in enumerate(lengths):
            torch.testing.assert_close(out[i, :n], model(idx[i:i + 1, :n])[0], atol=1e-5, rtol=0)
        assert model.forward_features(idx, lens)[0, 3:].abs().max() == 0  # zero past each length


def test_lengths_are_checked():
    model = small("lstm_classifier")
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(InputShapeError, match=r"lengths must be in \[1, T=5\], got values in \[0, 5\]"):
        model(idx, lengths=torch.tensor([0, 5]))
    with pytest.raises(InputShapeError, match=r"expects lengths as integers of shape \(2,\)"):
        model(idx, lengths=torch.tensor([2.0, 5.0]))
    with pytest.raises(InputShapeError, match="expects token ids"):
        model(idx.float())


def test_tiny_char_lstm_overfits_a_repeated_string():
    torch.manual_seed(0)
    model = create_model("char_lstm", vocab_size=len(REPEATED_CHARS), block_size=32, embed_dim=16, hidden_size=64,
                         num_layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert overfit_repeated_text(model, opt, steps=120, window=32) < 0.1
    assert greedy_text(model, "hello ", 40) == ("hello lamina! " * 4)[:46]  # 46 tokens: past block_size=32
