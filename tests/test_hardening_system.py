"""Issue 14: a run folder's metadata cannot make lamina allocate a model its weights do not hold, and what the
machine refuses (a full disk, a file in the way, a name too long, not enough memory) is one line, exit 2."""

import errno
import json
import shutil
import time

import pytest

from lamina.cli.main import main
from lamina.config import load_config
from lamina.errors import CheckpointError
from lamina.runs import open_run, train

FAST = ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false", "trainer.threads=1"]


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return train(load_config(None, [*FAST, f"logging.root={root}", "name=m", "model.name=mlp", "model.width=16",
                                     "trainer.max_epochs=1"])).run_dir


def _edit_meta(run, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(run, out)
    for which in ("best", "last"):
        p = out / "checkpoints" / which / "meta.json"
        meta = json.loads(p.read_text())
        edit(meta)
        p.write_text(json.dumps(meta))
    return out


def test_a_meta_json_declaring_a_huge_model_is_refused_before_allocating(mlp_run, tmp_path):
    # width 10^8 would be 64 x 10^8 floats (25 GB) for the first layer alone
    for key in ("model_options",):
        run = _edit_meta(mlp_run, tmp_path, lambda m: m[key].update(width=100_000_000))
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match=r"meta.json declares a model whose .* is \(100000000, 64\), but "
                                                  r"model.safetensors holds \(16, 64\)") as e:
            open_run(run)
        assert time.perf_counter() - t0 < 10 and "\n" not in str(e.value)


def test_a_meta_json_declaring_more_layers_than_the_file_holds_is_refused(mlp_run, tmp_path):
    run = _edit_meta(mlp_run, tmp_path, lambda m: m["model_options"].update(depth=40_000))
    with pytest.raises(CheckpointError, match="declares a model of .* values but model.safetensors holds"):
        open_run(run)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("data"), "data facts"),
    (lambda m: m["data"].update(num_outputs="ten"), "num_outputs"),
    (lambda m: m.update(config=[1, 2]), "expected a mapping of sections"),
    (lambda m: m.update(model_options=[1]), "model_options must be a mapping"),
])
def test_meta_json_with_missing_keys_or_wrong_types_is_one_line(mlp_run, tmp_path, edit, match):
    run = _edit_meta(mlp_run, tmp_path, edit)
    with pytest.raises(CheckpointError, match=match) as e:
        open_run(run)
    assert "\n" not in str(e.value)


def _one_line(capsys, args) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_a_file_in_place_of_the_run_root_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    line = _one_line(capsys, ["train", *FAST, f"logging.root={tmp_path / 'afile'}", "trainer.max_epochs=1"])
    assert line.startswith("cannot create the folder") and "afile" in line


def test_a_run_name_too_long_for_the_file_system_is_one_line(tmp_path, capsys):
    line = _one_line(capsys, ["train", *FAST, f"logging.root={tmp_path}", "name=" + "x" * 300,
                              "trainer.max_epochs=1"])
    assert line.startswith("file name too long for the file system") and "name=" in line


def test_a_full_disk_is_one_line_and_says_so(tmp_path, capsys, monkeypatch):
    import lamina.runs.folder as folder

    def full(path, text, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(folder, "atomic_write_text", full)
    line = _one_line(capsys, ["train", *FAST, f"logging.root={tmp_path}", "trainer.max_epochs=1"])
    assert line.startswith("disk full: no space left on the device writing") and "config.yaml" in line


def test_out_of_memory_is_one_line_suggesting_a_smaller_batch(tmp_path, capsys, monkeypatch):
    from lamina.engine import Trainer

    def oom(self, *a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(Trainer, "fit", oom)
    line = _one_line(capsys, ["train", *FAST, f"logging.root={tmp_path}", "trainer.max_epochs=1"])
    assert line.startswith("out of memory:") and "data.batch_size" in line


def test_an_unexpected_runtime_error_is_still_a_traceback(tmp_path, monkeypatch):
    from lamina.engine import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # a bug to report, not a user's mistake
        main(["train", *FAST, f"logging.root={tmp_path}", "trainer.max_epochs=1"])


@pytest.mark.parametrize("value,match", [("{not json", "is not JSON"), ("[1, 2]", "is not a JSON object")])
def test_onnx_lamina_metadata_that_is_not_a_json_object_is_one_line(tmp_path, value, match):
    import warnings

    import torch

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from lamina.deploy.runtime import OnnxRunner
    from lamina.errors import DataError

    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(path), dynamo=False)
    m = onnx.load(str(path))
    m.metadata_props.add(key="lamina", value=value)
    onnx.save(m, str(path))
    with pytest.raises(DataError, match=match) as e:
        OnnxRunner(path)
    assert "\n" not in str(e.value)
