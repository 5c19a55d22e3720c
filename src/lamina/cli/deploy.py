"""The export verb: ONNX and torch.export with an automatic parity check."""

from __future__ import annotations


def add_parsers(sub) -> None:
    pass


COMMANDS: dict = {}
