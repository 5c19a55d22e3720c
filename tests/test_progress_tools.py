"""The progress protocol on the last long steps of the tools: quantize / prune measuring their variants and
explain's attribution chunks (the protocol and the bar helpers: tests/test_progress.py)."""

import pytest
import torch

from conftest import copy_run
from lamina.engine.callbacks import Callback
from test_progress import Sink, _cli_bar, check_phase


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_run):
    return copy_run(digits_run, tmp_path_factory.mktemp("progress_tools") / "digits")  # compress writes into it


class FitCounter(Callback):
    """A Trainer callback that only counts fits: the fine-tuning's callbacks reach its Trainer."""

    def __init__(self):
        self.fits = 0

    def on_fit_start(self, trainer):
        self.fits += 1


def test_quantize_counts_its_measuring_as_one_phase(run):
    from lamina.compress.run import measure_steps, open_context, quantize_run

    sink = Sink()
    res = quantize_run(run, "dynamic", repeats=2, progress=sink)
    (phase,) = sink.phases()
    steps = measure_steps(open_context(run), 2)  # 5 + 2 forwards at batch 1, 5 + 5 at batch 32, the test batches
    check_phase(phase, 2 * steps)
    assert len(phase) == 2 * steps + 1 and [r["variant"] for r in res["rows"]] == ["fp32", "dynamic"]


def test_prune_fine_tunes_with_callbacks_then_counts_every_row(run):
    from lamina.compress.run import measure_steps, open_context, prune_run

    sink, fits = Sink(), FitCounter()
    res = prune_run(run, "magnitude", 0.5, epochs=0.1, repeats=2, callbacks=[fits], progress=sink)
    (phase,) = sink.phases()  # all measuring after the fine-tuning: one phase
    check_phase(phase, 2 * measure_steps(open_context(run), 2))
    assert fits.fits == 1 and res["weight_sparsity"] > 0.4


def test_channel_prune_measures_its_unfinetuned_copy_with_the_rest(run):
    pytest.importorskip("torch_pruning")
    from lamina.compress.run import measure_steps, open_context, prune_run

    sink = Sink()
    res = prune_run(run, "channels", 0.5, epochs=0.1, repeats=2, progress=sink)
    (phase,) = sink.phases()
    ctx = open_context(run)
    check_phase(phase, 2 * measure_steps(ctx, 2) + measure_steps(ctx, 3))
    fp32, before, after = res["rows"]
    assert before["variant"] == "pruned (no fine-tune)" and before["params"] == after["params"] < fp32["params"]
    assert before["test_acc"] != after["test_acc"]  # the copy kept the weights from before the fine-tuning


@pytest.mark.parametrize("verb", [["quantize", "--method", "dynamic"], ["prune", "--method", "magnitude",
                                                                         "--epochs", "0.1"]])
def test_cli_quantize_and_prune_draw_the_measuring(verb, run, capsys, monkeypatch):
    cap, _ = _cli_bar([verb[0], str(run), *verb[1:], "--repeats", "2", "--json"], "measure", capsys,
                      monkeypatch)
    assert '"fp32"' in cap.out
    if verb[0] == "prune":
        assert "\x1b[1mepoch 1/1" in cap.err  # the fine-tuning's own bar, before the measuring's
