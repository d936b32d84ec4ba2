"""Inference benchmark: the standard scenarios of `modelplane.loadtest.scenarios`
(light and heavy MLPs, batching on and off, the ONNX Runtime ceiling, the issue's
three target figures with PASS/MISS). `make bench` runs it; `--help` for options."""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would
# shadow the generated `inference` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

from modelplane.loadtest.scenarios import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
