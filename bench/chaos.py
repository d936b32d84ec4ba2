"""Chaos benchmark (`make chaos`): overload, slow clients, SIGKILL and SIGTERM against
the four services as processes on 127.0.0.1; prints one table (see
modelplane.loadtest.chaos). Knobs: MODELPLANE_CHAOS_* (loadtest/chaos/config.py)."""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and bench/inference.py
# would shadow the generated `inference` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

from modelplane.loadtest.chaos.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
