"""Ring attention (lamina.nn.ring_attention): parity with SDPA over 2 and 4 gloo processes, layouts, errors.

Each spawned rank builds the same full q, k, v and upstream gradient from a fixed seed, runs ring attention on
its shard, and rank 0 gathers outputs and input gradients, puts them back in sequence order and compares them
with single-process SDPA (max abs error <= 1e-5, fp32). Results come back as JSON files in tmp_path. The
per-chunk kernel is impl="auto" (PyTorch's fused flash kernel on CPU) unless a case names "reference".
"""

from __future__ import annotations

import datetime
import importlib
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lamina.errors import InputShapeError, ModelError
from lamina.nn.ring_attention import (
    RingAttention,
    pad_for_context_parallel,
    ring_attention,
    shard_positions,
    shard_sequence,
    unshard_sequence,
    zigzag_positions,
    zigzag_shard,
    zigzag_unshard,
)

TOL = 1e-5
# name: (causal, layout, n_head, n_kv_head, impl)
CASES = {
    "causal_zigzag": (True, "zigzag", 4, 4, "auto"),
    "causal_zigzag_gqa": (True, "zigzag", 4, 2, "auto"),
    "noncausal_contiguous": (False, "contiguous", 4, 4, "auto"),
    "noncausal_zigzag": (False, "zigzag", 4, 4, "auto"),
    "causal_contiguous_mqa": (True, "contiguous", 4, 1, "auto"),
    "causal_zigzag_gqa_reference": (True, "zigzag", 4, 2, "reference"),
    "causal_contiguous_reference": (True, "contiguous", 4, 4, "reference"),
}


def _inputs(H, Hkv, T, B=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    return q, k, v, torch.randn(B, H, T, D, generator=g)


def _sdpa(q, k, v, go, causal):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(go)
    return out.detach(), q.grad, k.grad, v.grad


def _gather(x, world_size):
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return parts


def ring_worker(rank, world_size, tmp, T):
    """Spawned rank: every case in CASES, then an unequal-shard call; rank 0 writes the errors."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        errors = {}
        for name, (causal, layout, H, Hkv, impl) in CASES.items():
            q, k, v, go = _inputs(H, Hkv, T)
            local = [shard_sequence(t, 2, rank, world_size, layout).requires_grad_() for t in (q, k, v)]
            out = ring_attention(*local, causal=causal, layout=layout, impl=impl)
            out.backward(shard_sequence(go, 2, rank, world_size, layout))
            got = [unshard_sequence(_gather(t, world_size), 2, world_size, layout)
                   for t in (out.detach(), *(t.grad for t in local))]
            if rank == 0:
                want = _sdpa(q, k, v, go, causal)
                errors[name] = {n: (a - b).abs().max().item() for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
        # ranks holding different local lengths: every rank raises the same clear error instead of hanging
        q, k, v, _ = _inputs(2, 2, 8 + 4 * rank)
        try:
            ring_attention(q, k, v, causal=True)
            errors["unequal_shards"] = "no error"
        except InputShapeError as e:
            errors["unequal_shards"] = str(e)
        (tmp / f"rank{rank}.json").write_text(json.dumps(errors))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world_size,T", [(2, 24), (4, 32)])
def test_ring_attention_matches_sdpa_across_processes(tmp_path, world_size, T):
    mp.spawn(ring_worker, args=(world_size, tmp_path, T), nprocs=world_size, join=True)
    errors = json.loads((tmp_path / "rank0.json").read_text())
    for name in CASES:
        worst = max(errors[name].values())
        assert worst <= TOL, f"world_size={world_size} {name}: max abs errors {errors[name]}"
    for r in range(world_size):
        msg = json.loads((tmp_path / f"rank{r}.json").read_text())["unequal_shards"]
        assert "every rank must hold an equal shard" in msg and "rank 1: q (2, 2, 12, 8)" in msg, msg


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_kv", [4, 1])
def test_world_size_one_equals_sdpa(causal, n_kv, impl):
    q, k, v, go = _inputs(4, n_kv, 20)
    want = _sdpa(q, k, v, go, causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, causal=causal, impl=impl)
    out.backward(go)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out.detach(), *(t.grad for t in leaves)), want):
        assert (a - b).abs().max().item() <= TOL, name


def test_ring_takes_the_fused_kernel_and_bf16_stays_close(monkeypatch):
    """impl="auto" runs the flash kernel per chunk (never the reference tiles), also for bf16, whose output and
    grads stay within bf16 tolerance of fp32 SDPA (chunk results merged in fp32)."""
    bwa = importlib.import_module("lamina.nn.blockwise_attention")
    calls = []

    def refuse(*a, **kw):
        raise AssertionError("reference path taken")

    for name in ("_cpu_flash_forward", "_cpu_flash_backward"):
        f = getattr(bwa, name)
        monkeypatch.setattr(bwa, name, lambda *a, _f=f, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    monkeypatch.setattr(bwa, "_forward", refuse)
    monkeypatch.setattr(bwa, "_backward", refuse)
    q, k, v, go = _inputs(4, 2, 32)
    want = _sdpa(q, k, v, go, True)
    leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = RingAttention(impl="auto")(*leaves, causal=True)
    out.backward(go.bfloat16())
    assert calls == ["_cpu_flash_forward", "_cpu_flash_backward"] and out.dtype == torch.bfloat16
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out.detach(), *(t.grad for t in leaves)), want):
        assert (a.float() - b).abs().max().item() <= 3e-2, name
    with pytest.raises(InputShapeError, match="impl must be one of"):
        ring_attention(*leaves, impl="flash")


def test_kernel_in_attention_equals_sdpa_and_refuses_dropout():
    from lamina.nn import MultiHeadAttention

    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, n_kv_head=2, causal=True)
    x = torch.randn(2, 12, 32)
    want = mha(x)
    mha.kernel = RingAttention()
    assert (mha(x) - want).abs().max().item() <= TOL
    with pytest.raises(ModelError, match="key_padding_mask"):
        mha(x, key_padding_mask=torch.ones(2, 12, dtype=torch.bool))
    with pytest.raises(ModelError, match="dropout"):
        RingAttention()(*_inputs(2, 2, 8)[:3], causal=True, dropout_p=0.1)


def test_zigzag_layout_by_hand():
    x = torch.arange(16)  # N = 2: chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert zigzag_shard(x, 0, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_shard(x, 0, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert zigzag_positions(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert shard_positions(16, 1, 4, "contiguous").tolist() == [4, 5, 6, 7]
    for n in (1, 2, 3, 4):
        y = torch.randn(2, 3, 24, 5)
        parts = [zigzag_shard(y, 2, r, n) for r in range(n)]
        assert torch.equal(zigzag_unshard(parts, 2, n), y)
        assert torch.equal(zigzag_unshard(torch.cat(parts, 2), 2, n), y)  # all_gather + cat form
        assert torch.equal(torch.cat([zigzag_positions(24, r, n) for r in range(n)]).sort().values,
                           torch.arange(24))


def test_uneven_length_is_rejected_with_a_clear_error():
    with pytest.raises(InputShapeError, match=r"sequence length 30 does not split into 2\*world_size = 8 equal "
                                              r"chunks \(world_size 4\); pad it to a multiple of 8 \(next: 32\)"):
        zigzag_shard(torch.zeros(1, 30), 1, 0, 4)
    with pytest.raises(InputShapeError, match=r"contiguous layout\): sequence length 30 .* multiple of 4"):
        shard_sequence(torch.zeros(1, 30), 1, 0, 4, "contiguous")
    q, k, v, _ = _inputs(2, 2, 7)
    with pytest.raises(InputShapeError, match=r"local length 7 is odd.*pad the sequence to a multiple of 2"):
        ring_attention(q, k, v, causal=True)
    with pytest.raises(InputShapeError, match="unknown layout 'ring'; valid: zigzag, contiguous"):
        ring_attention(q, k, v, layout="ring")
    padded = pad_for_context_parallel(torch.ones(2, 30, dtype=torch.long), 1, 4, value=-100)
    assert padded.shape == (2, 32) and padded[:, 30:].eq(-100).all() and padded[:, :30].eq(1).all()
