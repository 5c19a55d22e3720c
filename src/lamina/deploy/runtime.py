"""ONNX Runtime inference for exported lamina models: `OnnxRunner(path).run(x)`.

A thin layer over `onnxruntime.InferenceSession` (CPU execution provider) that knows lamina's metadata: the
exporter stores a JSON dict under the ONNX `metadata_props` key "lamina" (model name, run facts, input and output
names, the Normalize mean/std the model expects, which exporter built the graph), so a server can load a bare
.onnx file and know what to feed it. The HTTP server uses exactly this interface.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lamina.errors import DataError, InputShapeError, MissingDependencyError

METADATA_KEY = "lamina"


def require_onnxruntime():
    """Import onnxruntime, or fail with one line naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError('onnxruntime is not installed; pip install "lamina[deploy]"') from None
    return onnxruntime


class OnnxRunner:
    """An ONNX Runtime session over one .onnx file; `threads`: intra-op threads (None: onnxruntime's default)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = require_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such ONNX file")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph classes
            raise DataError(f"{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        try:
            self.metadata: dict = json.loads(meta) if meta else {}
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{self.path}: its lamina metadata (metadata_props '{METADATA_KEY}') is not JSON "
                            f"({e.__class__.__name__}); export the run again with lamina export") from None
        if not isinstance(self.metadata, dict):
            raise DataError(f"{self.path}: its lamina metadata (metadata_props '{METADATA_KEY}') is not a JSON "
                            f"object (got {type(self.metadata).__name__}); export the run again with lamina export")
        self._inputs = self.session.get_inputs()
        self.input_names: list[str] = [i.name for i in self._inputs]
        self.input_shapes: list[list] = [list(i.shape) for i in self._inputs]  # a free axis is its name ("batch")
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]

    def _feed(self, x) -> dict[str, np.ndarray]:
        if not isinstance(x, dict):
            if len(self.input_names) != 1:
                raise InputShapeError(f"{self.path.name} takes {len(self.input_names)} inputs "
                                      f"({', '.join(self.input_names)}); pass a dict name -> array")
            x = {self.input_names[0]: x}
        missing = [n for n in self.input_names if n not in x]
        if missing:
            raise InputShapeError(f"{self.path.name}: missing input '{missing[0]}'; inputs are "
                                  f"{', '.join(self.input_names)}")
        feed = {}
        for spec in self._inputs:
            a = np.asarray(x[spec.name])
            want = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_,
                    "tensor(int32)": np.int32}.get(spec.type)
            if want is not None and a.dtype != want:
                a = a.astype(want)
            if a.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, a.shape)):
                raise InputShapeError(f"{self.path.name}: input '{spec.name}' expects shape "
                                      f"{tuple(spec.shape)}, got {a.shape}")
            feed[spec.name] = a
        return feed

    def run_all(self, x: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output of the graph, in order."""
        return self.session.run(None, self._feed(x))

    def run(self, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """The first output (logits for classifiers and language models) for one batch."""
        return self.run_all(x)[0]


__all__ = ["OnnxRunner", "METADATA_KEY", "require_onnxruntime"]
