"""``medvlp prepare``: turn a downloaded dataset into resized tar shards + a manifest, once.

:data:`PREPARERS` maps a dataset name to its :class:`~medvlp.data.prepare.base.Preparer`;
:func:`~medvlp.data.prepare.pipeline.prepare` is the shared pipeline. To add a dataset,
write a module here with a ``Preparer`` subclass decorated by ``@PREPARERS.register(name)``
and list the module in :data:`MODULES` (docs/data/prepare.md walks through it).
"""
from __future__ import annotations

import importlib

from medvlp.registry import Registry

MODULES = ("folder", "mimic", "chexpert", "iu_xray", "roco", "retina", "vqa_rad", "slake", "rsna", "siim")


def _load() -> None:
    for name in MODULES:
        importlib.import_module(f"medvlp.data.prepare.{name}")


PREPARERS = Registry("preparer", _load)


def prepare(*args, **kwargs):
    """See :func:`medvlp.data.prepare.pipeline.prepare` (imported on first use)."""
    from medvlp.data.prepare.pipeline import prepare as run

    return run(*args, **kwargs)
