"""Transformer building blocks: SDPA vs explicit-softmax parity (forward and backward), positional encodings,
norms and feed-forward blocks by hand, the KV cache against full recomputation, and generation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import InputShapeError, ModelError
from lamina.models import create_model, generate
from lamina.models.generation import filter_logits
from lamina.nn import (
    FeedForward,
    KVCache,
    MultiHeadAttention,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    SwiGLU,
    make_norm,
    reference_attention,
    repeat_kv,
)
from lamina.nn.positional import LearnedPositionalEmbedding

ATOL = 1e-5
B, NH, T, HS = 2, 4, 6, 8


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def right_padding(B: int, S: int, lengths=(None, 3)) -> torch.Tensor:
    """(B, S) bool, True = keep: sequence b keeps its first lengths[b] keys (None = all)."""
    keep = torch.ones(B, S, dtype=torch.bool)
    for b, n in enumerate(lengths[:B]):
        if n is not None:
            keep[b, n:] = False
    return keep


# --- functional: SDPA vs reference_attention --------------------------------------------------------------

# (name, S, n_kv, mask kind, causal); S != T is cross-attention
FUNCTIONAL_CASES = [
    ("none", T, NH, None, False),
    ("causal", T, NH, None, True),
    ("padding", T, NH, "right", False),
    ("causal_padding", T, NH, "right", True),
    ("causal_left_padding_fully_masked_rows", T, NH, "left", True),
    ("cross", 9, NH, None, False),
    ("cross_padding", 9, NH, "right", False),
    ("gqa", T, 2, None, False),
    ("gqa_causal_padding", T, 1, "right", True),
]


@pytest.mark.parametrize("name, S, n_kv, mask_kind, causal", FUNCTIONAL_CASES, ids=[c[0] for c in FUNCTIONAL_CASES])
def test_sdpa_matches_reference_forward_and_backward(name, S, n_kv, mask_kind, causal):
    torch.manual_seed(0)
    q = torch.randn(B, NH, T, HS, requires_grad=True)
    k = torch.randn(B, n_kv, S, HS, requires_grad=True)
    v = torch.randn(B, n_kv, S, HS, requires_grad=True)
    mask = None
    if mask_kind == "right":
        mask = right_padding(B, S)[:, None, None, :]  # (B, 1, 1, S)
    elif mask_kind == "left":  # first two keys of sequence 1 are padding: its first two causal rows see nothing
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[1, :2] = False
        mask = keep[:, None, None, :]
    if causal and mask is not None:
        mask = mask & torch.ones(T, S, dtype=torch.bool).tril()

    ref = reference_attention(q, k, v, mask=mask, causal=causal and mask is None)
    gqa = {"enable_gqa": True} if n_kv != NH else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, **gqa)
    close(out, ref)
    assert torch.isfinite(out).all()
    if mask_kind == "left":
        assert torch.equal(ref[1, :, :2], torch.zeros_like(ref[1, :, :2]))  # fully masked rows -> 0, not NaN

    g = torch.randn_like(out)
    grads_sdpa = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b, n in zip(grads_sdpa, grads_ref, "qkv"):
        assert torch.isfinite(b).all(), n
        close(a, b)


def test_reference_attention_hand_computed():
    # one query, two keys: scores (q.k / sqrt(2)) = (0, 1/sqrt(2)) -> weights softmax -> mix of v
    q = torch.tensor([[[[1.0, 1.0]]]])  # (1, 1, 1, 2)
    k = torch.tensor([[[[1.0, -1.0], [1.0, 0.0]]]])  # (1, 1, 2, 2)
    v = torch.tensor([[[[10.0, 0.0], [0.0, 10.0]]]])
    s = 1 / math.sqrt(2)
    w1 = math.exp(s) / (1 + math.exp(s))
    close(reference_attention(q, k, v), torch.tensor([[[[10 * (1 - w1), 10 * w1]]]]))
    # masking the second key leaves only the first
    close(reference_attention(q, k, v, mask=torch.tensor([True, False])), torch.tensor([[[[10.0, 0.0]]]]))


def test_repeat_kv_groups_heads_in_order():
    k = torch.arange(2.0).view(1, 2, 1, 1)  # two kv heads: 0, 1
    assert repeat_kv(k, 3).flatten().tolist() == [0, 0, 0, 1, 1, 1]  # query heads 0-2 share kv head 0


# --- module: MultiHeadAttention SDPA path vs its explicit (need_weights) path ------------------------------

MODULE_CASES = [  # name, n_kv_head, causal, padding, cross, rope
    ("none", None, False, False, False, False),
    ("causal", None, True, False, False, False),
    ("padding", None, False, True, False, False),
    ("causal_padding", None, True, True, False, False),
    ("cross", None, False, False, True, False),
    ("cross_padding", None, False, True, True, False),
    ("gqa", 2, False, False, False, False),
    ("gqa_causal_rope", 1, True, False, False, True),
    ("gqa_causal_padding_rope", 2, True, True, False, True),
]


@pytest.mark.parametrize("name, n_kv, causal, padding, cross, rope", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_mha_sdpa_path_matches_explicit_path(name, n_kv, causal, padding, cross, rope):
    torch.manual_seed(0)
    C, S, kv_dim = 32, (9 if cross else T), (24 if cross else None)
    mha = MultiHeadAttention(C, NH, n_kv_head=n_kv, causal=causal, kv_dim=kv_dim,
                             rope=RotaryEmbedding(C // NH, 16) if rope else None)
    x = torch.randn(B, T, C, requires_grad=True)
    kv = torch.randn(B, S, kv_dim, requires_grad=True) if cross else None
    kpm = right_padding(B, S) if padding else None

    y = mha(x, kv=kv, key_padding_mask=kpm)
    y_ref, att = mha(x, kv=kv, key_padding_mask=kpm, need_weights=True)
    close(y, y_ref)
    assert att.shape == (B, NH, T, S)
    close(att.sum(-1), torch.ones(B, NH, T))
    if causal:
        assert (att.triu(1) == 0).all()
    if padding:
        assert (att[1, ..., 3:] == 0).all()  # sequence 1 keeps 3 keys

    named = [("x", x)] + ([("kv", kv)] if cross else []) + list(mha.named_parameters())
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for _, t in named], g)
    grads_ref = torch.autograd.grad(y_ref, [t for _, t in named], g)
    for (tname, _), a, b in zip(named, grads, grads_ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, n=tname: f"grad of {n}: {m}")


def test_padded_keys_do_not_influence_the_output():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, causal=True).eval()
    x = torch.randn(1, 5, 16)
    kpm = torch.tensor([[True, True, True, False, False]])
    x2 = x.clone()
    x2[:, 3:] = torch.randn(1, 2, 16)  # change only the padded positions
    close(mha(x, key_padding_mask=kpm)[:, :3], mha(x2, key_padding_mask=kpm)[:, :3])


def test_mha_validates_its_arguments():
    with pytest.raises(ModelError, match="divisible by n_head"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ModelError, match="multiple of n_kv_head"):
        MultiHeadAttention(32, 4, n_kv_head=3)
    mha = MultiHeadAttention(16, 2)
    with pytest.raises(InputShapeError, match=r"key_padding_mask must be a bool tensor of shape \(B, S\)"):
        mha(torch.randn(2, 4, 16), key_padding_mask=torch.ones(2, 4))
    with pytest.raises(ModelError, match="self-attention only"):
        mha(torch.randn(2, 4, 16), kv=torch.randn(2, 3, 16), cache=mha.make_cache(2, 8))


def test_kv_cache_incremental_attention_equals_full():
    torch.manual_seed(0)
    C = 32
    mha = MultiHeadAttention(C, NH, n_kv_head=2, causal=True, rope=RotaryEmbedding(C // NH, 32)).eval()
    x = torch.randn(B, 10, C)
    full = mha(x)
    cache = mha.make_cache(B, 16)
    parts = [mha(x[:, :4], cache=cache)]  # prefill 4, then a chunk of 3 (mask with offset), then 1 by 1
    parts.append(mha(x[:, 4:7], cache=cache))
    parts += [mha(x[:, t:t + 1], cache=cache) for t in range(7, 10)]
    assert cache.length == 10
    close(torch.cat(parts, dim=1), full)
    with pytest.raises(InputShapeError, match="kv cache full"):
        mha(torch.randn(B, 7, C), cache=cache)
    cache.reset()
    assert cache.length == 0 and isinstance(cache, KVCache)


# --- positional encodings ---------------------------------------------------------------------------------

def test_rope_hand_computed():
    rope = RotaryEmbedding(head_dim=4, max_len=8, base=100.0)  # inverse frequencies 1 and 100^(-1/2) = 0.1
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    q, _ = rope(x, x, offset=3)  # position 3: angles 3 (channels 0, 2) and 0.3 (channels 1, 3)
    c, s, c2, s2 = math.cos(3), math.sin(3), math.cos(0.3), math.sin(0.3)
    want = [1 * c - 3 * s, 2 * c2 - 4 * s2, 3 * c + 1 * s, 4 * c2 + 2 * s2]
    close(q.flatten(), torch.tensor(want))
    q0, _ = rope(x, x, offset=0)
    close(q0, x)  # position 0 is the identity


def test_rope_preserves_norms_and_depends_on_relative_position_only():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, max_len=64)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    rq, rk = rope(q, k, offset=7)
    close(rq.norm(dim=-1), q.norm(dim=-1))
    close(rk.norm(dim=-1), k.norm(dim=-1))

    qv, kv = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:  # q at position m, k at position n
        return (rope(qv, qv, m)[0] * rope(kv, kv, n)[1]).sum()

    for m, n in [(3, 1), (10, 4), (0, 6)]:
        close(score(m, n), score(m + 20, n + 20), atol=1e-4)
    assert not torch.allclose(score(3, 1), score(3, 2))  # ...and it does depend on the offset
    assert torch.equal(rope.rotate(q, k, 7)[0], rq)  # `rotate` is an alias of forward
    with pytest.raises(InputShapeError, match="exceed max_len=64"):
        rope(q, k, offset=60)
    with pytest.raises(ModelError, match="head_dim must be even"):
        RotaryEmbedding(7, 8)


def test_rope_buffers_are_not_saved_and_model_apply_still_works():
    mha = MultiHeadAttention(16, 2, rope=RotaryEmbedding(8, 8))
    assert not any("cos" in k or "sin" in k for k in mha.state_dict())
    mha.apply(lambda m: None)  # nn.Module.apply is torch's, untouched by RoPE


def test_sinusoidal_hand_computed():
    pe = SinusoidalPositionalEncoding(max_len=10, dim=4)
    x = torch.zeros(1, 3, 4)
    out = pe(x)  # zeros + PE[0:3]
    close(out[0, 0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    # dim 4: frequencies 1 and 10000^(-2/4) = 0.01
    close(out[0, 1], torch.tensor([math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)]))
    close(out[0, 2], torch.tensor([math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)]))
    close(pe(x[:, :1], offset=2)[0, 0], out[0, 2])
    assert "pe" not in pe.state_dict()  # non-persistent: recomputed, never saved
    odd = SinusoidalPositionalEncoding(max_len=4, dim=5)  # odd width: 3 sines, 2 cosines
    close(odd.pe[1, 4], torch.tensor(math.sin(10000 ** (-4 / 5))))
    with pytest.raises(InputShapeError, match="exceed max_len=10"):
        pe(torch.zeros(1, 11, 4))


def test_learned_positional_embedding_adds_rows_by_offset():
    lpe = LearnedPositionalEmbedding(8, 3)
    x = torch.zeros(2, 2, 3)
    close(lpe(x, offset=5), lpe.weight[5:7].expand(2, 2, 3))
    assert list(dict(lpe.named_parameters())) == ["weight"]


# --- norms and feed-forward -------------------------------------------------------------------------------

def test_rmsnorm_hand_computed():
    norm = RMSNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 1.0, 0.5]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-5)  # sqrt(mean(x^2) + eps)
    close(norm(x), torch.tensor([[1 / rms, 4 / rms, 3 / rms, 2 / rms]]))
    assert isinstance(make_norm("rms", 4), RMSNorm)
    ln = make_norm("layer", 4, bias=False)
    assert isinstance(ln, nn.LayerNorm) and ln.bias is None
    with pytest.raises(ModelError, match="unknown norm 'batch'"):
        make_norm("batch", 4)


def test_swiglu_hand_computed():
    ff = SwiGLU(dim=2, hidden=1)
    with torch.no_grad():
        ff.gate_proj.weight.copy_(torch.tensor([[1.0, 0.0]]))  # gate = x0
        ff.up_proj.weight.copy_(torch.tensor([[0.0, 1.0]]))  # up = x1
        ff.out_proj.weight.copy_(torch.tensor([[1.0], [2.0]]))
    x = torch.tensor([[2.0, 3.0]])
    h = 2 / (1 + math.exp(-2)) * 3  # silu(2) * 3
    close(ff(x), torch.tensor([[h, 2 * h]]))


def test_feedforward_matches_formula():
    torch.manual_seed(0)
    ff = FeedForward(8, 32, activation="gelu")
    x = torch.randn(2, 3, 8)
    want = F.linear(F.gelu(F.linear(x, ff.fc.weight, ff.fc.bias)), ff.out_proj.weight, ff.out_proj.bias)
    close(ff(x), want)


# --- GPT: KV cache and input errors -----------------------------------------------------------------------

def tiny_gpt(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return create_model("gpt", **{**cfg, **kw}).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_cached_decoding_equals_full_recomputation(bias):
    model = tiny_gpt(bias=bias)
    torch.manual_seed(1)
    seq = torch.randint(0, 50, (2, 14))
    cache = model.make_cache(2)
    with torch.no_grad():
        step_logits = [model(seq[:, :4], cache=cache)[:, -1]]  # prompt of 4
        for t in range(4, 14):  # 10 single-token steps
            step_logits.append(model(seq[:, t:t + 1], cache=cache)[:, -1])
        for i, logits in enumerate(step_logits):
            full = model(seq[:, : 4 + i])[:, -1]  # recompute the whole prefix
            close(logits, full)
    assert cache[0].length == 14


def test_gpt_input_errors():
    model = tiny_gpt()
    with pytest.raises(InputShapeError, match=r"^input error: model gpt handles at most block_size=16 positions, "
                                              r"got T=17; crop"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(InputShapeError, match=r"expects token ids of shape \(B, T\) and dtype int64, got float32"):
        model(torch.zeros(1, 4))
    cache = model.make_cache(1)
    model(torch.zeros(1, 14, dtype=torch.long), cache=cache)
    with pytest.raises(InputShapeError, match="got T=3 after 14 cached positions"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# --- generation -------------------------------------------------------------------------------------------

class NextCounter(nn.Module):
    """A decoder-contract stub with no cache API: the next token is always (last + 1) % V."""

    block_size = 4

    def __init__(self, vocab: int = 10):
        super().__init__()
        self.vocab = vocab
        self.seen_lengths: list[int] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.seen_lengths.append(idx.shape[1])
        return 10.0 * F.one_hot((idx + 1) % self.vocab, self.vocab).float()  # (B, T, V)


def test_generate_any_decoder_crops_context_and_stops_per_sequence():
    model = NextCounter()
    seen = []
    out = generate(model, torch.tensor([[0], [5]]), 10, greedy=True, stop_tokens=(3,), on_token=seen.append)
    # row 0 hits 3 at step 3, then repeats it; row 1 hits 3 at step 8 (6 7 8 9 0 1 2 3): decoding ends there
    assert out.tolist() == [[0, 1, 2, 3, 3, 3, 3, 3, 3], [5, 6, 7, 8, 9, 0, 1, 2, 3]]
    assert len(seen) == 8 and seen[0].tolist() == [1, 6]
    assert max(model.seen_lengths) == NextCounter.block_size  # context cropped to block_size
    assert generate(model, torch.tensor([[0]]), 5, greedy=True, stop_tokens=(1,)).tolist() == [[0, 1]]


def test_generate_greedy_is_deterministic_and_cache_agrees():
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(0))
    a = generate(model, prompt, 20, greedy=True)  # 23 > block_size 16: also exercises the cache fallback
    b = generate(model, prompt, 20, greedy=True)
    c = generate(model, prompt, 20, greedy=True, use_cache=False)
    assert a.shape == (2, 23) and torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a[:, :3], prompt)
    assert torch.equal(generate(model, prompt, 20, top_k=1), a)  # top_k=1 sampling is greedy


def test_generate_seeded_sampling_is_reproducible():
    model = tiny_gpt().train()
    prompt = torch.zeros(3, 1, dtype=torch.long)

    def sample(seed, **kw):
        return generate(model, prompt, 12, temperature=1.5, top_k=20, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed), **kw)

    s1 = sample(123)
    assert torch.equal(s1, sample(123))
    assert torch.equal(s1, sample(123, use_cache=False))
    assert not torch.equal(s1, sample(124))
    assert model.training  # mode restored


def test_filter_logits_hand_computed():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()  # probabilities 0.5, 0.3, 0.2
    keep = lambda f: torch.isfinite(f).tolist()[0]  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False]
    assert keep(filter_logits(logits, top_p=0.6)) == [True, True, False]
    assert keep(filter_logits(logits, top_p=0.5)) == [True, False, False]
    assert keep(filter_logits(logits, top_p=0.1)) == [True, False, False]  # the top token always stays
    assert keep(filter_logits(logits, top_p=1.0, top_k=10)) == [True, True, True]


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
])
def test_generate_rejects_bad_arguments(kw, msg):
    with pytest.raises(ModelError, match=msg):
        generate(NextCounter(), torch.tensor([[0]]), 3, **kw)


def test_generate_greedy_ignores_temperature_and_rejects_float_prompts():
    assert generate(NextCounter(), torch.tensor([[0]]), 2, greedy=True, temperature=0).tolist() == [[0, 1, 2]]
    with pytest.raises(InputShapeError, match="token ids of shape"):
        generate(NextCounter(), torch.zeros(1, 2), 2)
