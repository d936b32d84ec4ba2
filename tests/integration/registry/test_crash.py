"""A registry process killed in the middle of an upload leaves no version and no
half-written file that could be taken for one; its restart cleans up."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import onnx
import pytest

from modelplane.client.registry import RegistryClient
from modelplane.examples.models import mlp
from modelplane.registry.v1 import registry_pb2 as pb
from tests.integration.registry.process import start_registry, stop
from tests.support import wait_serving_sync, wait_until

pytestmark = pytest.mark.slow


def test_kill_mid_upload_leaves_no_version(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    upload_dir = data_dir / "artifacts" / "tmp"
    model = tmp_path / "model.onnx"
    onnx.save(mlp((8, 16, 3)), model)
    process, address = start_registry(data_dir)
    try:
        wait_serving_sync(address)
        with RegistryClient(address, actor="crash") as client:
            client.create_model("fraud")
            release = threading.Event()

            def chunks() -> Iterator[bytes]:
                yield b"\x08\x0a" * 4096  # a plausible start of an ONNX file
                release.wait(30)  # hold the upload open until the server is killed
                yield b"more"

            outcome: list[BaseException] = []

            def upload() -> None:
                try:
                    client.upload_chunks(pb.UploadMetadata(model="fraud"), chunks())
                except BaseException as exc:
                    outcome.append(exc)

            uploader = threading.Thread(target=upload)
            uploader.start()
            wait_until(lambda: any(p.stat().st_size > 0 for p in upload_dir.iterdir()))
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
            release.set()
            uploader.join(30)
            assert outcome and isinstance(outcome[0], grpc.RpcError)
    finally:
        stop(process)
    assert len(list(upload_dir.iterdir())) == 1  # the crash left its partial file

    process, address = start_registry(data_dir)
    try:
        wait_serving_sync(address)
        assert list(upload_dir.iterdir()) == []  # removed at start
        with RegistryClient(address, actor="crash") as client:
            assert client.get_model("fraud").latest_version == 0
            assert client.list_versions("fraud") == []
            version = client.upload_file(model, pb.UploadMetadata(model="fraud"))
            assert version.version == 1  # the aborted upload consumed no number
    finally:
        stop(process)
