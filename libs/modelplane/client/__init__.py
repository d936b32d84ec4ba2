"""Typed Python clients of the modelplane services."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelplane.client.feature import (
        BundleTensor,
        FeatureClient,
        FeatureServiceError,
        OnlineFeatures,
    )
    from modelplane.client.inference import CannotConnect, InferenceClient, Prediction

__all__ = [
    "BundleTensor",
    "CannotConnect",
    "FeatureClient",
    "FeatureServiceError",
    "InferenceClient",
    "OnlineFeatures",
    "Prediction",
]
_INFERENCE = ["CannotConnect", "InferenceClient", "Prediction"]
_FEATURE = ["BundleTensor", "FeatureClient", "FeatureServiceError", "OnlineFeatures"]

# Loaded on first use: the inference client brings in the `inference` protobuf package,
# which cannot share a process with tritonclient's copy of it, and a caller of the
# registry client alone should not pay for it or meet that clash. The feature client
# has no such clash; it is loaded the same way so that every client is.
_LAZY = {
    **{name: "modelplane.client.inference" for name in _INFERENCE},
    **{name: "modelplane.client.feature" for name in _FEATURE},
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
