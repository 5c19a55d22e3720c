"""The compression verbs: quantize, prune, distill."""

from __future__ import annotations


def add_parsers(sub) -> None:
    pass


COMMANDS: dict = {}
