"""Name -> class registries for methods, encoders and datasets.

Methods register themselves with their config dataclass, so the config loader can
validate the ``method`` section of a YAML file without knowing any method up front.
Every registered name has a test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Entry:
    obj: Any
    config_class: Any = None
    description: str = ""


class Registry:
    def __init__(self, kind: str, loader: Callable[[], None] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._loader = loader
        self._loaded = False

    def _ensure_loaded(self) -> None:
        if not self._loaded and self._loader is not None:
            self._loaded = True
            self._loader()

    def register(self, name: str, config_class: Any = None, description: str = ""):
        def deco(obj):
            if name in self._entries and self._entries[name].obj is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(obj, config_class, description or (obj.__doc__ or "").strip().split("\n")[0])
            return obj

        return deco

    def get(self, name: str) -> Any:
        self._ensure_loaded()
        if name not in self._entries:
            from medvlp.errors import ConfigError

            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._entries))}")
        return self._entries[name].obj

    def config_class(self, name: str) -> Any:
        self.get(name)
        return self._entries[name].config_class

    def describe(self) -> dict[str, str]:
        self._ensure_loaded()
        return {k: e.description for k, e in sorted(self._entries.items())}

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self):
        self._ensure_loaded()
        return iter(sorted(self._entries))


def _load_methods() -> None:
    """Import every module of :mod:`medvlp.methods` (each registers its recipe on import)."""
    import importlib
    import pkgutil

    import medvlp.methods

    for info in pkgutil.iter_modules(medvlp.methods.__path__):
        importlib.import_module(f"medvlp.methods.{info.name}")


def _load_encoders() -> None:
    import medvlp.models  # noqa: F401


def _load_datasets() -> None:
    import medvlp.data.datasets  # noqa: F401


METHODS = Registry("method", _load_methods)
ENCODERS = Registry("encoder", _load_encoders)
DATASETS = Registry("dataset", _load_datasets)
