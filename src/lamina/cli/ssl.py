"""`lamina ssl` verbs (being built)."""

from __future__ import annotations


def add_parsers(sub) -> None:
    pass


COMMANDS: dict = {}
