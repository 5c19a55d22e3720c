"""Bad input through the CLI: one exact line on stderr, exit code 2, no traceback, no checkpoint damaged."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lamina.cli.main import main
from lamina.data import list_datasets
from lamina.models import list_models

FAST = ["trainer.progress=false", "logging.tensorboard=false", "logging.plots=false"]


def _hashes(run: Path) -> dict:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(digits_run):
    # the shared digits run (conftest): only read here, and check_intact proves no bad input touched its checkpoints
    return digits_run


@pytest.fixture
def check_intact(run_dir):
    before = _hashes(run_dir)
    yield
    assert _hashes(run_dir) == before, "a bad input damaged the earlier run's checkpoints"


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _corrupt_copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "corrupt"
    shutil.copytree(run_dir, dst)
    f = dst / "checkpoints" / "best" / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x55
    f.write_bytes(bytes(b))
    return dst


CASES = [
    ("negative epochs", lambda d, t: ["train", "trainer.max_epochs=-1"],
     "config error: trainer.max_epochs: expected a positive integer, got -1"),
    ("unknown key", lambda d, t: ["train", "trainer.max_epoch=3"],
     "config error: trainer.max_epoch: unknown key (did you mean 'max_epochs'?); valid keys: max_epochs, max_steps, "
     "grad_clip, accumulate, precision, compile, channels_last, deterministic, device, monitor, monitor_mode, early_stopping, "
     "val_every, log_every, progress, threads, strategy, context_parallel, perf"),
    ("unknown optimizer", lambda d, t: ["train", "optimizer.name=rmsprop"],
     "config error: optimizer.name: expected one of 'sgd', 'adam' or 'adamw', got 'rmsprop'"),
    ("zero batch size", lambda d, t: ["train", "data.batch_size=0"],
     "config error: data.batch_size: expected a positive integer, got 0"),
    ("missing config file", lambda d, t: ["train", str(t / "nope.yaml")],
     "config error: config file not found: {t}/nope.yaml"),
    ("invalid yaml", lambda d, t: ["train", str(_write(t / "bad.yaml", "trainer: [1, 2\n"))],
     "config error: {t}/bad.yaml line 2: not valid YAML (expected ',' or ']', but got '<stream end>')"),
    ("yaml list", lambda d, t: ["train", str(_write(t / "list.yaml", "- a\n- b\n"))],
     "config error: {t}/list.yaml: expected a mapping of sections (data, model, trainer, ...), got list"),
    ("not key=value", lambda d, t: ["train", str(_write(t / "ok.yaml", "seed: 1\n")), "trainer"],
     "config error: override 'trainer': expected KEY=VALUE, e.g. trainer.max_epochs=3"),
    ("unknown model", lambda d, t: ["train", "model.name=resnet19", *FAST],
     "model error: unknown model 'resnet19' (did you mean 'resnet18'?); valid: " + ", ".join(list_models())),
    ("unknown model option", lambda d, t: ["train", "model.depth=4", *FAST], None),
    ("unknown data set", lambda d, t: ["train", "data.name=digitz", *FAST],
     "data error: unknown data set 'digitz' (did you mean 'digits'?); valid: " + ", ".join(list_datasets())),
    ("fp16 on cpu", lambda d, t: ["train", "trainer.precision=fp16", "trainer.device=cpu", *FAST],
     "config error: trainer.precision: fp16 needs a CUDA device (got cpu); use bf16 or fp32"),
    ("image model on table", lambda d, t: ["train", "data.name=iris", "model.name=small_cnn", *FAST],
     "config error: model.name: small_cnn is an image model (input (B, C, H, W)) but data set 'iris' gives "
     "per-sample shape (4,); use a vector model such as mlp"),
    ("mlp width mismatch", lambda d, t: ["train", "model.name=mlp", "model.in_features=10", *FAST],
     "input error: model mlp expects input of shape (B, 10), got (B, 1, 8, 8)"),
    ("table target missing", lambda d, t: ["train", "data.name=table", f"data.path={_write(t / 'x.csv', 'a,b,label' + chr(10) + '1,2,x' + chr(10))}",
                                           "data.target=labl", "model.name=mlp", *FAST],
     "data error: target column 'labl' not found (did you mean 'label'?); columns: a, b, label"),
    ("fashion root missing", lambda d, t: ["train", "data.name=fashion_mnist", f"data.root={t}/none", *FAST], None),
    ("eval missing run", lambda d, t: ["eval", str(t / "no_run")],
     "checkpoint error: checkpoint not found: {t}/no_run (expected a run folder or a checkpoint folder with "
     "model.safetensors, state.pt and meta.json)"),
    ("eval non-checkpoint dir", lambda d, t: ["eval", str(t)],
     "checkpoint error: {t} is not a lamina checkpoint (no meta.json; expected a run folder or a checkpoint folder "
     "with model.safetensors, state.pt and meta.json)"),
    ("eval corrupt checkpoint", lambda d, t: ["eval", str(_corrupt_copy(d, t))],
     "checkpoint error: {t}/corrupt/checkpoints/best/model.safetensors is corrupt (sha256 does not match meta.json); "
     "use another checkpoint, e.g. checkpoints/best"),
    ("predict wrong shape", lambda d, t: ["predict", str(d), str(_npy(t / "bad.npy", (3, 5)))],
     "input error: {t}/bad.npy: expected an array of shape (1, 8, 8) or (N, 1, 8, 8), got (3, 5)"),
    ("predict missing file", lambda d, t: ["predict", str(d), str(t / "nope.npy")],
     "data error: input file not found: {t}/nope.npy"),
    ("predict unsupported type", lambda d, t: ["predict", str(d), str(_write(t / "x.txt", "hi"))],
     "data error: {t}/x.txt: unsupported input type '.txt'; accepted: .npy, .pt, .csv, .png, .jpg, .jpeg, .pgm, "
     ".bmp, .ppm"),
    ("resume from nothing", lambda d, t: ["train", "--resume", str(t / "gone")],
     "checkpoint error: checkpoint not found: {t}/gone (expected a run folder or a checkpoint folder with "
     "model.safetensors, state.pt and meta.json)"),
    ("argparse usage", lambda d, t: ["eval"], None),
]


def _npy(path, shape):
    np.save(path, np.zeros(shape, dtype=np.float32))
    return path


@pytest.mark.parametrize("name,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2(name, argv, expected, run_dir, tmp_path, capsys, check_intact, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a failing run writes stays in tmp
    args = argv(run_dir, tmp_path)
    if args[0] == "eval" and len(args) == 1:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["usage error: the following arguments are required: RUN_DIR|CHECKPOINT "
                       "(see `lamina eval --help`)"]
        return
    rc, err = _err(capsys, args)
    assert rc == 2
    assert len(err) == 1, err
    if expected is not None:
        assert err[0] == expected.format(t=tmp_path)
    elif name == "unknown model option":
        assert err[0].startswith("model error: unknown option for model small_cnn 'depth'")
    elif name == "fashion root missing":
        assert err[0].startswith(f"data error: {tmp_path}/none") and "apt-get install dataset-fashion-mnist" in err[0]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "runs").exists() or name.startswith("table")  # nothing written for a rejected config


def test_nan_loss_via_cli(tmp_path, capsys):
    # Targets of 1e30 overflow MSE in float32 at the first step.
    rows = "\n".join(f"{i},{i % 3},{1e30 * (i + 1)}" for i in range(40))
    csv = _write(tmp_path / "huge.csv", "a,b,y\n" + rows + "\n")
    rc, err = _err(capsys, ["train", "data.name=table", f"data.path={csv}", "data.target=y", "model.name=mlp",
                            f"logging.root={tmp_path}", *FAST])
    assert rc == 2
    assert err == ["training error: loss is inf at step 1 (epoch 1); try a lower optimizer.lr or set trainer.grad_clip"]


def test_subprocess_exit_code_and_debug(tmp_path):
    cmd = [sys.executable, "-m", "lamina", "train", "trainer.max_epochs=0"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip() == "config error: trainer.max_epochs: expected a positive integer, got 0"
    p = subprocess.run([*cmd[:4], "--debug", cmd[-1]], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" in p.stderr
