"""T5 encoder-decoder: parity with transformers' T5, cached decoding, greedy and beam search, a copy task."""

from __future__ import annotations

import math

import pytest
import torch

from lamina.errors import InputShapeError, ModelError
from lamina.models import create_model
from lamina.models.generation import length_penalty, seq2seq_generate
from lamina.models.t5 import T5, T5Config, hf_t5_key_map
from lamina.nn.positional import relative_position_bucket

SMALL = dict(vocab_size=100, d_model=32, n_head=4, d_ff=64, n_enc_layer=2, n_dec_layer=3, rel_buckets=8,
             rel_max_distance=20, dropout=0.0)


def small(**kw) -> T5:
    torch.manual_seed(0)
    return create_model("t5_mini", **{**SMALL, **kw}).eval()


@pytest.mark.parametrize("ffn,tie", [("gated-gelu", True), ("gated-gelu", False), ("relu", False)])
def test_logits_match_transformers_t5(ffn, tie):
    transformers = pytest.importorskip("transformers", reason="parity reference needs transformers")
    torch.manual_seed(0)
    hc = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                               dropout_rate=0.0, feed_forward_proj=ffn, tie_word_embeddings=tie,
                               layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0)
    hf = transformers.T5ForConditionalGeneration(hc).eval()
    model = small(ffn=ffn, tie_weights=tie)
    key_map = hf_t5_key_map(model.cfg)
    hf_sd = hf.state_dict()
    mapped = {key_map[k]: v for k, v in hf_sd.items() if k in key_map}
    # every lamina tensor is covered, with the right shape (tied lm_head comes with `shared`)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tie else set())
    assert set(mapped) == expected
    model.load_state_dict(mapped, strict=not tie)
    src = torch.randint(5, 100, (3, 30))
    src[1, 20:] = 0  # a padded source: the mask must hide it in both models
    tgt = torch.randint(5, 100, (3, 25))
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=tgt).logits
        out = model(src, tgt, src != 0)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item() / 10)  # fp32, |logits| ~ 30


def test_relative_position_bucket_hand_values():
    rel = torch.tensor([-40, -9, -5, -3, -1, 0, 1, 3, 5, 9, 40])
    # bidirectional, 8 buckets, max distance 20: 4 per sign, 2 exact (0, 1), then log-spaced up to 20
    bi = relative_position_bucket(rel, True, 8, 20).tolist()
    assert bi == [3, 3, 2, 2, 1, 0, 5, 6, 6, 7, 7]
    # causal: only the past counts; 4 exact offsets 0..3, then log buckets; future -> 0
    uni = relative_position_bucket(rel, False, 8, 20).tolist()
    assert uni[5:] == [0] * 6 and uni[:5] == [7, 6, 4, 3, 1]
    for d in (4, 8, 19):  # the formula of the paper, bucket = 4 + floor(log(d/4) / log(20/4) * 4)
        want = 4 + int(math.log(d / 4) / math.log(20 / 4) * 4)
        assert relative_position_bucket(torch.tensor([-d]), False, 8, 20).item() == min(want, 7)


def test_param_counts():
    with torch.device("meta"):
        t5_small = create_model("t5_small")
    assert sum(p.numel() for p in t5_small.parameters()) == 60_506_624  # HF google-t5/t5-small
    mini = create_model("t5_mini")
    assert sum(p.numel() for p in mini.parameters()) == 9_130_496
    C, ff, L = 256, 1024, 3
    enc_block = 4 * C * C + 3 * C * ff + 2 * C
    dec_block = 8 * C * C + 3 * C * ff + 3 * C
    assert 9_130_496 == 8000 * C + L * (enc_block + dec_block) + 2 * (32 * 4 + C)


def test_cached_decoding_equals_full_recompute():
    model = small()
    src = torch.randint(5, 100, (2, 9))
    tgt = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        full = model(src, tgt)
        memory = model.encode(src)
        cache = model.make_cache(2, 16)
        steps = [model.decode(tgt[:, :3], memory, src != 0, cache=cache)]
        steps += [model.decode(tgt[:, t:t + 1], memory, src != 0, cache=cache) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def _manual_greedy(model, src, n):
    tgt = torch.full((src.shape[0], 1), model.bos_id)
    with torch.no_grad():
        for _ in range(n):
            nxt = model(src, tgt)[:, -1].argmax(-1, keepdim=True)
            tgt = torch.cat([tgt, nxt], 1)
    return tgt[:, 1:]


def test_greedy_equals_argmax_loop_and_is_deterministic():
    model = small(eos_id=99)  # an id the random model rarely emits: decode the full length
    src = torch.randint(5, 99, (3, 8))
    a = seq2seq_generate(model, src, beam_size=1, max_len=6)
    b = seq2seq_generate(model, src, beam_size=1, max_len=6)
    assert torch.equal(a, b)
    ref = _manual_greedy(model, src, 6)
    for row, want in zip(a, ref):  # up to and including a </s>, the rest is padding
        n = int((want == 99).nonzero()[0]) + 1 if (want == 99).any() else 6
        assert torch.equal(row[:n], want[:n])


def _seq_logprob(model, src, hyp):
    tgt = torch.cat([torch.full((1, 1), model.bos_id), hyp[None]], 1)
    with torch.no_grad():
        logp = model(src[None], tgt[:, :-1]).log_softmax(-1)[0]
    return logp.gather(1, hyp[:, None]).sum().item()


def test_beam_search_scores_at_least_greedy():
    model = small(eos_id=3)
    torch.manual_seed(1)
    src = torch.randint(5, 100, (4, 6))
    greedy = seq2seq_generate(model, src, beam_size=1, max_len=5)
    beam = seq2seq_generate(model, src, beam_size=5, max_len=5, alpha=0.0)
    for i in range(4):
        def clean(h):
            h = h[h != 0]
            return h
        g, b = clean(greedy[i]), clean(beam[i])
        # beam search returns finished (</s>) hypotheses when it finds one; compare like with like
        if (g == 3).any() and (b == 3).any():
            assert _seq_logprob(model, src[i], b) >= _seq_logprob(model, src[i], g) - 1e-4


def test_length_penalty_values():
    assert length_penalty(1, 0.0) == 1.0
    assert length_penalty(7, 0.6) == pytest.approx((12 / 6) ** 0.6)


def test_tiny_model_memorizes_pairs_and_beam_search_decodes_them():
    torch.manual_seed(0)
    # 16 buckets over 16 positions: every decoder offset gets its own bucket, so "9 9 </s>" can be told from
    # "9 </s>" (with 8 buckets offsets 4 and 5 share one and a 1-layer decoder cannot count)
    model = create_model("t5_mini", vocab_size=24, d_model=32, n_head=2, d_ff=64, n_enc_layer=1, n_dec_layer=1,
                         rel_buckets=16, rel_max_distance=16, dropout=0.0, block_size=12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    src = torch.cat([torch.randint(5, 24, (8, 4), generator=g), torch.full((8, 1), 3)], 1)  # ... </s>
    body = torch.randint(5, 24, (8, 5), generator=g)
    tgt = torch.cat([torch.full((8, 1), 2), body, torch.full((8, 1), 3)], 1)  # <s> y </s>
    for _ in range(200):
        logits = model(src, tgt[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 24), tgt[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02
    for beam in (1, 3):
        out = seq2seq_generate(model, src, beam_size=beam, max_len=8)
        assert torch.equal(out[:, :5], body) and (out[:, 5] == 3).all()


def test_errors_are_one_line():
    with pytest.raises(ModelError, match="d_model \\(30\\) must be divisible by n_head \\(4\\)"):
        create_model("t5_mini", d_model=30)
    with pytest.raises(ModelError, match="unknown ffn 'swish'"):
        create_model("t5_mini", ffn="swish")
    with pytest.raises(ModelError, match="eos_id must be a token id below vocab_size=10"):
        T5(T5Config(vocab_size=10, eos_id=12))
    model = small()
    with pytest.raises(InputShapeError, match="expects source token ids of shape \\(B, L\\)"):
        model(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ModelError, match="beam_size must be >= 1"):
        seq2seq_generate(model, torch.ones(1, 3, dtype=torch.long), beam_size=0)


def test_scaled_attention_is_a_reparameterization_of_t5():
    """scaled_attention=True computes softmax(q k / sqrt(d_kv)); with q weights multiplied by sqrt(d_kv) it is the
    very same function as T5's unscaled scores (only what Adam sees changes)."""
    a = small()
    b = small(scaled_attention=True)
    sd = a.state_dict()
    hs = a.cfg.d_model // a.cfg.n_head
    b.load_state_dict({k: v * hs ** 0.5 if k.endswith("q_proj.weight") else v for k, v in sd.items()})
    src, tgt = torch.randint(5, 100, (2, 9)), torch.randint(5, 100, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(b(src, tgt), a(src, tgt), atol=1e-5, rtol=1e-5)
    q_std = b.encoder.blocks[0].self_attn.q_proj.weight.std().item()
    assert abs(q_std - a.cfg.d_model ** -0.5) < 0.03  # init: C^-0.5 instead of (C * d_kv)^-0.5
