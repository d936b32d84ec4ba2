"""`modelplane predict` and `modelplane models` against a real inference server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelplane.cli.main import main
from tests.integration.inference.served_models import BROKEN, onnx_runtime, served


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def address(root: Path) -> Iterator[str]:
    with served(root) as address:
        yield address


def _run(capsys: pytest.CaptureFixture[str], address: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--address", address])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_prints_outputs_version_and_route(
    address: str, root: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rows = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    (tmp_path / "rows.json").write_text(json.dumps(rows.tolist()))
    code, out, err = _run(
        capsys, address, "predict", "light", "--input", f"input=@{tmp_path / 'rows.json'}"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["model", "light", "version", "1", "route", "-"]
    assert lines[1].split() == ["output", "FP32", "[2,", "8]"]

    code, out, err = _run(
        capsys, address, "predict", "light", "--input", f"input=@{tmp_path / 'rows.json'}", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == "light" and result["model_version"] == "1"
    assert result["route"] is None
    output = result["outputs"]["output"]
    assert output["datatype"] == "FP32" and output["shape"] == [2, 8]
    expected = onnx_runtime(root, "light", {"input": rows})["output"]
    np.testing.assert_allclose(np.array(output["data"], np.float32), expected, rtol=1e-5, atol=1e-6)


def test_inline_rows_npy_files_and_one_row(
    address: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = _run(
        capsys, address, "predict", "row_sum", "--input", "x=[[1,2,3],[4,5,6]]", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["outputs"]["sum"]["data"] == [[6.0], [15.0]]
    # One row without the outer list.
    code, out, err = _run(capsys, address, "predict", "row_sum", "-i", "x=[1, 2.5]", "--json")
    assert code == 0, err
    assert json.loads(out)["outputs"]["sum"]["data"] == [[3.5]]
    # A .npy file of another integer width is cast to the input's INT64.
    np.save(tmp_path / "index.npy", np.array([[2], [1]], dtype=np.int32))
    code, out, err = _run(
        capsys, address, "predict", "lookup", "-i", f"index=@{tmp_path / 'index.npy'}",
        "--routing-key", "customer-7", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["outputs"]["value"]["data"] == [[30.0], [20.0]]


def test_random_inputs_of_every_datatype(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, address, "predict", "echo", "--random", "--rows", "3", "--json")
    assert code == 0, err
    outputs = json.loads(out)["outputs"]
    assert len(outputs) == 13
    assert outputs["out_INT64"]["shape"] == [3, 2] and outputs["out_INT64"]["datatype"] == "INT64"
    assert all(isinstance(v, str) for row in outputs["out_BYTES"]["data"] for v in row)
    assert all(isinstance(v, bool) for row in outputs["out_BOOL"]["data"] for v in row)
    code, out, err = _run(capsys, address, "predict", "echo", "--random", "-o", "out_BYTES")
    assert code == 0, err
    assert out.splitlines()[1].split() == ["out_BYTES", "BYTES", "[1,", "2]"]


def test_large_outputs_are_summarised_in_text_but_whole_in_json(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, address, "predict", "light", "--random", "--rows", "60")
    assert code == 0
    assert "..." in out and len(out.splitlines()) < 30
    code, out, _ = _run(capsys, address, "predict", "light", "--random", "--rows", "60", "--json")
    assert code == 0
    assert np.array(json.loads(out)["outputs"]["output"]["data"]).shape == (60, 8)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["nope", "--random"], 1, "error: NOT_FOUND: model 'nope'"),
        ([BROKEN, "--random"], 1, "error: NOT_FOUND: model 'broken'"),
        (["light", "-i", "wrong=[1]"], 2, "model 'light' has no input 'wrong'; it takes 'input'"),
        (["light", "-i", "input=[1, 2"], 2, "input 'input': '[1, 2' is not valid JSON"),
        (["light", "-i", "input=@/nonexistent/rows.json"], 2, "cannot read /nonexistent/rows.json"),
        (["light"], 2, "model 'light' also takes 'input': give it with --input"),
        (["light", "-i", "input"], 2, "--input must look like NAME=JSON"),
        (["lookup", "-i", "index=[[0.5]]"], 2, "input 'index' is INT64: give integers"),
        (["row_sum", "-i", 'x=[["a"]]'], 2, "input 'x' is FP32: give numbers"),
        (["row_sum", "-i", "x=[[1, 2], [3]]"], 2, "input 'x': rows of different lengths"),
        (["echo", "--random", "-i", "in_UINT8=[[1, 300]]"], 2, "outside 0..255"),
        (["light", "-i", "input=[1, 2]"], 1, "error: INVALID_ARGUMENT: input 'input': shape [1,2]"),
    ],
)
def test_bad_requests_print_one_line_and_exit_non_zero(
    address: str, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    got, out, err = _run(capsys, address, "predict", *argv)
    assert got == code
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err


def test_models_lists_versions_states_digests_and_sources(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, address, "models")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["MODEL", "VERSION", "STATE", "DIGEST", "ROUTES", "SOURCE", "REASON"]
    by_model = {row.split()[0]: row.split() for row in rows}
    assert set(by_model) == {"broken", "echo", "light", "lookup", "row_sum"}
    assert by_model["light"][1:3] == ["1", "READY"]
    assert by_model[BROKEN][1:3] == ["-", "UNAVAILABLE"] and "ONNX" in " ".join(by_model[BROKEN])

    code, out, err = _run(capsys, address, "models", "--json")
    assert code == 0, err
    models = {m["name"]: m["versions"] for m in json.loads(out)}
    (light,) = models["light"]
    assert light["version"] == "1" and light["state"] == "READY"
    # The digest and source are whatever the server reports ("-"/null when it reports none).
    if light["sha256"] is not None:
        assert len(light["sha256"]) == 64
        assert by_model["light"][3] == light["sha256"][:12]
    else:
        assert by_model["light"][3] == "-"
    (broken,) = models[BROKEN]
    assert broken["state"] == "UNAVAILABLE" and broken["reason"] and broken["sha256"] is None


def _refused_address() -> tuple[socket.socket, str]:
    """A bound socket that never listens: connections are refused and no other process
    can take the port meanwhile."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    "argv", [["predict", "light", "--random"], ["models"], ["models", "--json"]]
)
def test_nothing_listening_is_one_clear_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    sock, address = _refused_address()
    with sock:
        start = time.monotonic()
        code, out, err = _run(capsys, address, *argv, "--connect-timeout", "1")
        assert time.monotonic() - start < 15.0
    assert code == 1 and out == ""
    assert err.strip() == f"error: cannot connect to {address} (no server answered within 1 s)"


def test_the_installed_command_reports_a_refused_address(tmp_path: Path) -> None:
    sock, address = _refused_address()
    with sock:
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "modelplane.cli.main", "predict", "demo", "--random",
             "--address", address],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert time.monotonic() - start < 15.0
    assert done.returncode == 1
    assert done.stderr.strip().startswith(f"error: cannot connect to {address}")
    assert "Traceback" not in done.stderr
