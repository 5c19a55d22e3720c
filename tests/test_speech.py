"""Speech recognition: CTC loss and decoders against brute force over every alignment, the conv + BiLSTM acoustic
model's length and padding contract, the FSDD digit-sequence data, training end to end, and `lamina transcribe`
with its bad-input lines."""

import itertools
import json
import math
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_shared
from lamina.cli.main import main
from lamina.models import create_model
from lamina.tasks.ctc import CTCTask, greedy_decode, prefix_beam_search

TINY = ["data.train_size=48", "data.val_size=8", "data.test_size=8", "model.hidden=16", "model.channels=16",
        "model.layers=1", "data.batch_size=16", "trainer.max_epochs=1", "trainer.progress=false",
        "logging.tensorboard=false", "cost.energy=false"]


def collapse(path, blank=0):
    out, prev = [], None
    for t in path:
        if t != prev and t != blank:
            out.append(t)
        prev = t
    return tuple(out)


def brute_force(lp: torch.Tensor) -> dict:
    """Probability of every labelling: sum over all V^T alignments that collapse to it."""
    T, V = lp.shape
    probs = {}
    for path in itertools.product(range(V), repeat=T):
        p = math.exp(sum(float(lp[t, c]) for t, c in enumerate(path)))
        key = collapse(path)
        probs[key] = probs.get(key, 0.0) + p
    return probs


def test_greedy_merges_repeats_and_drops_blanks():
    best = torch.tensor([[0, 3, 3, 0, 3, 5, 5, 0], [2, 2, 2, 0, 0, 0, 0, 0]])
    logits = F.one_hot(best, 6).float()
    assert greedy_decode(logits, torch.tensor([8, 3])) == [[3, 3, 5], [2]]
    assert greedy_decode(logits, torch.tensor([2, 8])) == [[3], [2]]  # frames past a sequence's length ignored


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prefix_beam_search_finds_the_most_probable_labelling(seed):
    g = torch.Generator().manual_seed(seed)
    lp = F.log_softmax(torch.randn(5, 3, generator=g) * 2, -1)
    probs = brute_force(lp)
    best = max(probs, key=probs.get)
    assert tuple(prefix_beam_search(lp, beam=64)) == best  # a beam as wide as the search space is exact


def test_ctc_loss_is_minus_log_of_the_brute_force_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=g)  # (B, T, V)
    batch = {"y": torch.tensor([[1, 2], [2, 0]]), "y_len": torch.tensor([2, 1]), "out_len": torch.tensor([4, 3])}
    task = CTCTask(["<blank>", "a", "b"])
    loss = task.loss(logits, batch)
    lp = F.log_softmax(logits, -1)
    ref = []
    for i, (target, n) in enumerate([((1, 2), 4), ((2,), 3)]):
        ref.append(-math.log(brute_force(lp[i, :n])[target]) / len(target))  # "mean": per target length, then batch
    assert loss.item() == pytest.approx(sum(ref) / 2, rel=1e-5)


def test_acoustic_model_lengths_and_padding_invariance():
    torch.manual_seed(0)
    m = create_model("ctc_bilstm", hidden=16, channels=16).eval()
    x = torch.randn(3, 50, 40)
    lengths = torch.tensor([50, 31, 10])
    out = m(x, lengths)
    assert out.shape == (3, 25, 11)
    assert m.output_lengths(lengths).tolist() == [25, 16, 5]
    alone = m(x[1:2, :31], torch.tensor([31]))  # the same sequence without padding
    torch.testing.assert_close(out[1:2, :16], alone, rtol=1e-4, atol=1e-5)
    garbage = x.clone()
    garbage[1, 31:] = 100.0  # what lies in the padding must not matter
    torch.testing.assert_close(m(garbage, lengths)[1, :16], out[1, :16], rtol=1e-4, atol=1e-5)


def test_acoustic_model_gradients_and_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    m = create_model("ctc_bilstm", hidden=16, channels=16)
    x, lengths = torch.randn(2, 30, 40), torch.tensor([30, 20])
    F.ctc_loss(F.log_softmax(m(x, lengths), -1).transpose(0, 1), torch.tensor([[1, 2], [3, 3]]),
               m.output_lengths(lengths), torch.tensor([2, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    save_file({k: v.clone() for k, v in m.state_dict().items()}, str(tmp_path / "m.safetensors"))
    twin = create_model("ctc_bilstm", hidden=16, channels=16)
    twin.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    m.eval(), twin.eval()
    assert torch.equal(m(x, lengths), twin(x, lengths))
    with pytest.raises(Exception, match="log-mel frames"):
        m(torch.randn(2, 30, 13))


@needs_shared("fsdd/recordings")
def test_fsdd_sequences_hold_out_speakers_and_are_seeded():
    from lamina.data import load_dataset
    from lamina.errors import DataError

    b = load_dataset("fsdd_sequences", train_size=20, val_size=4, test_size=6, seed=3)
    assert b.meta["speakers"]["test"] == ["george", "theo"] and "theo" not in b.meta["speakers"]["train"]
    y, n = b.train.tensors["y"], b.train.tensors["y_len"]
    assert ((n >= 1) & (n <= 5)).all() and all(((row[:k] >= 1) & (row[:k] <= 10)).all() for row, k in zip(y, n))
    again = load_dataset("fsdd_sequences", train_size=20, val_size=4, test_size=6, seed=3)
    assert torch.equal(again.test.tensors["x"], b.test.tensors["x"])
    with pytest.raises(DataError, match="test_speakers"):
        load_dataset("fsdd_sequences", test_speakers=["nobody"], train_size=2, val_size=1, test_size=1)


def _wav(path, x, rate=8000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@needs_shared("fsdd/recordings")
def test_train_and_transcribe_end_to_end_with_bad_input(tmp_path, capsys):
    from conftest import ROOT

    from lamina.data.audio import read_wav
    from lamina.data.builtin import shared_data_dir

    rc = main(["train", str(ROOT / "configs" / "fsdd_ctc.yaml"), *TINY, f"logging.root={tmp_path}"])
    assert rc == 0
    run = next(tmp_path.glob("fsdd-ctc*"))
    summary = json.loads((run / "summary.json").read_text())
    assert {"test/wer", "test/cer", "test/wer_beam", "test/cer_beam"} <= set(summary["test"])
    rec = shared_data_dir() / "fsdd" / "recordings" / "4_theo_0.wav"
    capsys.readouterr()
    assert main(["transcribe", str(run), str(rec), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["beam"] == 8 and set(out["text"].split()) <= {"zero", "one", "two", "three", "four", "five", "six",
                                                            "seven", "eight", "nine"}
    x, _ = read_wav(rec)
    fast = _wav(tmp_path / "16k.wav", np.repeat(x, 2), 16000)
    silent = _wav(tmp_path / "silent.wav", np.zeros(4000))
    for args, expect in (([str(fast)], "sample rate 16000 Hz"), ([str(silent)], "silent"),
                         ([str(tmp_path / "none.wav")], "not found"), ([str(rec), "--beam", "0"], "--beam")):
        rc = main(["transcribe", str(run), *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and expect in err and len(err.splitlines()) == 1, err
    assert main(["transcribe", str(run), str(fast), "--resample"]) == 0


@needs_shared("fsdd/recordings")
def test_ctc_learns_single_digits(tmp_path):
    """Single-digit utterances, a small model, 96 steps: CTC leaves its all-blank start (loss ~50 -> ~2; the
    benchmark measures WER on held-out speakers, which needs thousands of steps)."""
    from lamina import runs
    from lamina.config import load_config

    cfg = load_config(None, ["data.name=fsdd_sequences", "model.name=ctc_bilstm", "task.name=ctc",
                             "task.label_smoothing=0", "data.train_size=256", "data.val_size=32",
                             "data.test_size=64", "data.min_digits=1", "data.max_digits=1", "model.hidden=32",
                             "model.channels=32", "model.layers=1", "data.batch_size=32", "trainer.max_epochs=12",
                             "optimizer.name=adamw", "optimizer.lr=5e-3", "trainer.monitor=val/wer",
                             "trainer.monitor_mode=min", "trainer.progress=false", "logging.tensorboard=false",
                             "cost.energy=false", f"logging.root={tmp_path}"])
    res = runs.train(cfg)
    first, last = res.history[0]["train/loss"], res.history[-1]["train/loss"]
    assert last < 0.2 * first, (first, last)
    assert math.isfinite(res.summary["test"]["test/wer"])
