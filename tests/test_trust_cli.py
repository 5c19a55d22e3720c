"""The trust verbs end to end on a real (tiny) digits run: calibrate, attack, explain, audit, report,
learning-curve; and their bad-input contract (one line, exit 2)."""

import json

import pytest

from conftest import copy_run
from lamina.cli.main import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_run):
    # the shared digits run (conftest), copied: calibrate, attack, audit and report write into it
    return copy_run(digits_run, tmp_path_factory.mktemp("trust") / "digits")


def test_calibrate_prints_ece_before_and_after_and_keeps_accuracy(run, capsys):
    assert main(["calibrate", str(run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["after"]["ece"] < r["before"]["ece"] and r["after"]["acc"] == r["before"]["acc"]
    assert main(["calibrate", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("temperature ") and "before" in out and "after" in out


def test_attack_prints_clean_vs_robust_and_pgd_lowers_accuracy(run, capsys):
    assert main(["attack", str(run), "--eps", "0.1", "--steps", "10", "-n", "200"]) == 0
    out = capsys.readouterr().out
    clean = float(out.split("clean accuracy")[1].split()[0])
    robust = float(out.split("robust accuracy")[1].split()[0])
    assert "pgd linf eps 0.1, 10 steps on 200 test samples" in out and robust < clean - 0.1


def test_audit_computes_the_applicable_parts_and_writes_the_report(run, capsys):
    assert main(["audit", str(run), "-n", "100", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    for part in ("calibration", "gradients", "explain", "robust"):
        assert any(line.startswith(part) and "skipped" not in line for line in out.splitlines()), (part, out)
    assert "fairness     skipped  the run's data carry no group metadata" in out
    page = (run / "report.html").read_text()
    for sid in ("calibration", "gradients", "explanations", "robustness"):
        assert f'<section id="{sid}">' in page
    assert main(["report", str(run)]) == 0 and capsys.readouterr().out.strip() == str(run / "report.html")


@pytest.mark.parametrize("argv,msg", [
    (["attack", "{run}", "--eps", "-1"], "eps"),
    (["attack", "{run}", "--attack", "cw"], "unknown attack"),
    (["explain", "{run}", "--method", "lime"], "method"),
    (["fairness", "{run}"], "no group metadata"),
    (["audit", "{run}", "--skip", "speed"], "--skip: unknown part 'speed'"),
    (["report", "{tmp}"], "not a run folder"),
    (["calibrate", "{tmp}"], ""),
    (["learning-curve", "--fractions", "0.5,x"], "--fractions"),
])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, argv, msg):
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and "Traceback" not in err, err


def test_learning_curve_cli_prints_a_row_per_fraction(tmp_path, capsys):
    assert main(["learning-curve", "trainer.max_epochs=1", "model.channels=[8,16]", "logging.plots=false",
                 "--fractions", "0.5,1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in out if ln.strip() and ln.split()[0] in ("0.5", "1")]
    assert [r[0] for r in rows] == ["0.5", "1"] and int(rows[0][1]) < int(rows[1][1])
    assert [int(r[2]) for r in rows] == [2, 1]  # equal optimizer steps: half the data, twice the epochs
    assert (tmp_path / "learning_curve.png").is_file()
