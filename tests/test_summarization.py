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


# ----- 2. ROUGE in the seq2seq task ----------------------------------------------------------------------
def test_rouge_hand_case_stemming_and_multi_reference_max():
    from lamina.tasks.seq2seq import rouge_scores

    # hand-computed: unigrams 5 of 6 shared (P = R = 5/6), bigrams 3 of 5, longest common subsequence 5 of 6
    hand = rouge_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert hand == {"rouge1": 83.33, "rouge2": 60.0, "rougeL": 83.33}
    # Porter stemming on: "cats running" == "cat runs"
    assert rouge_scores(["cats running"], ["cat runs"]) == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    # several references: the best one by ROUGE-1 gives the example's numbers; then the mean over examples
    multi = rouge_scores(["the cat sat on the mat", "a dog"],
                         [["completely different words", "the cat is on the mat"], "a dog barks"])
    # example 2: P = 1, R = 2/3 -> F = 0.8 for ROUGE-1 and -L; bigram "a dog": P = 1, R = 1/2 -> 2/3
    assert multi == {"rouge1": round((83.333333 + 80.0) / 2, 2), "rouge2": round((60.0 + 66.666667) / 2, 2),
                     "rougeL": round((83.333333 + 80.0) / 2, 2)}


def test_rouge_matches_the_package_and_picks_the_reference_by_rouge1():
    from rouge_score import rouge_scorer

    from lamina.tasks.seq2seq import rouge_scores

    hyp = "sparse attention speeds training"
    # reference 1 has every word but in reverse order (best ROUGE-1), reference 2 keeps one bigram and the
    # order (best ROUGE-2 and ROUGE-L), reference 3 is unrelated
    refs = ["training speeds attention sparse", "sparse attention for graphs", "a new benchmark"]
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    keys = ("rouge1", "rouge2", "rougeL")
    # SciTLDR's multi-max (scripts/cal-rouge.py): all three numbers from the reference with the best ROUGE-1
    first = sc.score(refs[0], hyp)
    assert rouge_scores([hyp], [refs]) == {k: round(100 * first[k].fmeasure, 2) for k in keys}
    assert rouge_scores([hyp], [refs])["rouge2"] == 0.0
    # ... which is not rouge-score's score_multi (each metric's own best reference) on this case
    per_metric = sc.score_multi(refs, hyp)
    assert per_metric["rouge2"].fmeasure > 0.3
    for r in refs:  # a single reference, as a string or a one-element list, is the package's number
        assert rouge_scores([hyp], [r]) == rouge_scores([hyp], [[r]]) == {k: round(100 * sc.score(r, hyp)[k].fmeasure, 2) for k in keys}


def test_seq2seq_task_options_and_missing_rouge_package(monkeypatch):
    import sys

    import pytest

    from lamina.errors import ConfigError, MissingDependencyError
    from lamina.tasks.seq2seq import Seq2SeqTask, rouge_scorer

    assert Seq2SeqTask(100).metric == "bleu" and Seq2SeqTask(100).no_repeat_ngram == 0
    with pytest.raises(ConfigError, match="task.metric: expected one of bleu, rouge, got 'meteor'"):
        Seq2SeqTask(100, metric="meteor")
    with pytest.raises(ConfigError, match="task.no_repeat_ngram: expected an integer >= 0"):
        Seq2SeqTask(100, no_repeat_ngram=-1)
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(MissingDependencyError, match="pip install rouge-score"):
        rouge_scorer()


# ----- 3. the scitldr data set ---------------------------------------------------------------------------
def _write_scitldr(folder, rows_per_split: dict):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in rows_per_split.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_scitldr_shipped_files_sources_targets_and_references():
    from lamina.data import load_dataset

    b = load_dataset("scitldr", limit=40, eval_limit=5, vocab_size=500)
    assert (len(b.train), len(b.val), len(b.test)) == (40, 5, 5)
    assert b.task == "seq2seq" and b.meta["max_len"] == 256 and b.meta["tgt_max_len"] == 48
    tok = b.extras["tokenizer"]
    srcs, refs = b.extras["text"]["test"]
    # the first test paper of SciTLDR-A: FearNet, with several TLDRs kept as references
    assert srcs[0].startswith("Incremental class learning involves sequentially learning classes in bursts")
    assert isinstance(refs[0], list) and len(refs[0]) >= 2 and refs[0][0].startswith("FearNet is a memory efficient")
    # the training target is the TLDR, wrapped in <s> ... </s>; sources end in </s>
    tgt = b.train.tensors["tgt"][0]
    n = int(b.train.tensors["tgt_len"][0])
    assert tgt[0] == tok.bos_id and tgt[n - 1] == tok.eos_id
    # (truncated to tgt_max_len=48 tokens with this tiny vocabulary: a prefix of the TLDR)
    assert n == 48 and b.extras["text"]["train"][1][0].startswith(tok.decode_batch(tgt[None, 1:n])[0])
    assert int(b.train.tensors["src_len"].max()) == 256  # long abstracts truncated, not dropped
    assert b.meta["train_pairs_kept"] == 40


def test_scitldr_bad_input_is_one_line(tmp_path):
    import pytest

    from lamina.data import load_dataset
    from lamina.errors import DataError

    good = {"source": ["A first sentence.", "A second one."], "target": ["A tldr."]}
    with pytest.raises(DataError, match="train.jsonl\\(.gz\\) not found"):
        load_dataset("scitldr", path=tmp_path / "none")
    for bad, msg in (("{not json", "train.jsonl:2: not a JSON object"),
                     ({"source": [], "target": ["x"]}, "train.jsonl:2: empty source"),
                     ({"source": ["x"], "target": [" "]}, "train.jsonl:2: empty target")):
        folder = tmp_path / f"case{len(msg)}"
        _write_scitldr(folder, {"train": [good], "dev": [good], "test": [good]})
        import json
        with open(folder / "train.jsonl", "a", encoding="utf-8") as f:
            f.write((bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
        with pytest.raises(DataError, match=msg) as e:
            load_dataset("scitldr", path=folder, vocab_size=300)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="limit must be a positive integer"):
        load_dataset("scitldr", limit=0)


def test_lead_baseline():
    from lamina.data.summarization import lead

    assert lead([["One.", "Two. ", "Three.", "Four."], ["Only."]], 3) == ["One. Two. Three.", "Only."]


# ----- end to end --------------------------------------------------------------------------------------
def test_cli_trains_t5_on_a_scitldr_slice_and_reports_rouge(tmp_path):
    import json

    from lamina.cli.main import main

    args = ["train", "configs/scitldr_t5.yaml", "data.limit=48", "data.eval_limit=6", "data.vocab_size=300",
            "data.max_len=64", "data.tgt_max_len=16", "model.d_model=32", "model.n_head=2", "model.d_ff=64",
            "model.n_enc_layer=1", "model.n_dec_layer=1", "trainer.max_epochs=1", "task.beam_size=2",
            "task.max_len_b=12", "trainer.threads=1", f"logging.root={tmp_path}", "name=t", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    test = summary["test"]
    assert summary["task"] == "seq2seq" and summary["data"]["test"] == 6
    assert {"test/rouge1", "test/rouge2", "test/rougeL"} <= set(test) and "test/bleu" not in test
    assert all(0.0 <= test[k] <= 100.0 for k in ("test/rouge1", "test/rouge2", "test/rougeL"))
    lines = (tmp_path / "t" / "summaries_test.txt").read_text(encoding="utf-8").split("\n")
    assert len(lines) == 7 and lines[-1] == ""  # one summary per test paper
