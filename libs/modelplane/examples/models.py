"""Multi-layer perceptrons built with the onnx helper API.

Weights come from a seeded generator so a model is the same on every machine.
The batch dimension is symbolic ("batch") so the dynamic batcher can stack rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelplane.examples import features

# ONNX Runtime 1.2x reads IR version 10 / opset 21 models; newer onnx writes newer ones.
IR_VERSION = 10
OPSET = 17

LIGHT_MLP = (64, 256, 256, 8)
HEAVY_MLP = (512, 2048, 2048, 16)
DEMO_MODEL_NAME = "demo"


def mlp(layers: Sequence[int], seed: int = 0, name: str = "mlp") -> onnx.ModelProto:
    """An MLP with ReLU between layers: input "input" [batch, layers[0]] FP32,
    output "output" [batch, layers[-1]] FP32."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = "input"
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(layers)):
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(bias, f"b{index}"),
        ]
        last = index == len(layers) - 2
        gemm_out = "output" if last else f"h{index}"
        nodes.append(helper.make_node("Gemm", [current, f"w{index}", f"b{index}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"a{index}"]))
            current = f"a{index}"
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", layers[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", layers[-1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_model(model: onnx.ModelProto, repository: Path, name: str, version: int = 1) -> Path:
    """Writes `<repository>/<name>/<version>/model.onnx` and returns its path."""
    path = repository / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def ensure_demo_repository(repository: Path) -> Path:
    """Creates the demo models on first run (later runs reuse them): the light MLP, and
    the scorer whose input is the demo feature bundle (`examples.features`)."""
    path = repository / DEMO_MODEL_NAME / "1" / "model.onnx"
    if not path.exists():
        write_model(mlp(LIGHT_MLP, seed=7, name=DEMO_MODEL_NAME), repository, DEMO_MODEL_NAME)
    if not (repository / features.SCORER / "1" / "model.onnx").exists():
        scorer = mlp((features.WIDTH, 16, 2), seed=5, name=features.SCORER)
        write_model(scorer, repository, features.SCORER)
    return path
