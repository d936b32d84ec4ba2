"""The contracts: checked-in stubs match the protos, and the protos compile for
other languages (the promise of "generated stubs in any language")."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import grpc_tools
import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(
    p.relative_to(ROOT / "protos").as_posix() for p in (ROOT / "protos").rglob("*.proto")
)
WELL_KNOWN = str(Path(grpc_tools.__file__).parent / "_proto")


def protoc(*args: str, full: bool = False) -> None:
    # grpcio-tools' protoc generates Python only; protoc-exe ships the full compiler.
    program = (
        [str(Path(sys.executable).parent / "protoc")]
        if full
        else [sys.executable, "-m", "grpc_tools.protoc"]
    )
    command = [*program, "-I", str(ROOT / "protos"), "-I", WELL_KNOWN, *args, *PROTOS]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_every_proto_is_found():
    assert "inference/grpc_service.proto" in PROTOS
    assert "modelplane/monitoring/v1/monitoring.proto" in PROTOS


def test_checked_in_stubs_match_a_fresh_generation(tmp_path, monkeypatch):
    plugin_dir = Path(sys.executable).parent
    assert (plugin_dir / "protoc-gen-mypy").exists(), "mypy-protobuf is part of the dev extra"
    monkeypatch.setenv("PATH", f"{plugin_dir}{os.pathsep}{os.environ['PATH']}")
    protoc(
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--mypy_out={tmp_path}",
        f"--mypy_grpc_out={tmp_path}",
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated
    stale = [
        str(p)
        for p in generated
        if not (ROOT / "libs" / p).exists()
        or not filecmp.cmp(tmp_path / p, ROOT / "libs" / p, shallow=False)
    ]
    assert not stale, f"run `make proto`: these stubs differ from the protos: {stale}"


@pytest.mark.parametrize("language", ["cpp", "java", "csharp"])
def test_protos_compile_for_other_languages(tmp_path, language):
    protoc(f"--{language}_out={tmp_path}", full=True)
    assert any(tmp_path.rglob("*.*"))


def test_every_proto_says_where_go_and_java_code_lives():
    for proto in PROTOS:
        text = (ROOT / "protos" / proto).read_text()
        assert "option go_package" in text, proto
        assert "option java_package" in text, proto
