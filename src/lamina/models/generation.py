"""Autoregressive decoding for any model that follows the decoder contract.

The decoder contract (lamina.models.gpt states it in full):
* `model(idx)` with token ids (B, T) returns next-token logits (B, T, V); `model.block_size` is the longest
  context it takes
* optional, for `use_cache=True`: `model.make_cache(batch_size)` returns a cache object and
  `model(new_idx, cache=cache)` returns logits for just the new tokens, attending to everything cached

Each step: logits of the last position -> / temperature -> keep the top_k -> keep the smallest set whose
probability reaches top_p -> sample (or argmax when `greedy`). A sequence that emits one of `stop_tokens` is
finished: its later positions repeat that stop token, and decoding ends when every sequence is finished.

With a cache each step feeds one token. Without one (or when the model has no `make_cache`), each step
recomputes the last `block_size` tokens. Once a cached sequence would outgrow `block_size`, decoding continues
without the cache, cropping the context, which is what the uncached path computes too (learned absolute
positions shift when the window slides, so a cache cannot be reused past that point).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from lamina.errors import InputShapeError, ModelError


def _validate(idx, max_new_tokens, temperature, top_k, top_p, greedy) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype.is_floating_point:
        got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise InputShapeError(f"generate: idx must be token ids of shape (B, T) with T >= 1, got {got}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ModelError(f"generate: max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not greedy and not temperature > 0:
        raise ModelError(f"generate: temperature must be > 0 (or pass greedy=True), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ModelError(f"generate: top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ModelError(f"generate: top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits with everything outside the top_k / nucleus (top_p) set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    stop_tokens: Iterable[int] = (),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Extend token ids idx (B, T) by up to max_new_tokens; returns (B, T + n), n <= max_new_tokens.

    Runs the model in eval mode (its mode is restored afterwards) without gradients. `generator` seeds the
    sampling; `on_token(tokens)` gets each step's new tokens (B,) (finished sequences repeat their stop token).
    """
    _validate(idx, max_new_tokens, temperature, top_k, top_p, greedy)
    block_size = int(model.block_size)
    stops = torch.tensor(sorted({int(t) for t in stop_tokens}), dtype=idx.dtype, device=idx.device)
    B = idx.shape[0]
    was_training = model.training
    model.eval()
    try:
        cache = model.make_cache(B) if use_cache and hasattr(model, "make_cache") else None
        out, pending, cached = idx, idx, 0  # pending: tokens not yet fed to the cache; cached: how many were
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        last = torch.zeros(B, dtype=idx.dtype, device=idx.device)  # the stop token a finished sequence emitted
        for _ in range(max_new_tokens):
            if cache is not None and cached + pending.shape[1] <= block_size:
                logits = model(pending, cache=cache)[:, -1, :]  # (B, V)
                cached += pending.shape[1]
            else:
                cache = None  # outgrew the context (or never had a cache): recompute the cropped window
                logits = model(out[:, -block_size:])[:, -1, :]  # (B, V)
            if greedy:
                nxt = logits.argmax(dim=-1)  # (B,)
            else:
                logits = filter_logits(logits.float() / temperature, top_k, top_p)
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
            nxt = torch.where(finished, last, nxt.to(idx.dtype))
            if stops.numel():
                hit = torch.isin(nxt, stops) & ~finished
                last = torch.where(hit, nxt, last)
                finished |= hit
            out = torch.cat((out, nxt[:, None]), dim=1)  # (B, T + step)
            pending = nxt[:, None]  # (B, 1)
            if on_token is not None:
                on_token(nxt)
            if stops.numel() and bool(finished.all()):
                break
        return out
    finally:
        model.train(was_training)


# ----- encoder-decoder decoding ------------------------------------------------------------------------------
def length_penalty(length: torch.Tensor | int, alpha: float) -> torch.Tensor | float:
    """GNMT's length normalizer ((5 + |Y|) / 6) ** alpha (Wu et al. 2016); alpha 0 = raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def seq2seq_generate(model: nn.Module, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                     beam_size: int = 4, max_len: int | None = None, alpha: float = 0.6,
                     no_repeat_ngram_size: int = 0) -> torch.Tensor:
    """Decode target ids (B, L) for source ids (B, S) with a model that keeps the seq2seq contract
    (lamina.models.t5: encode / decode / make_cache / bos_id / eos_id / pad_id).

    beam_size 1 is greedy decoding. Beam search keeps the `beam_size` best partial hypotheses per sentence by
    summed log-probability; when ending a beam with </s> ranks among the step's `beam_size` best candidates,
    that hypothesis is finished and scored by its sum / length_penalty(len, alpha); the best finished one is
    returned. A sentence stops early once no live beam can beat its best finished one (live scores only fall,
    and the penalty is at most length_penalty(max_len)). Output rows start after <s>,
    end with </s> where one was produced and are right-padded with pad_id.

    no_repeat_ngram_size n > 0: a hypothesis never contains the same n-gram twice (fairseq's and Hugging Face's
    rule): at each step the tokens that would complete an n-gram already in the hypothesis (<s> excluded) get
    log-probability -inf. 0 (the default) changes nothing.
    """
    if beam_size < 1:
        raise ModelError(f"seq2seq_generate: beam_size must be >= 1, got {beam_size}")
    if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise ModelError(f"seq2seq_generate: no_repeat_ngram_size must be an integer >= 0, got {no_repeat_ngram_size!r}")
    was_training = model.training
    model.eval()
    try:
        if src_mask is None:
            src_mask = src != model.pad_id
        if beam_size == 1:
            return _greedy(model, src, src_mask, max_len or model.block_size, no_repeat_ngram_size)
        return _beam_search(model, src, src_mask, beam_size, max_len or model.block_size, alpha, no_repeat_ngram_size)
    finally:
        model.train(was_training)


def banned_ngram_mask(hyp: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor | None:
    """(N, V) bool: True for the tokens that would complete an n-gram already in hyp (N, L); None when no
    token is banned (n < 1 or hyp too short to hold an n-gram)."""
    N, L = hyp.shape
    if n < 1 or L < n:
        return None
    if n == 1:
        ban = torch.zeros(N, vocab_size, dtype=torch.bool, device=hyp.device)
        return ban.scatter_(1, hyp, True)
    windows = hyp.unfold(1, n, 1)  # (N, L-n+1, n): every n-gram so far
    prefix = hyp[:, L - n + 1:]  # (N, n-1): the n-1 tokens the next one would extend
    match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # (N, L-n+1)
    rows, cols = match.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return None
    ban = torch.zeros(N, vocab_size, dtype=torch.bool, device=hyp.device)
    ban[rows, windows[rows, cols, -1]] = True
    return ban


def _greedy(model, src, src_mask, max_len: int, no_repeat: int = 0) -> torch.Tensor:
    B, dev = src.shape[0], src.device
    memory = model.encode(src, src_mask)
    cache = model.make_cache(B, max_len, dtype=memory.dtype, device=dev)
    tok = torch.full((B, 1), model.bos_id, dtype=torch.long, device=dev)
    out, finished = [], torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_len):
        logits = model.decode(tok, memory, src_mask, cache=cache)[:, -1]  # (B, V)
        if no_repeat and out:
            ban = banned_ngram_mask(torch.cat(out, dim=1), no_repeat, logits.shape[-1])
            if ban is not None:
                logits = logits.masked_fill(ban, float("-inf"))
        tok = logits.argmax(-1, keepdim=True)  # (B, 1)
        tok = tok.masked_fill(finished[:, None], model.pad_id)  # after </s>: padding
        out.append(tok)
        finished |= tok[:, 0] == model.eos_id
        if bool(finished.all()):
            break
    return torch.cat(out, dim=1)


def _beam_search(model, src, src_mask, K: int, max_len: int, alpha: float, no_repeat: int = 0) -> torch.Tensor:
    B, dev = src.shape[0], src.device
    bos, eos, pad = model.bos_id, model.eos_id, model.pad_id
    memory = model.encode(src, src_mask)  # (B, S, C)
    memory = memory.repeat_interleave(K, dim=0)  # (B*K, S, C): beam k of sentence b is row b*K + k
    mem_mask = src_mask.repeat_interleave(K, dim=0)
    cache = model.make_cache(B * K, max_len, dtype=memory.dtype, device=dev)
    tokens = torch.full((B * K, 1), bos, dtype=torch.long, device=dev)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step does not pick K copies
    fin_score = torch.full((B,), float("-inf"), device=dev)
    fin_tokens = torch.full((B, max_len + 1), pad, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    base = (torch.arange(B, device=dev) * K)[:, None]  # (B, 1)
    for step in range(1, max_len + 1):
        logits = model.decode(tokens[:, -1:], memory, mem_mask, cache=cache)[:, -1]  # (B*K, V)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        if no_repeat:
            ban = banned_ngram_mask(tokens[:, 1:], no_repeat, logp.shape[-1])
            if ban is not None:
                logp = logp.masked_fill(ban, float("-inf"))
        logp = logp.view(B, K, -1)
        V = logp.shape[-1]
        cand = scores[:, :, None] + logp  # (B, K, V)
        # hypotheses that end here (</s> among the K best candidates): the best one per sentence replaces the
        # finished one if it scores higher after length normalization
        kth = cand.view(B, -1).topk(K, dim=1).values[:, -1:]  # (B, 1)
        eos_norm = torch.where(cand[:, :, eos] >= kth, cand[:, :, eos], float("-inf")) / length_penalty(step, alpha)
        best, best_k = eos_norm.max(dim=1)
        better = (best > fin_score) & ~done
        if better.any():
            rows = (base[:, 0] + best_k)[better]
            fin_tokens[better, :step] = torch.cat(
                [tokens[rows, 1:], torch.full((len(rows), 1), eos, dtype=torch.long, device=dev)], dim=1)
            fin_tokens[better, step:] = pad
            fin_score = torch.where(better, best, fin_score)
        cand[:, :, eos] = float("-inf")  # live beams continue with other tokens
        top, idx = cand.view(B, K * V).topk(K, dim=1)  # (B, K)
        parent = (base + idx // V).view(-1)  # (B*K,) rows of the beams extended
        for c in cache:
            c.reorder(parent)
        tokens = torch.cat([tokens[parent], (idx % V).view(-1, 1)], dim=1)
        scores = top
        # no live beam can still win: its score only falls, its penalty grows at most to max_len's
        done |= (scores.max(dim=1).values / length_penalty(max_len, alpha) < fin_score)
        if bool(done.all()):
            break
    out = fin_tokens
    unfinished = fin_score == float("-inf")  # no </s> within max_len: return the best live beam
    if unfinished.any():
        best_live = (base[:, 0] + scores.argmax(dim=1))[unfinished]
        out[unfinished, :tokens.shape[1] - 1] = tokens[best_live, 1:]
    lengths = (out != pad).sum(dim=1)
    return out[:, :max(1, int(lengths.max()))]
