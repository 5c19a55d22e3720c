"""Language modeling end to end: window loaders, LM task, GPT training through the runner, generate CLI."""

import json
import math

import pytest
import torch

from lamina import runs
from lamina.cli.main import main
from lamina.config import load_config
from lamina.data.windows import RandomWindowLoader, SequentialWindowLoader
from lamina.errors import DataError
from lamina.tasks import LanguageModelingTask

from conftest import needs_shared

FAST = ["trainer.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def test_random_windows_are_shifted_slices_and_seeded():
    ids = torch.arange(100)
    a = list(RandomWindowLoader(ids, 8, 4, steps_per_epoch=3, seed=1))
    b = list(RandomWindowLoader(ids, 8, 4, steps_per_epoch=3, seed=1))
    assert len(a) == 3
    for x, y in ((d["x"], d["y"]) for d in a):
        assert x.shape == (4, 8) and torch.equal(y, x + 1)  # arange stream: target = next id
        assert int(x.max()) + 1 <= 99
    assert all(torch.equal(p["x"], q["x"]) for p, q in zip(a, b))


def test_sequential_windows_cover_stream_once():
    ids = torch.arange(35)
    batches = list(SequentialWindowLoader(ids, 8, 3))
    x = torch.cat([b["x"] for b in batches])
    assert torch.equal(x.flatten(), torch.arange(32)) and torch.equal(torch.cat([b["y"] for b in batches]).flatten(),
                                                                     torch.arange(1, 33))
    with pytest.raises(DataError, match="fewer than block_size"):
        SequentialWindowLoader(torch.arange(5), 8, 2)


def test_lm_loss_is_uniform_log_v_for_zero_logits():
    task = LanguageModelingTask(vocab_size=7)
    logits = torch.zeros(2, 5, 7)
    batch = {"y": torch.randint(0, 7, (2, 5))}
    assert task.loss(logits, batch).item() == pytest.approx(math.log(7), abs=1e-6)
    m = task.make_metrics()
    task.update_metrics(m, logits, batch)
    assert float(m.compute()["ppl"]) == pytest.approx(7.0, rel=1e-5)


def _text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return p


def test_gpt_learns_repeated_text_and_generates(tmp_path, capsys):
    p = _text(tmp_path)
    args = ["data.name=text", f"data.path={p}", "data.block_size=32", "data.batch_size=16", "data.steps_per_epoch=50",
            "model.name=gpt", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "optimizer.lr=3e-3",
            "schedule.name=constant", "trainer.max_epochs=3", f"logging.root={tmp_path}", "name=lm", *FAST]
    assert main(["train", *args]) == 0
    s = json.loads((tmp_path / "lm" / "summary.json").read_text())
    assert s["task"] == "language_modeling" and s["final"]["val/loss"] < 0.3 and s["train_tokens_per_s"] > 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "lm"), "--prompt", "the quick", "--greedy", "--max-new-tokens", "30"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the quick brown fox jumps over")
    assert main(["generate", str(tmp_path / "lm"), "--prompt", "Z"]) == 2
    assert capsys.readouterr().err.strip() == "data error: character 'Z' is not in the training vocabulary (28 characters)"


def test_token_model_on_image_data_is_rejected(tmp_path):
    from lamina.errors import ConfigError

    with pytest.raises(ConfigError, match="gpt is a token model"):
        runs.train(load_config(None, ["model.name=gpt", f"logging.root={tmp_path}", *FAST]))


@needs_shared("tinyshakespeare/input.txt")
def test_shakespeare_config_short_run(tmp_path, monkeypatch):
    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "shakespeare_char_gpt.yaml",
                      ["trainer.max_steps=60", "data.steps_per_epoch=30", f"logging.root={tmp_path}", *FAST])
    res = runs.train(cfg)
    assert res.summary["steps"] == 60 and res.summary["final"]["val/loss"] < 3.0  # uniform over 65 chars is 4.17
