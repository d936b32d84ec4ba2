"""Typed Python clients of the modelplane services."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelplane.client.inference import CannotConnect, InferenceClient, Prediction

__all__ = ["CannotConnect", "InferenceClient", "Prediction"]

# Loaded on first use: the inference client brings in the `inference` protobuf package,
# which cannot share a process with tritonclient's copy of it, and a caller of the
# registry client alone should not pay for it or meet that clash.
_LAZY = {name: "modelplane.client.inference" for name in __all__}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
