"""`lamina compare`: the table and curves of several runs, the HTML page (also in headless chromium), the links
from each run's report, and the one-line refusals."""

import json
import re
from pathlib import Path

import pytest

from conftest import DIGITS_RUN_ARGS, copy_run
from lamina.cli.main import main
from lamina.errors import ConfigError, DataError
from lamina.report.compare import compare_runs, comparisons, load_runs, sparkline
from lamina.report.html import build_report
from test_report import _load, browser  # noqa: F401  (the headless-chromium fixture and page loader)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, digits_run):
    """The shared digits run (lr 1e-2 default) and the same job at lr 1e-3, both under one root."""
    import torch

    import lamina

    root = tmp_path_factory.mktemp("cmp")
    a = copy_run(digits_run, root / "digits-a")
    n = torch.get_num_threads()
    try:
        b = lamina.train(lamina.load_config(None, [*DIGITS_RUN_ARGS, "name=digits-b", "optimizer.lr=0.001",
                                                   f"logging.root={root}"])).run_dir
    finally:
        torch.set_num_threads(n)
    return Path(a), Path(b)


def test_sparkline_hand_computed():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([3, 3, 3]) == "▅▅▅"  # flat: the middle cell
    assert sparkline([0, 0, 8, 8], width=2) == "▁█"  # resampled: the mean of each half
    assert sparkline([1, 2], lo=0, hi=4) == "▃▅"  # a shared scale: 1/4 -> cell 2, 2/4 -> cell 4 (of 0..7)
    assert sparkline([float("nan"), None]) == ""


def test_compare_table_curves_page_and_report_links(two_runs, tmp_path):
    a, b = two_runs
    r = compare_runs([a, b], tmp_path / "cmp.html")
    assert [row["run"] for row in r["rows"]] == ["digits-a", "digits-b"]
    sa = json.loads((a / "summary.json").read_text())
    row = r["rows"][0]
    assert row["test/acc"] == sa["test"]["test/acc"] and row["params"] == sa["params"] and row["epochs"] == 4
    assert row["best"] == sa["best_monitor"] and row["task"] == "classification" and row["data"] == "digits"
    assert r["rows"][1]["test/acc"] != row["test/acc"]  # a different lr trained a different model
    assert {"train/loss", "val/loss", "val/acc", "lr"} <= set(r["curves"])
    epochs, losses = r["curves"]["train/loss"]["digits-b"]
    assert epochs == [1.0, 2.0, 3.0, 4.0] and len(losses) == 4
    page = r["page"].read_text()
    assert page.count("<tr>") == 3  # header + one row per run
    assert re.findall(r'src="([^"]*)"', page)[0].startswith("data:image/png;base64,")
    assert "<script" not in page
    for run in (a, b):  # each run records the page, and its report links to it by a relative path
        assert str((tmp_path / "cmp.html").resolve()) in [e["page"] for e in comparisons(_folder(run))]
        report = build_report(run).read_text()
        href = re.search(r'<section id="comparisons">.*?href="([^"]+)"', report).group(1)
        assert not href.startswith("/") and (run / href).resolve() == (tmp_path / "cmp.html").resolve()


def _folder(path):
    from lamina.runs import RunFolder

    return RunFolder(path)


def test_compare_page_in_headless_chromium(browser, two_runs, tmp_path):  # noqa: F811
    r = compare_runs(list(two_runs), tmp_path / "cmp <&>.html")
    logs, broken, n = _load(browser, r["page"])
    assert logs == [] and broken == 0 and n == 1, (logs, broken, n)
    rows = browser.execute_script("return document.querySelectorAll('#runs tbody tr').length")
    assert rows == 2
    assert browser.title == "lamina compare: 2 runs"


def test_cli_compare_prints_table_and_sparklines(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert main(["compare", str(a), str(b), "--html", str(tmp_path / "c.html")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "c.html")
    assert "digits-a" in err and "digits-b" in err and "test/acc" in err
    assert re.search(r"digits-b\s+[▁▂▃▄▅▆▇█]{4}\s", err)  # 4 epochs: 4 cells


def test_default_page_lands_beside_the_first_run(two_runs):
    runs = load_runs(list(two_runs))
    from lamina.report.compare import default_page

    assert default_page(runs) == two_runs[0].parent / "compare-digits-a-digits-b.html"


def _edit_summary(run: Path, **changes) -> Path:
    s = json.loads((run / "summary.json").read_text())
    for k, v in changes.items():
        if v is None:
            s.pop(k, None)
        else:
            s[k] = v
    (run / "summary.json").write_text(json.dumps(s))
    return run


@pytest.mark.parametrize("case, expected", [
    ("not-a-run", "not a run folder"),
    ("one", "needs at least two different run folders, got 1"),
    ("same-twice", "needs at least two different run folders, got 1"),
    ("old-version", "written by lamina 0.0.3, this is lamina"),
    ("no-version", "summary.json has no lamina_version (written by a lamina older than 0.1"),
    ("other-task", "runs of different tasks (classification, regression)"),
])
def test_bad_input_is_one_line_exit_2(case, expected, two_runs, tmp_path, capsys):
    a, b = two_runs
    if case == "not-a-run":
        args = [str(a), str(tmp_path)]
    elif case == "one":
        args = [str(a)]
    elif case == "same-twice":
        args = [str(a), str(a) + "/"]
    else:
        c = copy_run(b, tmp_path / "c")
        edit = {"old-version": {"lamina_version": "0.0.3"}, "no-version": {"lamina_version": None},
                "other-task": {"task": "regression"}}[case]
        args = [str(a), str(_edit_summary(c, **edit))]
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    errors = (ConfigError,) if case in ("one", "same-twice", "other-task") else (DataError,)
    with pytest.raises(errors):
        load_runs(args)


@pytest.mark.parametrize("html, expected", [("nowhere/c.html", "--html: folder"), ("c.txt", "expected a .html")])
def test_bad_html_path_is_one_line_exit_2(html, expected, two_runs, tmp_path, capsys):
    assert main(["compare", *map(str, two_runs), "--html", str(tmp_path / html)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
