"""Deploy: export (ONNX via the dynamo exporter, torch.export programs, int8 ONNX) with parity checks against
PyTorch eager, and an ONNX Runtime runner. onnx / onnxruntime are imported lazily (pip install "lamina[deploy]")."""

from lamina.deploy.export import (FORMATS, UNSUPPORTED, ExportError, ParityError, export_onnx, export_program,
                                  export_run, load_program, parity, quantize_onnx)
from lamina.deploy.runtime import OnnxRunner

__all__ = ["export_run", "export_onnx", "export_program", "load_program", "parity", "quantize_onnx", "OnnxRunner",
           "ExportError", "ParityError", "UNSUPPORTED", "FORMATS"]
