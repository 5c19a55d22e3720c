"""Hardening (issue 14), inputs a user is handed: YAML configs (aliases, size, empty or non-mapping files), the
run report (values from the run folder are escaped), `lamina predict` CSV/array inputs (NaN, inf, empty and
non-numeric cells, empty files) and seeds that do not fit in 64 bits. Each answer is one line naming what is wrong."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from lamina.cli.main import main
from lamina.config.io import MAX_CONFIG_BYTES, load_config, read_yaml
from lamina.data.inputs import read_inputs
from lamina.errors import ConfigError, DataError

BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")))


def _one_line(capsys, argv) -> tuple[int, list[str]]:
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


# ----- 1. YAML configs ------------------------------------------------------------------------------------
def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB)  # 9**9 = 387 million strings once expanded
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^config error: {cfg} line 1: YAML anchors and aliases") as e:
        read_yaml(cfg)
    assert time.perf_counter() - t < 0.5 and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["base: &b {max_epochs: 2}\ntrainer: *b\n",  # alias
                                  "base: &b {max_epochs: 2}\ntrainer:\n  <<: *b\n",  # merge key
                                  "trainer: &t {max_epochs: 2}\n"])  # an anchor alone
def test_anchors_aliases_and_merge_keys_are_refused(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=rf"{cfg} line \d+: YAML anchors and aliases .* are not accepted"):
        read_yaml(cfg)


def test_resume_reads_the_run_config_with_the_same_guard(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(BOMB)
    rc, err = _one_line(capsys, ["train", "--resume", str(run)])  # (the time bound: the test above)
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"config error: {run / 'config.yaml'} line 1: YAML anchors and aliases")


def test_oversized_config_is_refused_before_parsing(tmp_path):
    cfg = tmp_path / "big.yaml"
    cfg.write_text("trainer:\n  max_epochs: 2\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=rf"^config error: {cfg}: config file larger than 1 MiB"):
        read_yaml(cfg)


def test_deeply_nested_config_is_one_line(tmp_path):
    cfg = tmp_path / "deep.yaml"
    cfg.write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(ConfigError, match=rf"^config error: {cfg} line 1: .*nested deeper than"):
        read_yaml(cfg)


@pytest.mark.parametrize("text,says", [("", "empty config file"), ("# only a comment\n", "empty config file"),
                                       ("- trainer\n", "got list"), ("3\n", "got int"), ("hello\n", "got str")])
def test_empty_or_non_mapping_config_names_the_file(tmp_path, capsys, text, says):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=rf"^config error: {cfg}: .*{says}"):
        load_config(cfg)
    rc, err = _one_line(capsys, ["train", str(cfg), "--print-config"])  # not a silent run with the defaults
    assert rc == 2 and len(err) == 1 and str(cfg) in err[0] and says in err[0]


def test_config_that_is_not_utf8_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"trainer: {max_epochs: 2}\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"^config error: {cfg}: not a UTF-8 text file"):
        read_yaml(cfg)


def test_plain_configs_still_load(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 3\ntrainer:\n  max_epochs: 2\n")
    c = load_config(cfg, ["optimizer.lr=1e-3", "data.augment=[{name: hflip}]"])
    assert (c.seed, c.trainer.max_epochs, c.optimizer.lr, c.data.augment) == (3, 2, 1e-3, [{"name": "hflip"}])


# ----- 4. seeds ----------------------------------------------------------------------------------------------
def test_seed_beyond_64_bits_is_one_config_line(capsys):
    rc, err = _one_line(capsys, ["train", "seed=99999999999999999999999", "--print-config"])
    assert rc == 2 and err == ["config error: seed: expected an integer < 9223372036854775808, "
                               "got 99999999999999999999999"]
    with pytest.raises(ConfigError, match=r"^config error: seed: expected an integer >= 0, got -1$"):
        load_config(None, ["seed=-1"])
    assert load_config(None, [f"seed={2**63 - 1}"]).seed == 2**63 - 1


# ----- 2. the report escapes what the run folder says -------------------------------------------------------
X = "<script>alert(1)</script>"


def _hostile_run(tmp_path, typed: bool):
    """A run folder whose files carry X in keys and values. typed=True: numbers where the report formats numbers
    (what a run writes); typed=False: text, ragged metrics rows and wrong types everywhere."""
    num = 0.5 if typed else X
    run = tmp_path / "run"
    (run / "explain").mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: '{X}'\n")
    js = {
        "summary.json": {"test": {f"test/{X}": 0.5, "test/acc": X}, "params": X, "epochs": X, "device": X,
                         "model": X, "task": X, "data": {"name": X, "train": X, "val": 1, "test": 1},
                         "best_epoch": X, "monitor": X, X: X},
        "calibration.json": {"before": {"ece": X, X: 1}, "after": {"ece": 0.1, "nll": X}, "temperature": num,
                             "n_val": X, "n_test": X, "n_bins": X},
        "gradient_health.json": {"findings": [{"kind": X, "layer": X, "value": X, "suggestion": X}],
                                 "report": {X: {"kind": X, "grad_norm": X, X: X}}},
        "attack.json": {"attack": X, "norm": X, "eps": X, "steps": 1, "n": 1, "clean_acc": X, "robust_acc": 0.1},
        "fairness.json": {"group": X, "by_group": {X: {"n": X, "accuracy": 0.5}}, "split": X, "worst_group": X,
                          "overall": {"accuracy": X}},
        "mitigation.json": {"method": X, "group": X, "mitigated_run": X,
                            "summary": {X: {"overall_accuracy": X, "accuracy_by_group": {X: X}}}},
        "learning_curve.json": {"rows": [{"fraction": X, "n_train": 1, "test": X}],
                                "power_law": {"a": num, "b": num}, "error_at_2x": X, "n_for_half_error": X},
        f"explain/{X.replace('/', '_')}.json": {X: X, "method": X},
    }
    if not typed:
        js["gradient_health.json"]["findings"].append(X)
        js["fairness.json"]["by_group"]["g"] = X
        js["mitigation.json"]["summary"]["s"] = X
    for name, obj in js.items():
        (run / name).write_text(json.dumps(obj))
    metrics = f"epoch,train/loss,val/loss,val/{X}\n1,1.0,1.0,{X}\n2,0.5,0.9,{X}\n"
    if not typed:  # text where numbers go, and a ragged row
        metrics += f"{X},0.4,0.8,{X},{X}\n"
    (run / "metrics.csv").write_text(metrics)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16  # curves.png present: no plotting
    for name in ("curves.png", "confusion.png", "calibration.png", f"explain/{X.replace('/', '_')}.png"):
        (run / name).write_bytes(png)
    return run


@pytest.mark.parametrize("typed", [True, False], ids=["values-a-run-writes", "wrong-types-too"])
def test_report_escapes_every_value_from_the_run_folder(tmp_path, typed):
    from lamina.report.html import build_report

    page = build_report(_hostile_run(tmp_path, typed)).read_text()
    assert "<script" not in page.lower() and "alert(1)</" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, as text
    for sid in ("overview", "calibration", "gradients", "robustness", "fairness", "learning-curve", "explanations"):
        assert f'<section id="{sid}">' in page, sid


# ----- 3. predict inputs -------------------------------------------------------------------------------------
VEC = SimpleNamespace(input_shape=(3,), meta={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                                              "feature_names": ["a", "b", "c"]})


@pytest.mark.parametrize("text,says", [
    ("a,b,c\n1,2,3\n4,nan,6\n", "row 3, column 'b': non-finite value 'nan'"),
    ("a,b,c\n1,,3\n", "row 2, column 'b': empty cell"),
    ("1,2,3\n4,5,-inf\n", "row 2, column 3: non-finite value '-inf'"),
    ("1,2,3\n4,5\n", "row 2, column 3: empty cell"),
    ("a,b,c\n1,2,x\n", "row 2, column 'c': not a number: 'x'"),
    ("1,2,1e39\n", "row 1, column 3: value '1e39' is out of float32 range"),
    ("", "empty CSV file"),
    ("\n\n", "empty CSV file"),
    ("a,b,c\n", "no data rows"),
    ("1,2,3\n4,5,6,7\n", "not a readable CSV file"),
])
def test_vector_csv_cells_must_be_finite_numbers(tmp_path, text, says):
    f = tmp_path / "rows.csv"
    f.write_text(text)
    with pytest.raises(DataError) as e:
        read_inputs([str(f)], VEC)
    assert str(e.value).startswith(f"data error: {f}: ") and says in str(e.value) and "\n" not in str(e.value)


def test_vector_csv_of_numbers_still_reads(tmp_path):
    (tmp_path / "h.csv").write_text("c,b,a\n1,2,3\n")
    (tmp_path / "n.csv").write_text("1, 2,3\n4,5,6\n")
    x, names = read_inputs([str(tmp_path / "h.csv"), str(tmp_path / "n.csv")], VEC)
    assert x["x"].tolist() == [[3, 2, 1], [1, 2, 3], [4, 5, 6]] and len(names) == 3


@pytest.mark.parametrize("arr,says", [(np.array([[1, 2, np.nan]], np.float32), "row 1, column 3: non-finite value nan"),
                                      (np.array([1, np.inf, 3]), "row 1, column 2: non-finite value inf")])
def test_arrays_must_be_finite(tmp_path, arr, says):
    f = tmp_path / "x.npy"
    np.save(f, arr)
    with pytest.raises(DataError, match=rf"^data error: {f}: {says}"):
        read_inputs([str(f)], VEC)


@pytest.fixture(scope="module")
def table_facts(tmp_path_factory):
    from lamina.data.files import table

    d = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    lines = ["a,b,c,kind,y"] + [f"{a:.4f},{b:.4f},{c:.4f},{'hi' if c > 0 else 'lo'},{a + b:.4f}" for a, b, c in x]
    (d / "t.csv").write_text("\n".join(lines) + "\n")
    b = table(path=d / "t.csv", target="y")
    return SimpleNamespace(input_shape=tuple(b.train.tensors["x"].shape[1:]), meta=b.meta)


@pytest.mark.parametrize("text,says", [
    ("a,b,c,kind\n1.0,,0.5,hi\n", "row 2, column 'b': empty cell"),
    ("a,b,c,kind\n1.0,0,0.5,hi\n1,NaN,2,lo\n", "row 3, column 'b': non-finite value 'NaN'"),
    ("a,b,c,kind\n1.0,0,inf,hi\n", "row 2, column 'c': non-finite value 'inf'"),
    ("a,b,c,kind\n1.0,zz,0.5,hi\n", "row 2, column 'b': not a number: 'zz'"),
    ("", "empty CSV file"),
    ("a,b,c,kind\n", "no data rows"),
    ("a,a,b,c,kind\n1,1,2,3,hi\n", "column 'a' appears more than once"),
])
def test_table_csv_cells_must_be_finite_numbers(tmp_path, table_facts, text, says):
    f = tmp_path / "rows.csv"
    f.write_text(text)
    with pytest.raises(DataError) as e:
        read_inputs([str(f)], table_facts)
    assert str(e.value).startswith(f"data error: {f}: ") and says in str(e.value) and "\n" not in str(e.value)


def test_table_csv_of_numbers_still_reads(tmp_path, table_facts):
    f = tmp_path / "rows.csv"
    f.write_text("a,b,c,kind\n1.0,0.0,0.5,hi\n0,0,0,\n")  # a missing category is "unknown", as in training
    x, _ = read_inputs([str(f)], table_facts)
    assert x["x"].shape == (2, 5) and bool(x["x"].isfinite().all()) and x["x"][1, 3:].tolist() == [0, 0]
