"""Helpers shared by the reference models: rebuild recipes and data files inside installed packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    """Turn tuples into lists (recursively) so the value survives a JSON round trip."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _recipe(cls: type, **kwargs: Any) -> dict[str, Any]:
    """The ``particlize_recipe`` that rebuilds ``cls(**kwargs)``."""
    return {
        "kind": "callable",
        "target": f"{cls.__module__}:{cls.__qualname__}",
        "kwargs": _jsonable(kwargs),
    }


def _package_file(module: str, *parts: str) -> Path | None:
    """Path of a data file inside an installed top-level package, or None.

    Uses ``find_spec`` so the package is located without being imported (importing
    ``resemblyzer`` itself would pull in librosa, webrtcvad, ...).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # e.g. already imported with no __spec__
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots and module in sys.modules:
        roots = list(getattr(sys.modules[module], "__path__", []))
    for root in roots:
        path = Path(root).joinpath(*parts)
        if path.is_file():
            return path
    return None
