"""One inference server over a repository of generated models, shared by the tests of
the Python client and the `predict`/`models` commands (module-scoped: the models load
once per test module)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelplane.examples.models import LIGHT_MLP, mlp, write_model
from tests.integration.inference import models
from tests.integration.inference.conftest import serving

BROKEN = "broken"


def write_repository(root: Path) -> Path:
    write_model(mlp(LIGHT_MLP, seed=3, name="light"), root, "light")
    write_model(models.echo_all_types(), root, "echo")
    write_model(models.lookup(), root, "lookup")
    write_model(models.row_sum(), root, "row_sum")
    # Not ONNX: the server lists it as UNAVAILABLE with the reason.
    (root / BROKEN / "1").mkdir(parents=True)
    (root / BROKEN / "1" / "model.onnx").write_bytes(b"not an onnx model")
    return root


@contextmanager
def served(root: Path) -> Iterator[str]:
    """Yields the address of a server over `write_repository(root)`."""
    with serving(write_repository(root)) as (server, _):
        yield server.address


def onnx_runtime(root: Path, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What ONNX Runtime itself computes for `feeds`, as the reference."""
    session = ort.InferenceSession(
        str(root / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
