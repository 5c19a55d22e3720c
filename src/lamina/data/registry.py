"""Data set registry: `@register_dataset(name, description)` on a loader function returning a DataBundle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lamina.data.base import DataBundle
from lamina.errors import DataError, unknown_name


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    fn: Callable[..., DataBundle]
    description: str
    task: str
    source: str  # where the bytes come from (package, path), shown by `lamina data`


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, description: str, task: str, source: str):
    def deco(fn):
        if name in _REGISTRY:
            raise RuntimeError(f"dataset '{name}' registered twice")
        _REGISTRY[name] = DatasetEntry(name, fn, description, task, source)
        return fn

    return deco


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset_entry(name: str) -> DatasetEntry:
    if name not in _REGISTRY:
        raise DataError(unknown_name("data set", name, _REGISTRY))
    return _REGISTRY[name]


def load_dataset(name: str, **options) -> DataBundle:
    """Load a registered data set; options go to its loader (split fractions, seed, path, ...)."""
    return get_dataset_entry(name).fn(**options)
