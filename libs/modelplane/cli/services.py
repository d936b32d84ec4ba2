"""Where the CLI finds each service's composition root.

Every `modelplane.services.<name>.main` module exports `Settings` (a
ServiceSettings subclass), `build(settings)` and `run(settings)`, and may export
`add_arguments(parser)` for flags of its own (each flag's dest names a Settings
field).
"""

from __future__ import annotations

import importlib
from types import ModuleType

SERVICES = ("registry", "feature", "inference", "monitoring")

# (gRPC port, metrics port) that `modelplane up` uses. Inference keeps Triton's
# 8001/8002 so tritonclient examples work unchanged.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "registry": (50051, 9091),
    "feature": (50052, 9092),
    "inference": (8001, 8002),
    "monitoring": (50053, 9093),
}


def service_main(name: str) -> ModuleType:
    return importlib.import_module(f"modelplane.services.{name}.main")
