"""Blockwise (flash-style) attention: parity with SDPA forward and backward (causal, padding, GQA, odd block
sizes) for both implementations (impl="fused": PyTorch's flash kernel per tile; "reference": pure PyTorch), fp64
gradcheck, fully masked rows, the ring-attention primitives (chunked forward + merge, summed chunk backwards,
arbitrary causal offsets), bf16, that the fused kernel really runs, linear memory, the SDPA drop-in inside
MultiHeadAttention, and input errors."""

from __future__ import annotations

import importlib
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import lamina.nn.attention as attention_module
from lamina.errors import InputShapeError
from lamina.nn import (
    BlockwiseAttention,
    MultiHeadAttention,
    attention_chunk_backward,
    attention_chunk_forward,
    blockwise_attention,
    causal_mask,
    merge_attention,
    reference_attention,
)

# the module, not the function lamina.nn re-exports under the same name (tests patch its kernels)
bwa = importlib.import_module("lamina.nn.blockwise_attention")
ATOL = 1e-5


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def make_qkv(B, H, Hkv, T, S, D, dtype=torch.float32, seed=0, Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, Hkv, S, Dv or D, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def sdpa_mask(T, S, causal, kpm):
    """The same masking as bool attn_mask for SDPA: (B | 1, 1, T, S) or None."""
    mask = causal_mask(T, S)[None, None] if causal else None
    if kpm is not None:
        mask = kpm[:, None, None, :] if mask is None else mask & kpm[:, None, None, :]
    return mask


def padding(B, S, kind):
    if kind is None:
        return None
    keep = torch.ones(B, S, dtype=torch.bool)
    if kind == "right":  # sequence 1 keeps its first 2/3 keys
        keep[1, 2 * S // 3:] = False
    elif kind == "random":
        keep = torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[:, 0] = True
    return keep


# name, B, H, Hkv, T, S, D, causal, padding, block_size, q_block_size, scale
CASES = [
    ("noncausal", 2, 3, 3, 40, 40, 16, False, None, 16, None, None),
    ("causal_square", 2, 3, 3, 40, 40, 16, True, None, 16, 8, None),
    ("causal_bottom_right_T_lt_S", 2, 2, 2, 24, 53, 16, True, None, 16, 8, None),
    ("padding", 2, 2, 2, 30, 45, 16, False, "random", 16, None, None),
    ("causal_padding", 2, 2, 2, 33, 33, 8, True, "right", 8, 16, None),
    ("gqa", 2, 4, 2, 29, 35, 16, False, None, 16, None, None),
    ("mqa_causal_padding", 2, 4, 1, 29, 35, 16, True, "random", 8, 8, None),
    ("not_divisible", 1, 2, 2, 37, 37, 8, True, None, 16, 10, None),
    ("block_larger_than_sequence", 2, 2, 2, 20, 27, 16, False, None, 512, None, None),
    ("custom_scale", 2, 2, 1, 25, 25, 16, True, None, 8, None, 0.37),
    ("value_dim_differs", 2, 2, 2, 19, 23, 8, False, "right", 8, None, None),
]


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("name, B, H, Hkv, T, S, D, causal, pad, bs, qbs, scale", CASES, ids=[c[0] for c in CASES])
def test_matches_sdpa_forward_and_backward(name, B, H, Hkv, T, S, D, causal, pad, bs, qbs, scale, impl):
    q, k, v = make_qkv(B, H, Hkv, T, S, D, Dv=12 if name == "value_dim_differs" else None)
    kpm = padding(B, S, pad)
    if impl == "fused" and name == "value_dim_differs":  # the kernels need Dv == D: auto falls back, fused raises
        with pytest.raises(InputShapeError, match=r"impl='fused' cannot run these inputs: .*head_dim \(12\)"):
            blockwise_attention(q, k, v, impl="fused")
        impl = "auto"
    out = blockwise_attention(q, k, v, causal=causal, key_padding_mask=kpm, scale=scale, block_size=bs,
                              q_block_size=qbs, impl=impl)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(T, S, causal, kpm), scale=scale,
                                         enable_gqa=H != Hkv)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    close(out, ref)
    go = torch.randn_like(out)
    for a, b, n in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go), "qkv"):
        assert torch.isfinite(a).all(), n
        close(a, b)


@pytest.mark.parametrize("impl", ["auto", "fused"])  # auto: fp64 runs the reference; fused: the fp64 CPU kernel
def test_fp64_gradcheck_tiny_gqa_causal_padding(impl):
    q, k, v = make_qkv(1, 2, 1, 5, 7, 3, dtype=torch.float64)
    kpm = torch.tensor([[True, True, False, True, True, True, True]])
    fn = lambda q, k, v: blockwise_attention(q, k, v, causal=True, key_padding_mask=kpm,  # noqa: E731
                                             block_size=2, q_block_size=3, impl=impl)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_fully_masked_rows_are_zero_without_nan(impl):
    B, H, T, S, D = 2, 2, 10, 6, 8  # causal with T > S: query i sees keys j <= i - 4, rows 0-3 see nothing
    q, k, v = make_qkv(B, H, H, T, S, D)
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[1] = False  # sequence 1: every key padded
    out = blockwise_attention(q, k, v, causal=True, key_padding_mask=kpm, block_size=4, q_block_size=3, impl=impl)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    close(out, reference_attention(q, k, v, mask=kpm[:, None, None, :], causal=True))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.equal(dq[:, :, :4], torch.zeros_like(dq[:, :, :4]))
    assert torch.equal(dq[1], torch.zeros_like(dq[1]))
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
    # chunk forward reports those rows as lse -inf
    _, lse = attention_chunk_forward(q, k, v, scale=None, causal_offset=S - T, key_padding_mask=kpm, block_size=4,
                                     impl=impl)
    assert torch.isneginf(lse[:, :, :4]).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, :, 4:]).all()


def test_bf16_accumulates_in_fp32():
    q, k, v = make_qkv(1, 4, 2, 70, 70, 32, dtype=torch.bfloat16)
    out = blockwise_attention(q, k, v, causal=True, block_size=16)
    assert out.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), is_causal=True, enable_gqa=True)
    close(out.float(), ref, atol=2e-2)  # bf16 output rounding only: the sums ran in fp32
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    reff = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True)
    for a, b in zip(grads, torch.autograd.grad(reff, (qf, kf, vf), go.float())):
        assert a.dtype == torch.bfloat16
        close(a.float(), b, atol=5e-2)


# --- primitives: what ring attention relies on ------------------------------------------------------------

@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("splits", [(20,), (9, 30)], ids=["2_key_chunks", "3_key_chunks"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_chunked_forward_merge_and_summed_backward_equal_full(splits, causal, impl):
    """Ring attention's contract: queries in 2 chunks, keys in 2 or 3; per query chunk, merge the chunk forwards
    over the key chunks; then every (query chunk, key chunk) backward against the merged out / lse adds up."""
    B, H, Hkv, T, S, D = 2, 4, 2, 31, 45, 8
    q, k, v = make_qkv(B, H, Hkv, T, S, D)
    kpm = padding(B, S, "random")
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(T, S, causal, kpm), enable_gqa=True)
    go = torch.randn_like(full)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(full, (q, k, v), go)

    def pairs(bounds):
        return list(zip(bounds[:-1], bounds[1:]))

    q_chunks, k_chunks = pairs([0, 13, T]), pairs([0, *splits, S])

    def kw(i0, j0, j1):  # query i0 + i sees key j0 + j iff j0 + j <= i0 + i + S - T
        return dict(scale=None, key_padding_mask=kpm[:, j0:j1], block_size=8, q_block_size=7, impl=impl,
                    causal_offset=i0 - j0 + (S - T) if causal else None)

    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i0, i1 in q_chunks:
        qc, out, lse = q[:, :, i0:i1], None, None
        for j0, j1 in k_chunks:
            o, l = attention_chunk_forward(qc, k[:, :, j0:j1], v[:, :, j0:j1], **kw(i0, j0, j1))
            assert l.shape == (B, H, i1 - i0) and l.dtype == torch.float32 and not o.requires_grad
            out, lse = (o, l) if out is None else merge_attention(out, lse, o, l)
        close(out, full[:, :, i0:i1].detach())
        close(lse, attention_chunk_forward(qc, k, v, **kw(i0, 0, S))[1])
        for j0, j1 in k_chunks:  # against the final, merged out and lse, chunk gradients simply add up
            gq, gk, gv = attention_chunk_backward(qc, k[:, :, j0:j1], v[:, :, j0:j1], out, lse, go[:, :, i0:i1],
                                                  **kw(i0, j0, j1))
            assert gq.shape == qc.shape and gk.shape == (B, Hkv, j1 - j0, D) and gv.shape == gk.shape
            dq[:, :, i0:i1] += gq
            dk[:, :, j0:j1] += gk
            dv[:, :, j0:j1] += gv
    close(dq, dq_ref)
    close(dk, dk_ref)
    close(dv, dv_ref)


def test_merge_attention_handles_empty_sides():
    out_a, out_b = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    lse_a = torch.tensor([[[0.5, float("-inf"), float("-inf")]]])
    lse_b = torch.tensor([[[float("-inf"), 2.0, float("-inf")]]])
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    close(out[..., 0, :], out_a[..., 0, :])  # only a saw keys
    close(out[..., 1, :], out_b[..., 1, :])
    assert torch.equal(out[..., 2, :], torch.zeros(1, 1, 4)) and torch.isneginf(lse[..., 2]).all()
    close(lse[..., :2], torch.tensor([[[0.5, 2.0]]]))
    # both sides present: the weights are the softmax of the two lse
    out2, lse2 = merge_attention(out_a, torch.full_like(lse_a, 1.0), out_b, torch.full_like(lse_b, 3.0))
    wa = 1 / (1 + torch.exp(torch.tensor(2.0)))
    close(out2, wa * out_a + (1 - wa) * out_b)
    close(lse2, torch.full_like(lse2, 3.0 + torch.log1p(torch.exp(torch.tensor(-2.0))).item()))


def test_chunk_out_dtype_fp32_for_bf16_inputs():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8, dtype=torch.bfloat16)
    out, lse = attention_chunk_forward(q, k, v, scale=None, block_size=4, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    dq, dk, dv = attention_chunk_backward(q, k, v, out, lse, torch.ones_like(out), scale=None, block_size=4,
                                          grad_dtype=torch.float32)
    assert dq.dtype == dk.dtype == dv.dtype == torch.float32


# --- memory: linear in the sequence length ----------------------------------------------------------------

def saved_bytes(fn, T, D=16):
    q, k, v = make_qkv(1, 1, 1, T, T, D)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q, k, v)
    return total


def test_saved_for_backward_grows_linearly():
    blockwise = lambda q, k, v: blockwise_attention(q, k, v, causal=True, block_size=256)  # noqa: E731
    ratio = saved_bytes(blockwise, 4096) / saved_bytes(blockwise, 2048)
    assert 1.8 < ratio < 2.2, ratio
    # the check can fail: the explicit path saves T x S matrices, so its bytes grow ~4x
    explicit = lambda q, k, v: reference_attention(q, k, v, causal=True)  # noqa: E731
    assert saved_bytes(explicit, 1024) / saved_bytes(explicit, 512) > 3.5


def test_no_tensor_as_large_as_the_score_matrix_in_forward_or_backward():
    dispatch = pytest.importorskip("torch.utils._python_dispatch")

    class Largest(dispatch.TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    T, D = 512, 16
    q, k, v = make_qkv(1, 1, 1, T, T, D)
    with Largest():
        out = blockwise_attention(q, k, v, causal=True, block_size=64)
        out.backward(torch.ones_like(out))
    assert Largest.numel <= max(64 * 64, T * D), Largest.numel  # a (64 x 64) tile or a (T, D) tensor, not T x S


# --- drop-in for SDPA -------------------------------------------------------------------------------------

def test_drop_in_for_sdpa_call_signature():
    q, k, v = make_qkv(2, 4, 2, 13, 21, 8)
    kernel = BlockwiseAttention(block_size=8, q_block_size=4)
    bias = torch.randn(1, 4, 13, 21)
    bias[..., 5] = float("-inf")
    for kw in ({"is_causal": True}, {"attn_mask": torch.rand(2, 1, 13, 21) > 0.2}, {"attn_mask": bias},
               {"attn_mask": torch.rand(13, 21) > 0.5, "scale": 0.5}):
        out = kernel(q, k, v, enable_gqa=True, **kw)
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)  # is_causal: top-left, as SDPA
        close(out, ref)
        go = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
            close(a, b)


def test_drop_in_inside_multihead_attention(monkeypatch):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, n_kv_head=2, causal=True)
    x = torch.randn(2, 11, 32, requires_grad=True)
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[1, :3] = False  # left padding: rows 0-2 of sequence 1 see no key
    for pad in (None, kpm):
        y = mha(x, key_padding_mask=pad)
        gx, = torch.autograd.grad(y.sum(), x)
        with monkeypatch.context() as m:  # attention.py calls F.scaled_dot_product_attention: swap in the kernel
            m.setattr(attention_module, "F", types.SimpleNamespace(
                scaled_dot_product_attention=BlockwiseAttention(block_size=4)))
            y2 = mha(x, key_padding_mask=pad)
            gx2, = torch.autograd.grad(y2.sum(), x)
        close(y2, y)
        close(gx2, gx)


# --- errors -----------------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


BAD = [  # name, call, words the message must contain
    ("q_3d", lambda: blockwise_attention(_t(2, 5, 8), _t(2, 1, 5, 8), _t(2, 1, 5, 8)), ["q", "4-D", "(2, 5, 8)"]),
    ("head_dim", lambda: blockwise_attention(_t(1, 2, 5, 8), _t(1, 2, 5, 4), _t(1, 2, 5, 4)), ["head_dim", "D=8"]),
    ("heads", lambda: blockwise_attention(_t(1, 3, 5, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8)), ["multiple", "(3)"]),
    ("kv_len", lambda: blockwise_attention(_t(1, 2, 5, 8), _t(1, 2, 5, 8), _t(1, 2, 6, 8)), ["k and v"]),
    ("batch", lambda: blockwise_attention(_t(1, 2, 5, 8), _t(2, 2, 5, 8), _t(2, 2, 5, 8)), ["batch"]),
    ("dtype_mix", lambda: blockwise_attention(_t(1, 1, 5, 8), _t(1, 1, 5, 8, dtype=torch.float64),
                                              _t(1, 1, 5, 8)), ["one dtype"]),
    ("int_dtype", lambda: blockwise_attention(_t(1, 1, 5, 8, dtype=torch.int64), _t(1, 1, 5, 8, dtype=torch.int64),
                                              _t(1, 1, 5, 8, dtype=torch.int64)), ["float32", "int64"]),
    ("mask_shape", lambda: blockwise_attention(_t(2, 1, 5, 8), _t(2, 1, 6, 8), _t(2, 1, 6, 8),
                                               key_padding_mask=_t(2, 5, dtype=torch.bool)), ["(2, 6)", "(2, 5)"]),
    ("mask_dtype", lambda: blockwise_attention(_t(2, 1, 5, 8), _t(2, 1, 6, 8), _t(2, 1, 6, 8),
                                               key_padding_mask=_t(2, 6)), ["bool", "float32"]),
    ("block_size", lambda: blockwise_attention(_t(1, 1, 5, 8), _t(1, 1, 5, 8), _t(1, 1, 5, 8), block_size=0),
     ["block_size", "positive"]),
    ("attn_mask", lambda: BlockwiseAttention()(_t(1, 2, 5, 8), _t(1, 2, 6, 8), _t(1, 2, 6, 8),
                                               attn_mask=_t(3, 6, dtype=torch.bool)), ["broadcast", "(1, 2, 5, 6)"]),
    ("dropout", lambda: BlockwiseAttention()(_t(1, 1, 5, 8), _t(1, 1, 5, 8), _t(1, 1, 5, 8), dropout_p=0.1),
     ["dropout"]),
    ("chunk_lse", lambda: attention_chunk_backward(_t(1, 1, 5, 8), _t(1, 1, 5, 8), _t(1, 1, 5, 8), _t(1, 1, 5, 8),
                                                   _t(1, 5), _t(1, 1, 5, 8), scale=None), ["lse", "(1, 1, 5)"]),
    ("causal_offset", lambda: attention_chunk_forward(_t(1, 1, 5, 8), _t(1, 1, 5, 8), _t(1, 1, 5, 8), scale=None,
                                                      causal_offset=True), ["causal_offset", "int"]),
]


@pytest.mark.parametrize("name, call, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_input_shape_error(name, call, words):
    with pytest.raises(InputShapeError) as err:
        call()
    msg = str(err.value)
    assert msg.startswith("input error: ") and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_blockwise_kernel_swapped_into_models_matches_sdpa_with_padding_and_causal_masks():
    """use_blockwise_attention(model): causal GPT and GQA Llama give SDPA's outputs and parameter gradients
    (fp32, 1e-5); removing the kernel restores SDPA exactly."""
    from lamina.models import create_model
    from lamina.nn import use_blockwise_attention

    torch.manual_seed(0)
    for name, kw in (("gpt", dict(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=48, dropout=0.0)),
                     ("llama", dict(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=48))):
        model = create_model(name, **kw)
        idx = torch.randint(0, 40, (3, 48))
        ref = model(idx)
        ref.square().mean().backward()
        g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        assert use_blockwise_attention(model, block_size=16) == 2
        out = model(idx)
        out.square().mean().backward()
        assert (out - ref).abs().max() < 1e-5
        assert max((p.grad - g_ref[n]).abs().max().item() for n, p in model.named_parameters()) < 1e-5
        use_blockwise_attention(model, enable=False)
        assert torch.equal(model(idx), ref)


def test_blockwise_kernel_handles_padding_masks_in_an_encoder():
    from lamina.nn import MultiHeadAttention, use_blockwise_attention

    torch.manual_seed(1)
    mha = MultiHeadAttention(32, 4, n_kv_head=2)
    x = torch.randn(3, 40, 32, requires_grad=True)
    keep = torch.arange(40)[None] < torch.tensor([40, 25, 7])[:, None]  # right padding
    ref = mha(x, key_padding_mask=keep)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    use_blockwise_attention(mha, block_size=8)
    out = mha(x, key_padding_mask=keep)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    assert (out - ref).abs().max() < 1e-5 and (gx - gx_ref).abs().max() < 1e-5


# --- fused vs reference: offsets, lse, bf16, the kernel really runs ----------------------------------------

def test_tile_calls_cover_exactly_the_visible_pairs():
    """The fused causal decomposition, checked by brute force: every visible (query, key) pair lands in exactly
    one kernel call, no hidden pair in any, and each call is unmasked or top-left causal."""
    T, S = 13, 17
    for c in range(-20, 25):
        for bq, bk in ((4, 5), (13, 17), (3, 64)):
            count = torch.zeros(T, S, dtype=torch.int64)
            for i0 in range(0, T, bq):
                i1 = min(i0 + bq, T)
                for j0 in range(0, bwa._key_stop(S, i1, c), bk):
                    for r0, r1, a, b, causal in bwa._tile_calls(i0, i1, j0, min(j0 + bk, S), c):
                        tile = torch.ones(r1 - r0, b - a, dtype=torch.int64)
                        count[r0:r1, a:b] += tile.tril() if causal else tile
            visible = (torch.arange(S)[None] <= torch.arange(T)[:, None] + c).long()
            assert torch.equal(count, visible), (c, bq, bk)


def exact_lse(q, k, scale, c, kpm):
    s = (q.double() @ k.double().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-2, -1)) * scale
    T, S = s.shape[-2:]
    if c is not None:
        s = s.masked_fill(torch.arange(S)[None] > torch.arange(T)[:, None] + c, float("-inf"))
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    return torch.logsumexp(s, -1).float()


@pytest.mark.parametrize("offset", [None, -40, -9, -1, 0, 3, 17, 60])
@pytest.mark.parametrize("blocks", [(None, None), (8, 5)], ids=["default_blocks", "small_blocks"])
def test_chunk_fused_equals_reference_and_exact_lse_at_any_offset(offset, blocks):
    """One (query chunk, key chunk) pair at every kind of causal offset (rows seeing nothing, diagonal tiles,
    keys every row sees), with GQA and padding: fused == reference == float64 math for out, lse and grads."""
    B, H, Hkv, T, S, D = 2, 4, 2, 23, 31, 8
    q, k, v = make_qkv(B, H, Hkv, T, S, D, seed=3)
    kpm = padding(B, S, "random")
    bk, bq = blocks
    kw = dict(scale=0.3, causal_offset=offset, key_padding_mask=kpm, block_size=bk, q_block_size=bq)
    res = {impl: attention_chunk_forward(q, k, v, impl=impl, **kw) for impl in ("fused", "reference")}
    (of, lf), (orf, lrf) = res["fused"], res["reference"]
    want = exact_lse(q, k, 0.3, offset, kpm)
    assert torch.equal(torch.isneginf(lf), torch.isneginf(want)) and torch.equal(torch.isneginf(lrf),
                                                                                 torch.isneginf(want))
    live = torch.isfinite(want)
    close(lf[live], want[live], atol=2e-5)
    close(lrf[live], want[live], atol=2e-5)
    close(of, orf)
    assert torch.equal(of[~live], torch.zeros_like(of[~live]))  # rows with no visible key: out 0
    go = torch.randn_like(of)
    gf = attention_chunk_backward(q, k, v, of, lf, go, impl="fused", **kw)
    gr = attention_chunk_backward(q, k, v, orf, lrf, go, impl="reference", **kw)
    for a, b in zip(gf, gr):
        assert torch.isfinite(a).all()
        close(a, b)
    assert torch.equal(gf[0][~live], torch.zeros_like(gf[0][~live]))  # and zero dq


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_bf16_fused_and_reference_against_fp32_sdpa(causal):
    """bf16 tolerances: the fused kernel computes in bf16 with fp32 accumulators (like SDPA's bf16 kernel);
    the reference upcasts everything to fp32. Both stay within 2e-2 (out) and 5e-2 (grads) of fp32 SDPA,
    and within bf16 rounding of SDPA's own bf16 result; the tiles (block 16) are merged in fp32."""
    q, k, v = make_qkv(2, 4, 2, 70, 70, 32, dtype=torch.bfloat16, seed=5)
    kpm = padding(2, 70, "right")
    go = torch.randn(2, 4, 70, 32, generator=torch.Generator().manual_seed(6)).bfloat16()
    mask = sdpa_mask(70, 70, causal, kpm)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, enable_gqa=True)
    gref = torch.autograd.grad(ref, (qf, kf, vf), go.float())
    sd = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    for impl in ("fused", "reference"):
        out = blockwise_attention(q, k, v, causal=causal, key_padding_mask=kpm, block_size=16, impl=impl)
        assert out.dtype == torch.bfloat16
        close(out.float(), ref, atol=2e-2)
        close(out.float(), sd.float(), atol=2e-2)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), go), gref):
            assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
            close(a.float(), b, atol=5e-2)


def count_calls(monkeypatch):
    """Count the fused kernel's forward / backward calls; make the reference path raise if it is taken."""
    calls = {"forward": 0, "backward": 0}

    def counted(name, f):
        def g(*a, **kw):
            calls[name] += 1
            return f(*a, **kw)
        return g

    def refuse(*a, **kw):
        raise AssertionError("the reference path ran where the fused kernel should have")

    monkeypatch.setattr(bwa, "_cpu_flash_forward", counted("forward", bwa._cpu_flash_forward))
    monkeypatch.setattr(bwa, "_cpu_flash_backward", counted("backward", bwa._cpu_flash_backward))
    monkeypatch.setattr(bwa, "_forward", refuse)
    monkeypatch.setattr(bwa, "_backward", refuse)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_takes_the_fused_kernel(monkeypatch, dtype):
    """impl="auto" on CPU fp32/bf16/fp16 runs the flash kernel (and never the reference) in blockwise_attention,
    BlockwiseAttention with a mask, and the chunk primitives; the call counts follow the tiling."""
    calls = count_calls(monkeypatch)
    q, k, v = make_qkv(1, 2, 1, 40, 40, 8, dtype=dtype)
    out = blockwise_attention(q, k, v, causal=True)  # default blocks: one causal tile, one call each way
    out.backward(torch.ones_like(out))
    assert calls == {"forward": 1, "backward": 1}
    blockwise_attention(q, k, v, key_padding_mask=torch.ones(1, 40, dtype=torch.bool), block_size=16,
                        q_block_size=20).sum().backward()  # 2 query blocks x 3 key blocks
    assert calls == {"forward": 7, "backward": 7}
    BlockwiseAttention()(q, k, v, attn_mask=torch.rand(40, 40) > 0.5, enable_gqa=True).sum().backward()
    o, lse = attention_chunk_forward(q, k, v, scale=None, causal_offset=5)  # keys 0-4 unmasked + a causal tile
    attention_chunk_backward(q, k, v, o, lse, torch.ones_like(o), scale=None, causal_offset=5)
    assert calls == {"forward": 10, "backward": 10}


def test_auto_falls_back_to_reference_where_the_kernel_does_not_apply(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("fused kernel called")

    monkeypatch.setattr(bwa, "_cpu_flash_forward", refuse)
    monkeypatch.setattr(bwa, "_cpu_flash_backward", refuse)
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    close(blockwise_attention(q, k, v, causal=True), ref)  # fp64: reference
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8, Dv=4)
    close(blockwise_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))  # Dv != D: reference
    close(blockwise_attention(q, k, v, impl="reference"), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_fused_matches_sdpa(dtype, causal):
    """The CUDA branch (efficient-attention kernel per tile, k/v expanded for GQA): fused == reference == SDPA,
    forward and backward, with several key blocks and bottom-right causal T < S."""
    q, k, v = (t.detach().cuda().requires_grad_() for t in make_qkv(2, 4, 2, 96, 160, 64, dtype=dtype))
    mask = causal_mask(96, 160).cuda()[None, None] if causal else None
    ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), attn_mask=mask, enable_gqa=True)
    go = torch.randn_like(ref)
    gref = torch.autograd.grad(ref, (q, k, v), go)
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback from the CUDA kernel to the reference fails the test
        for impl in ("auto", "reference"):
            out = blockwise_attention(q, k, v, causal=causal, block_size=64, q_block_size=48, impl=impl)
            close(out.float(), ref, atol=atol)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), go.to(dtype)), gref):
                close(a.float(), b.float(), atol=atol * 3)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_empty_queries_or_keys(impl):
    for T, S in ((0, 5), (5, 0)):  # no queries: empty out; no keys: every row sees nothing -> zeros
        q, k, v = make_qkv(1, 2, 1, T, S, 8)
        out = blockwise_attention(q, k, v, causal=True, impl=impl)
        assert out.shape == (1, 2, T, 8) and torch.equal(out, torch.zeros_like(out))
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert dq.shape == q.shape and dk.shape == k.shape and not dq.abs().sum() and not dk.abs().sum()


def test_unknown_impl_is_refused():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(InputShapeError, match="impl must be one of 'auto', 'fused', 'reference', got 'flash'"):
        blockwise_attention(q, k, v, impl="flash")
    with pytest.raises(InputShapeError, match="impl must be one of"):
        BlockwiseAttention(impl="flash")
