"""The serve verb: an HTTP model server with micro-batching."""

from __future__ import annotations


def add_parsers(sub) -> None:
    pass


COMMANDS: dict = {}
