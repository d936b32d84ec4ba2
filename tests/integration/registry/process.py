"""Runs `modelplane serve registry` as a separate process, as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def start_registry(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """Starts the registry on port 0; returns the process and its address once its
    serving line is printed (printed only after the server listens)."""
    command = [
        sys.executable,
        "-m",
        "modelplane.cli.main",
        "serve",
        "registry",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--log-level",
        "WARNING",
        *extra,
    ]
    env = {**os.environ, "MODELPLANE_REGISTRY_TRACING_ENABLED": "false"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "serving":
                return process, str(event["address"])
    process.wait(10)
    raise RuntimeError(f"registry exited with {process.returncode} before serving")


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    if process.stdout is not None:
        process.stdout.close()
