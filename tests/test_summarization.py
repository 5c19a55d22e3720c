"""Abstractive summarization: no-repeat n-gram blocking in seq2seq beam search, ROUGE in the seq2seq task,
the SciTLDR data set, and a tiny end-to-end CLI run."""

from __future__ import annotations

import torch

from lamina.models import create_model
from lamina.models.generation import banned_ngram_mask, seq2seq_generate

TINY = dict(vocab_size=20, d_model=32, n_head=4, d_ff=64, n_enc_layer=1, n_dec_layer=2, rel_buckets=8,
            rel_max_distance=20, dropout=0.0)


def tiny_t5(**kw):
    torch.manual_seed(0)
    return create_model("t5_mini", **{**TINY, **kw}).eval()


def _ngrams(row: list[int], n: int) -> list[tuple]:
    return [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]


def _hyp(row: torch.Tensor, eos: int) -> list[int]:
    """A decoded row up to and including </s> (the rest is padding); the whole row when it has none (the
    random model also emits the pad id 0 as an ordinary token)."""
    toks = row.tolist()
    return toks[:toks.index(eos) + 1] if eos in toks else toks


# ----- 1. no_repeat_ngram_size ---------------------------------------------------------------------------
def test_banned_ngram_mask_hand_case():
    # hypothesis "5 6 7 5 6": with n=3 the prefix (5, 6) was followed by 7 -> 7 is banned, nothing else
    hyp = torch.tensor([[5, 6, 7, 5, 6], [5, 6, 7, 8, 9]])
    ban = banned_ngram_mask(hyp, 3, 10)
    assert ban[0].nonzero().flatten().tolist() == [7]
    assert not ban[1].any()  # prefix (8, 9) never seen before
    # n=2: the last token 6 was followed by 7 once -> ban 7; row 2: 9 never followed by anything
    ban2 = banned_ngram_mask(hyp, 2, 10)
    assert ban2[0].nonzero().flatten().tolist() == [7] and not ban2[1].any()
    # n=1 bans every token already present; too-short hypotheses ban nothing
    assert banned_ngram_mask(hyp, 1, 10)[1].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    assert banned_ngram_mask(hyp[:, :2], 3, 10) is None
    # repeated prefix with two different continuations bans both
    assert banned_ngram_mask(torch.tensor([[1, 2, 1, 3, 1]]), 2, 5)[0].nonzero().flatten().tolist() == [2, 3]


def test_no_repeat_ngram_generation_never_repeats_and_default_is_unchanged():
    model = tiny_t5(eos_id=19)  # an id the random model rarely emits: long outputs, which repeat a lot
    src = torch.randint(4, 19, (4, 7), generator=torch.Generator().manual_seed(0))
    repeated_without = False
    for beam in (1, 3):
        base = seq2seq_generate(model, src, beam_size=beam, max_len=24)
        assert torch.equal(base, seq2seq_generate(model, src, beam_size=beam, max_len=24, no_repeat_ngram_size=0))
        repeated_without |= any(len(set(_ngrams(r, 2))) < len(_ngrams(r, 2))
                                for r in (_hyp(row, 19) for row in base))
        for n in (2, 3):
            out = seq2seq_generate(model, src, beam_size=beam, max_len=24, no_repeat_ngram_size=n)
            for row in out:
                toks = _hyp(row, 19)
                grams = _ngrams(toks, n)
                assert len(grams) == len(set(grams)), (beam, n, toks)
    assert repeated_without  # the constraint actually had something to block
