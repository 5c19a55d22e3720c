"""DataFacts: what a trained model needs to know about its data, saved with every run (data.json) and in every
checkpoint's meta.json, and read back by every tool that opens a run.

Typed so that a misspelt key is an AttributeError at the reading site rather than a silent None, and so that
a hand-edited or foreign data.json is checked once, on load, with one line naming the bad field.
`meta` is the data set's own fitted facts (vocabulary, normalization statistics, categories, ...), the same
dict as `DataBundle.meta`; its keys depend on the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lamina.errors import CheckpointError


@dataclass
class DataFacts:
    name: str  # the data set
    task: str  # the task the run trains (may differ from the data set's own: regression on class labels)
    input_shape: tuple[int | None, ...]  # per sample; None: a free size (text lengths)
    num_outputs: int  # classes, vocabulary size, regression targets, ...
    num_classes: int | None = None
    class_names: list[str] | None = None
    train: int = 0  # split sizes
    val: int = 0
    test: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, bundle, task: str, num_outputs: int) -> "DataFacts":
        s = bundle.summary()
        return cls(name=s["name"], task=task, input_shape=tuple(s["input_shape"]), num_outputs=int(num_outputs),
                   num_classes=s["num_classes"], class_names=bundle.class_names, train=s["train"], val=s["val"],
                   test=s["test"], meta=bundle.meta)

    def to_dict(self) -> dict:
        """The data.json layout (unchanged since the first runs, so old tools read new runs)."""
        return {"name": self.name, "task": self.task, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "train": self.train, "val": self.val, "test": self.test,
                "num_outputs": self.num_outputs, "class_names": self.class_names, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Any, source: str = "data facts") -> "DataFacts":
        """Facts read from a run folder or checkpoint; a missing or mistyped field is one CheckpointError line."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: expected a mapping of data facts, got {type(d).__name__}")

        def need(key, kind, optional=False):
            v = d.get(key)
            if v is None and optional:
                return None
            if not isinstance(v, kind) or isinstance(v, bool):
                raise CheckpointError(f"{source}: data facts field '{key}' is missing or not "
                                      f"{getattr(kind, '__name__', 'valid')} (got {v!r})")
            return v

        shape = need("input_shape", (list, tuple))
        if not all(s is None or (isinstance(s, int) and not isinstance(s, bool)) for s in shape):
            raise CheckpointError(f"{source}: data facts field 'input_shape' must be a list of integers (or null "
                                  f"for a free size), got {shape!r}")
        names = need("class_names", list, optional=True)
        return cls(name=need("name", str), task=need("task", str), input_shape=tuple(shape),
                   num_outputs=need("num_outputs", int), num_classes=need("num_classes", int, optional=True),
                   class_names=[str(n) for n in names] if names is not None else None,
                   train=int(d.get("train") or 0), val=int(d.get("val") or 0), test=int(d.get("test") or 0),
                   meta=need("meta", dict, optional=True) or {})
