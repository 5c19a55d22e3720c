"""Scaling-law sweeps (lamina.search.scaling, `lamina scale`): the fitter recovers known exponents, the compute
rule gives the right steps, N leaves the embeddings out, a tiny sweep runs end to end and resumes, bad input is
one line."""

import json
import math

import numpy as np
import pytest
import torch

from lamina.cli.main import main
from lamina.config import load_config
from lamina.errors import ConfigError
from lamina.models import create_model
from lamina.search.scaling import (Budget, count_parameters, fit_chinchilla, fit_pure_power, fit_size_law,
                                   fit_sweep, make_budgets, parse_sizes, plan_sweep, plot_scaling, predict,
                                   steps_for)

from conftest import ROOT, needs_shared

E, A, ALPHA, B, BETA = 1.4, 60.0, 0.35, 400.0, 0.4


def _noisy(clean, noise, seed):
    return clean * np.exp(np.random.default_rng(seed).normal(0.0, noise, len(clean)))


# ----- the fitter -------------------------------------------------------------------------------------------
def test_size_law_recovers_a_known_exponent_and_its_bootstrap_interval_covers_it():
    N = np.geomspace(1e4, 1e6, 8)
    L = _noisy(E + A * N ** -ALPHA, 0.003, seed=0)  # 0.3% noise, about the spread of repeated tiny LM runs
    r = fit_size_law(N, L, bootstrap=500, seed=0)
    q = r["params"]
    assert abs(q["alpha"] - ALPHA) < 0.02 and abs(q["E"] - E) < 0.05 and abs(q["A"] / A - 1) < 0.15
    lo, hi = r["ci95_bootstrap"]["alpha"]
    assert lo < ALPHA < hi and hi - lo < 0.1
    lo, hi = r["ci95_covariance"]["alpha"]
    assert lo < ALPHA < hi
    assert r["bootstrap"]["fitted"] > 450 and r["r2"] > 0.999 and r["dof"] == 5
    assert np.allclose(predict(r, N), L, rtol=0.01)
    assert np.allclose(np.array(r["residuals"]), L - predict(r, N))


def test_size_law_bootstrap_is_seeded():
    N = np.geomspace(1e4, 1e6, 6)
    L = _noisy(E + A * N ** -ALPHA, 0.005, seed=1)
    a, b = fit_size_law(N, L, bootstrap=100, seed=3), fit_size_law(N, L, bootstrap=100, seed=3)
    assert a["ci95_bootstrap"] == b["ci95_bootstrap"]


def test_chinchilla_form_recovers_both_exponents():
    Ns, Ds = np.geomspace(1e4, 1e6, 6), np.array([1e6, 3e6, 9e6])
    N, D = (m.ravel() for m in np.meshgrid(Ns, Ds))
    L = _noisy(E + A * N ** -ALPHA + B * D ** -BETA, 0.003, seed=0)
    r = fit_chinchilla(N, D, L, bootstrap=300, seed=0)
    q = r["params"]
    assert abs(q["alpha"] - ALPHA) < 0.02 and abs(q["beta"] - BETA) < 0.04 and abs(q["E"] - E) < 0.1
    for name, true in (("alpha", ALPHA), ("beta", BETA)):
        lo, hi = r["ci95_bootstrap"][name]
        assert lo < true < hi, (name, lo, hi)
    assert r["r2"] > 0.999 and r["n_points"] == 18


def test_pure_power_law_is_exact_on_a_straight_line_and_its_intervals_cover_a_noisy_one():
    N = np.geomspace(1e3, 1e5, 5)
    r = fit_pure_power(N, 5.0 * N ** -0.2)
    assert math.isclose(r["params"]["alpha"], 0.2, abs_tol=1e-9) and math.isclose(r["params"]["A"], 5.0, rel_tol=1e-9)
    N = np.geomspace(1e4, 1e6, 8)
    r = fit_pure_power(N, _noisy(3.0 * N ** -0.076, 0.01, seed=0), bootstrap=500)
    assert abs(r["params"]["alpha"] - 0.076) < 0.01 and r["r2_log"] > 0.95
    for key in ("ci95_bootstrap", "ci95_ols"):
        lo, hi = r[key]["alpha"]
        assert lo < 0.076 < hi and hi - lo < 0.03, key


def test_too_few_points_say_so_instead_of_fitting():
    assert "at least 3" in fit_size_law([1e4, 1e5], [3.0, 2.5])["skipped"]
    assert "2 data amounts" in fit_chinchilla([1e4, 1e5, 1e6], [1e6] * 3, [3.0, 2.5, 2.2])["skipped"]
    exact = fit_size_law([1e4, 1e5, 1e6], [3.0, 2.5, 2.3])  # 3 points, 3 parameters: a curve, no interval
    assert "params" in exact and "ci95_bootstrap" not in exact and "exact fit" in exact["note"]


# ----- compute rule and counting ----------------------------------------------------------------------------
def test_compute_rule_gives_d_equal_c_over_6n_and_steps_from_tokens():
    assert Budget("compute", 6e9).tokens(1000) == 1e6 and Budget("tokens", 4e5).tokens(123) == 4e5
    assert steps_for(1e6, 2048) == 488  # 999,424 tokens: the closest whole number of steps
    with pytest.raises(ConfigError, match="budget too small"):
        steps_for(100, 2048)
    with pytest.raises(ConfigError, match="one compute rule"):
        make_budgets([1e6], [1e13])
    with pytest.raises(ConfigError, match="positive"):
        make_budgets(tokens=[1e6, -1])
    assert [b.value for b in make_budgets(compute=[4e13, 1e13, 1e13])] == [1e13, 4e13]


def test_compute_budgets_are_isoflop_profiles_fitted_jointly_and_plotted(tmp_path):
    pts = []
    for C in (1e12, 4e12, 1.6e13):  # synthetic IsoFLOP profiles from a known L(N, D)
        for N in np.geomspace(1e4, 1e6, 6):
            D = C / (6 * N)
            pts.append({"budget": C, "N": float(N), "D": D, "C": C, "label": f"N{N:.0f}",
                        "val_loss": float(E + A * N ** -ALPHA + B * D ** -BETA)})
    fits = fit_sweep(pts, "compute", bootstrap=50)
    per = fits["per_budget"]
    assert all("IsoFLOP" in row["size_law"]["skipped"] for row in per)
    N, D = (np.array([p[k] for p in pts]) for k in ("N", "D"))
    best = [min((p for p in pts if p["budget"] == row["budget"]), key=lambda p: p["val_loss"]) for row in per]
    assert [row["best"]["N"] for row in per] == [b["N"] for b in best]
    assert [row["best"]["N"] for row in per] == sorted(row["best"]["N"] for row in per)  # bigger C, bigger N_opt
    q = fits["joint"]["params"]
    assert abs(q["alpha"] - ALPHA) < 0.01 and abs(q["beta"] - BETA) < 0.01  # noiseless: near exact
    assert np.allclose(predict(fits["joint"], N, D), [p["val_loss"] for p in pts], rtol=1e-3)
    png = plot_scaling({"points": pts, "fits": fits, "rule": "compute"}, tmp_path / "s.png")
    assert png.stat().st_size > 5000


@pytest.fixture
def tiny_text(tmp_path):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then the dog ran to the red door while birds sang".split()
    p = tmp_path / "tiny.txt"
    p.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 3000)))
    return p


def _args(tiny_text):  # one thread: tiny models gain nothing from two, and two spin on a shared machine
    return ["data.name=text", f"data.path={tiny_text}", "data.block_size=16", "data.batch_size=4",
            "data.eval_batch_size=512", "model.name=gpt", "model.n_layer=1", "model.n_head=2", "optimizer.lr=3e-3",
            "schedule.name=cosine", "schedule.warmup_steps=100", "trainer.threads=1"]


def test_plan_scales_steps_schedule_and_compute(tiny_text):
    cfg = load_config(None, _args(tiny_text))
    plans = plan_sweep(cfg, parse_sizes("n_embd=8;n_embd=32"), make_budgets(compute=[1e8]))
    for p in plans:
        n = p.params["non_embedding"]
        assert p.steps == round(1e8 / (6 * n) / 64) and p.tokens == p.steps * 64  # 64 = batch 4 x block 16
        t = p.cfg.trainer
        assert t.max_steps == p.steps and t.max_epochs == 1 and p.cfg.data.steps_per_epoch == p.steps
        assert p.cfg.schedule.name == "cosine" and p.cfg.schedule.warmup_steps == int(0.1 * p.steps)  # 100 capped
    assert plans[0].steps > plans[1].steps  # the smaller model gets more tokens for the same compute


def test_non_embedding_count_of_gpt_by_hand():
    with torch.device("meta"):
        m = create_model("gpt", vocab_size=65, block_size=64, n_layer=2, n_embd=32, n_head=2, bias=False)
    c = count_parameters(m)
    per_block = 4 * 32 * 32 + 2 * 4 * 32 * 32 + 2 * 32  # q, k, v, out; MLP fc + proj (4x); ln_1, ln_2 gains
    assert c["non_embedding"] == 2 * per_block + 32  # + ln_f
    assert c["embedding"] == 65 * 32 + 64 * 32  # wte (tied lm_head, counted once) + wpe
    names = {n for n, _ in m.named_parameters()}
    assert c["total"] == sum(p.numel() for p in m.parameters()) and "lm_head.weight" not in names  # tied
    with torch.device("meta"):
        untied = create_model("gpt", vocab_size=65, block_size=64, n_layer=2, n_embd=32, n_head=2, bias=False,
                              tie_weights=False)
    cu = count_parameters(untied)
    assert cu["non_embedding"] == c["non_embedding"] and cu["embedding"] == c["embedding"] + 65 * 32


def test_parse_sizes_inline_and_yaml(tmp_path):
    assert parse_sizes("n_layer=1,n_embd=32; model.n_layer=2,n_embd=64,bias=false") == [
        {"n_layer": 1, "n_embd": 32}, {"n_layer": 2, "n_embd": 64, "bias": False}]
    f = tmp_path / "sizes.yaml"
    f.write_text("sizes:\n  - {n_layer: 1, n_embd: 32}\n  - {n_layer: 2, n_embd: 64}\n")
    assert parse_sizes(str(f)) == [{"n_layer": 1, "n_embd": 32}, {"n_layer": 2, "n_embd": 64}]
    for bad, msg in ((";", "empty"), ("n_layer", "KEY=VALUE"), ("name=resnet18", "picks the model")):
        with pytest.raises(ConfigError, match=msg):
            parse_sizes(bad)
    f.write_text("sizes: 3\n")
    with pytest.raises(ConfigError, match="sizes:. list"):
        parse_sizes(str(f))


@needs_shared("tinyshakespeare/input.txt")
def test_shakespeare_sizes_file_plans_the_measured_sweep(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "shakespeare_char_gpt.yaml", ["data.batch_size=32"])
    plans = plan_sweep(cfg, parse_sizes(ROOT / "configs" / "shakespeare_char_gpt_sizes.yaml"),
                       make_budgets(tokens=[4e6]))
    assert [p.params["non_embedding"] for p in plans] == [12384, 27792, 55536, 147904, 307920, 787584]
    assert {p.steps for p in plans} == {1953} and {p.cfg.schedule.warmup_steps for p in plans} == {100}
    assert plans[-1].params["total"] == 804096  # + 65 x 128 token table (tied head) + 64 x 128 positions


# ----- end to end -------------------------------------------------------------------------------------------
def test_cli_sweep_writes_json_and_plot_then_resumes_without_retraining(tiny_text, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["scale", *_args(tiny_text), "--sizes", "n_embd=8;n_embd=16;n_embd=32", "--out", str(out),
            "--bootstrap", "50"]
    assert main([*argv, "--tokens", "640"]) == 0
    cap = capsys.readouterr()
    r = json.loads((out / "scaling.json").read_text())
    assert [p["N"] for p in r["points"]] == [888, 3312, 12768]  # 12 C^2 + 3 C: hand count for C = 8, 16, 32
    assert all(p["D"] == 640 and p["steps"] == 10 and p["C"] == 6 * p["N"] * 640 for p in r["points"])
    assert all(0 < p["val_loss"] < math.log(30) for p in r["points"])
    assert "params" in r["fits"]["per_budget"][0]["size_law"]  # 3 sizes: a curve (exact, no interval)
    assert (out / "scaling.png").stat().st_size > 5000
    assert sum("val loss" in ln for ln in cap.err.splitlines()) == 3 and "D=640" in cap.out

    import lamina.runs

    real, calls = lamina.runs.train, []

    def counting(cfg, **kw):
        calls.append(cfg.model.n_embd)
        return real(cfg, **kw)

    monkeypatch.setattr(lamina.runs, "train", counting)
    assert main([*argv, "--tokens", "640,1280"]) == 0
    assert calls == [8, 16, 32]  # only the new budget trained; the three D=640 runs were read back
    err = capsys.readouterr().err
    assert err.count("done before") == 3
    r2 = json.loads((out / "scaling.json").read_text())
    assert len(r2["points"]) == 6 and r2["points"][:3] == r["points"]


def test_cli_fewer_than_three_sizes_trains_but_does_not_fit(tiny_text, tmp_path, capsys):
    assert main(["scale", *_args(tiny_text), "--sizes", "n_embd=8;n_embd=16", "--tokens", "320",
                 "--out", str(tmp_path / "s"), "--bootstrap", "0"]) == 0
    cap = capsys.readouterr()
    assert "no fit" in cap.out and "at least 3" in cap.err
    assert len(json.loads((tmp_path / "s" / "scaling.json").read_text())["points"]) == 2


@pytest.mark.parametrize("extra, msg", [
    (["--sizes", "n_layr=2;n_embd=16;n_embd=32", "--tokens", "640"], "unknown option for model gpt 'n_layr'"),
    (["--sizes", " ; ", "--tokens", "640"], "sizes: empty"),
    (["--sizes", "n_embd=8;n_embd=16;n_embd=32", "--tokens", "0"], "--tokens: budgets must be positive"),
    (["--sizes", "n_embd=8;n_embd=16;n_embd=32", "--tokens=-5e5"], "--tokens: budgets must be positive"),
    (["--sizes", "n_embd=8;n_embd=16;n_embd=32", "--compute", "lots"], "--compute: expected comma-separated"),
    (["--sizes", "n_embd=8;n_embd=16;n_embd=32", "--tokens", "20"], "budget too small"),
    (["--sizes", "n_embd=8;n_embd=16;n_embd=30,n_head=4", "--tokens", "640"], "size 3 (n_embd=30,n_head=4)"),
    (["--sizes", "n_embd=8;n_embd=16;n_embd=32"], "one of the arguments --tokens --compute is required"),
    (["--sizes", "n_embd=8", "--tokens", "640", "--compute", "1e9"], "not allowed with argument"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_text, tmp_path, capsys, extra, msg):
    try:
        rc = main(["scale", *_args(tiny_text), *extra, "--out", str(tmp_path / "s")])
    except SystemExit as e:  # argparse's own errors (missing or clashing options) exit from the parser
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s" / "scaling.json").exists()
