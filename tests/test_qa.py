"""Extractive question answering: the span head against transformers' BertForQuestionAnswering, the best-span
search against brute force, exact match / F1 against hand-computed SQuAD scores, sliding windows that keep every
answer recoverable, decoding through windows with an oracle model, a short run that must learn, `lamina qa`, and
the bad-input lines (answer span outside its context, malformed files)."""

import importlib.util
import json

import pytest
import torch

from conftest import ROOT
from lamina.cli.main import main
from lamina.data import load_dataset
from lamina.data.qa import QAExample, answer_tokens, read_squad, window_starts
from lamina.errors import DataError
from lamina.models import create_model
from lamina.tasks.qa import QuestionAnsweringTask, best_spans

XQUAD = ROOT / "datasets" / "xquad_en" / "xquad.en.json"
QUICK = ["trainer.progress=false", "logging.tensorboard=false", "cost.energy=false"]
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers (the reference)")


def _squad(tmp_path, qas, context="The cat sat on the mat in Paris.", name="q.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    return p


@pytest.fixture(scope="module")
def xquad_bpe():
    """XQuAD English with a small BPE tokenizer trained on it (no downloads), short windows: many per question."""
    return load_dataset("squad", max_len=64, max_query_len=24, doc_stride=20, vocab_size=1500, seed=0)


# ----- the model ---------------------------------------------------------------------------------------------
@needs_transformers
def test_span_head_matches_transformers_bert_for_question_answering(tmp_path):
    from transformers import BertConfig, BertForQuestionAnswering

    import lamina.hub
    from lamina.models.bert import load_hf_state_dict

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    ref = BertForQuestionAnswering(cfg).eval()
    ours = create_model("bert_qa_mini", vocab_size=120, n_embd=32, n_layer=2, n_head=4, ffn_hidden=64,
                        block_size=64, dropout=0.0).eval()
    assert load_hf_state_dict(ours, ref.state_dict()) == []
    ids = torch.randint(1, 120, (3, 20))
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    want = ref(input_ids=ids, token_type_ids=types, attention_mask=mask)
    got = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert torch.allclose(got[..., 0][real], want.start_logits[real], atol=1e-5)  # fp32 parity
    assert torch.allclose(got[..., 1][real], want.end_logits[real], atol=1e-5)
    # an HF folder written by transformers loads through lamina.hub as the span model, same logits
    ref.save_pretrained(tmp_path / "hf")
    loaded, info = lamina.hub.load(tmp_path / "hf")
    assert info["architecture"] == "BertForQuestionAnswering" and loaded.output_kind == "span"
    assert torch.allclose(loaded(ids, attention_mask=mask, token_type_ids=types)[real], got[real], atol=1e-5)


def test_span_model_from_an_encoder_keeps_the_encoder():
    from lamina.models.bert import span_qa_from

    torch.manual_seed(0)
    enc = create_model("bert_mini", vocab_size=90, block_size=32, num_classes=3, dropout=0.0).eval()
    qa = span_qa_from(enc).eval()
    ids = torch.randint(1, 90, (2, 10))
    assert torch.equal(qa.forward_features(ids), enc.forward_features(ids))
    assert qa(ids).shape == (2, 10, 2)
    with pytest.raises(Exception, match="BERT encoder"):
        span_qa_from(torch.nn.Linear(2, 2))


# ----- decoding and scores -------------------------------------------------------------------------------------
def test_best_spans_match_brute_force():
    g = torch.Generator().manual_seed(0)
    B, T, L = 5, 17, 4
    logits = torch.randn(B, T, 2, generator=g)
    ctx = torch.tensor([3, 5, 2, 7, 4])
    lengths = torch.tensor([17, 12, 9, 15, 6])
    start, end, score = best_spans(logits, ctx, lengths, L)
    for b in range(B):
        cands = [(float(logits[b, i, 0] + logits[b, j, 1]), i, j)
                 for i in range(ctx[b], lengths[b] - 1) for j in range(i, min(i + L, lengths[b] - 1))]
        want = max(cands)
        assert (int(start[b]), int(end[b])) == want[1:]
        assert float(score[b]) == pytest.approx(want[0], abs=1e-5)


def test_exact_match_and_f1_follow_the_squad_definitions():
    ex = [QAExample("a", "q", "c", [("Denver Broncos", 0)]), QAExample("b", "q", "c", [("the cat", 0), ("a dog", 0)]),
          QAExample("c", "q", "c", [("1905", 0)])]
    preds = [{"id": "a", "text": "the Denver Broncos!"},  # articles and punctuation dropped: exact
             {"id": "b", "text": "dog"},  # best gold "a dog" -> "dog": exact after normalising
             {"id": "c", "text": "in 1905 and 1906"}]  # 1 of 4 predicted tokens right, recall 1: F1 = 2*.25/1.25
    s = QuestionAnsweringTask.squad_scores(preds, ex)
    assert s["exact_match"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert s["f1"] == pytest.approx(100 * (1 + 1 + 0.4) / 3, abs=1e-3)


# ----- windows ---------------------------------------------------------------------------------------------------
def test_window_starts_cover_the_context():
    assert window_starts(10, 10, 4) == [0]
    assert window_starts(11, 10, 4) == [0, 4]
    assert window_starts(30, 10, 7) == [0, 7, 14, 21]  # 21 + 10 >= 30
    assert answer_tokens([(0, 3), (4, 7), (8, 11)], 4, 9) == (1, 2)
    assert answer_tokens([(0, 3), (4, 7)], 3, 4) is None  # only the space between tokens


def test_every_labelled_window_recovers_its_answer(xquad_bpe):
    b = xquad_bpe
    assert b.meta["windows"]["train"] > 2 * b.meta["questions"]["train"]  # short windows: several per question
    for split in ("train", "test"):
        examples, w = b.extras["qa"][split]
        t = w.tensors
        found, labelled = set(), 0
        for i in range(len(t["ids"])):
            n = int(t["lengths"][i])
            ids, types = t["ids"][i, :n].tolist(), t["token_type_ids"][i, :n].tolist()
            base = int(t["ctx_offset"][i])
            assert ids[0] == b.meta["bos_id"] and ids[base - 1] == ids[-1] == b.meta["eos_id"]
            assert types == [0] * base + [1] * (n - base)
            s, e = int(t["start"][i]), int(t["end"][i])
            if s == 0:
                assert e == 0
                continue
            labelled += 1
            k = int(t["example"][i])
            off, ws = w.offsets[k], int(t["window_start"][i])
            text = examples[k].context[off[s - base + ws][0]:off[e - base + ws][1]]
            assert examples[k].answers[0][0] in text  # whole tokens around the answer's characters
            found.add(k)
        # an answer lies whole in some window unless it is longer than two windows' overlap (room - doc_stride)
        base_of = {int(k): int(c) for k, c in zip(t["example"], t["ctx_offset"])}
        for k, ex in enumerate(examples):
            if k in found:
                continue
            room = 64 - base_of[k] - 1
            text, start = ex.answers[0]
            s, e = answer_tokens(w.offsets[k], start, start + len(text))
            assert e - s + 1 > room - 20, (ex.id, e - s + 1, room)
        assert len(found) >= 0.95 * len(examples)


def test_decoding_through_windows_with_an_oracle_scores_100(xquad_bpe):
    """A model that puts its largest logits on each window's labelled tokens: every answer must come back."""
    examples, w = xquad_bpe.extras["qa"]["test"]
    t = w.tensors
    table = {tuple(t["ids"][i, :int(t["lengths"][i])].tolist()): (int(t["start"][i]), int(t["end"][i]))
             for i in range(len(t["ids"]))}

    class Oracle(torch.nn.Module):
        output_kind = "span"

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, lengths=None, token_type_ids=None, attention_mask=None):
            out = torch.zeros(*ids.shape, 2)
            for r in range(len(ids)):
                s, e = table[tuple(ids[r, :int(lengths[r])].tolist())]
                if s:  # a window with the answer outscores any window without it
                    out[r, s, 0] = out[r, e, 1] = 10.0
            return out

    task = QuestionAnsweringTask(max_answer_len=64)
    preds = task.decode(Oracle(), examples, w, torch.device("cpu"))
    whole = sorted({int(k) for k, s in zip(t["example"], t["start"]) if s > 0})  # answers whole in some window
    assert len(whole) > 0.95 * len(examples)
    scores = task.squad_scores([preds[k] for k in whole], [examples[k] for k in whole])
    assert scores["f1"] > 99.5 and scores["exact_match"] > 98.0, scores  # a few answers end inside a BPE token


# ----- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qas, msg", [
    ([{"id": "1", "question": "Where?", "answers": [{"text": "London", "answer_start": 26}]}],
     "answer span outside its context"),
    ([{"id": "1", "question": "Where?", "answers": [{"text": "Paris.", "answer_start": 28}]}],
     "answer span outside its context"),
    ([{"id": "1", "question": "Where?", "answers": []}], "non-empty 'answers'"),
    ([{"id": "1", "question": "", "answers": [{"text": "cat", "answer_start": 4}]}], "non-empty 'question'"),
    ([{"id": "1", "question": "Who?", "answers": [{"text": "cat", "answer_start": 4}]},
      {"id": "1", "question": "Who?", "answers": [{"text": "cat", "answer_start": 4}]}], "duplicate id"),
    ([{"id": "1", "question": "Who?", "answers": [{"text": "cat", "answer_start": "4"}]}], "integer 'answer_start'"),
])
def test_malformed_squad_files_are_one_line_errors(tmp_path, qas, msg):
    with pytest.raises(DataError, match=msg):
        read_squad(_squad(tmp_path, qas))


def test_unreadable_files_and_bad_options(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not a JSON file"):
        read_squad(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"version": "1.1"}')
    with pytest.raises(DataError, match="'data' list"):
        read_squad(tmp_path / "y.json")
    with pytest.raises(DataError, match="not found"):
        read_squad(tmp_path / "none.json")
    with pytest.raises(DataError, match="max_query_len"):
        load_dataset("squad", max_len=32, max_query_len=30)
    with pytest.raises(DataError, match="character tokenizer"):
        load_dataset("squad", tokenizer_kind="char")


def test_cli_train_on_a_file_with_a_broken_answer_exits_2(tmp_path, capsys):
    bad = _squad(tmp_path, [{"id": "7", "question": "Where?", "answers": [{"text": "Rome", "answer_start": 3}]}])
    rc = main(["train", "data.name=squad", f"data.path={bad}", "model.name=bert_qa_mini",
               "task.name=question_answering", "task.label_smoothing=0", *QUICK])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "question 7: answer span outside its context" in err[0]


# ----- a short run that must learn, and `lamina qa` -----------------------------------------------------------
@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    """bert_qa_mini from scratch on 48 XQuAD questions, scored on the same questions: it must memorise them."""
    out = tmp_path_factory.mktemp("qa")
    args = ["train", "data.name=squad", "data.val_fraction=0", "data.test_fraction=0", "data.limit=48",
            "data.max_len=96", "data.max_query_len=24", "data.doc_stride=60", "data.vocab_size=600",
            "data.batch_size=16", "model.name=bert_qa_mini", "model.n_layer=2", "model.n_embd=128",
            "model.n_head=4", "model.ffn_hidden=256", "model.dropout=0.0", "task.name=question_answering",
            "task.label_smoothing=0", "optimizer.lr=3e-3", "trainer.max_epochs=25", f"logging.root={out}",
            "name=qa-mini", "seed=0", "trainer.threads=1", *QUICK]
    assert main(args) == 0
    return out / "qa-mini"


def test_a_short_run_memorises_its_questions_and_answers_from_the_cli(qa_run, tmp_path, capsys):
    from lamina.runs.qa import answer_file

    examples = read_squad(XQUAD)[:48]
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": e.context, "qas": [{"id": e.id, "question": e.question,
                                        "answers": [{"text": a, "answer_start": s} for a, s in e.answers]}]}
        for e in examples]}]}))
    r = answer_file(qa_run, sub)
    assert r["f1"] > 50.0, r  # an untrained span head scores ~5; this reaches ~65-70
    capsys.readouterr()
    e = examples[0]
    assert main(["qa", str(qa_run), "--question", e.question, "--context", e.context, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert e.context[got["start_char"]:].startswith(got["answer"]) and got["windows"] >= 1
    assert main(["qa", str(qa_run), "--file", str(sub), "--out", str(tmp_path / "p.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["f1"] == r["f1"]
    assert set(json.loads((tmp_path / "p.json").read_text())) == {e.id for e in examples}


def test_qa_cli_bad_input(qa_run, tmp_path, capsys):
    for args, msg in ((["--question", "Who?"], "give --question and a context"),
                      (["--question", "Who?", "--context-file", str(tmp_path / "none.txt")], "context file not found"),
                      (["--question", " ", "--context", "text"], "question: empty"),
                      (["--file", str(XQUAD), "--question", "Who?"], "--question goes with --context")):
        assert main(["qa", str(qa_run), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert main(["qa", str(ROOT / "configs"), "--question", "a", "--context", "b"]) == 2
