"""User-facing errors.

Every error a user can cause (bad config, unknown name, missing file, wrong input shape, NaN loss,
corrupt checkpoint) is raised as a LaminaError subclass whose message is ONE line naming what is wrong
and what is accepted. The CLI prints `str(err)` and exits with code 2; library users catch the class.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LaminaError(Exception):
    """Base for errors caused by the user's input; message is one line, prefixed by `kind`."""

    kind = "error"

    def __init__(self, message: str):
        # One line, always: a multi-line message would break the CLI contract.
        super().__init__(" ".join(str(message).split()))

    def __str__(self) -> str:  # e.g. "config error: trainer.max_epochs: ..."
        return f"{self.kind}: {self.args[0]}"


class ConfigError(LaminaError, ValueError):
    kind = "config error"


class DataError(LaminaError, ValueError):
    kind = "data error"


class ModelError(LaminaError, ValueError):
    kind = "model error"


class InputShapeError(LaminaError, ValueError):
    kind = "input error"


class CheckpointError(LaminaError, ValueError):
    kind = "checkpoint error"


class TrainingError(LaminaError, RuntimeError):
    kind = "training error"


class MissingDependencyError(LaminaError, ImportError):
    kind = "missing dependency"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown_name(what: str, name: str, choices: Iterable[str]) -> str:
    """The standard message for an unknown registry name: lists what is valid."""
    choices = sorted(choices)
    return f"unknown {what} '{name}'{did_you_mean(name, choices)}; valid: {', '.join(choices)}"
