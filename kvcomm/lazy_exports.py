"""A package's public names, imported on first use: `exporter` builds the module ``__getattr__`` (PEP 562) that
the ``__init__.py`` of kvcomm, actors and cluster use, so ``import kvcomm.names`` stays cheap (no torch, no Ray)
while ``from kvcomm import KVCommEngine`` still works."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def exporter(package: str, homes: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """The ``__getattr__`` of `package`: a name in `homes` (name -> submodule) is imported from its submodule once
    and cached in the package's `namespace`; any other name is an AttributeError. A name in `homes` must not be a
    submodule's: ``from package import name`` would then get the attribute, not the submodule."""
    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        namespace[name] = value
        return value
    return __getattr__


__all__ = ["exporter"]
