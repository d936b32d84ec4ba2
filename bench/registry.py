"""Registry figures: artifact upload and download throughput and the server's memory.

Starts `modelplane serve registry` as a subprocess (port 0, SQLite, a temporary data
dir), writes a generated ONNX file of --size-mib (default 1024, at most 2047: the
protobuf limit of a single-file ONNX model) with one large
initializer, then uploads it by client streaming and downloads it by server streaming
(1 MiB chunks), and prints:
  - upload MB/s (including hashing, fsync, the ONNX check and registration)
  - download MB/s (including the server's digest verification) and digest match
  - the server's RSS before the transfers and its peak (VmHWM) after each, from
    /proc/<pid>/status: the peak growth is what a transfer costs in memory.
Usage: .venv/bin/python bench/registry.py [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the ONNX writer and process helpers live with the tests

from modelplane.client.registry import RegistryClient, file_sha256  # noqa: E402
from modelplane.registry.v1 import registry_pb2 as pb  # noqa: E402
from tests.integration.registry.large_onnx import write_large_onnx  # noqa: E402
from tests.integration.registry.process import start_registry, stop  # noqa: E402
from tests.support import wait_serving_sync  # noqa: E402

MIB = 1024 * 1024


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak so far) of a process, in KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="artifact size in MiB")
    args = parser.parse_args()
    if not 1 <= args.size_mib <= 2047:
        parser.error("--size-mib must be between 1 and 2047")
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="modelplane-bench-registry-") as tmp:
        work = Path(tmp)
        source = work / "large.onnx"
        started = time.perf_counter()
        digest = write_large_onnx(source, size)
        actual = source.stat().st_size
        print(
            f"artifact: {actual / MIB:.0f} MiB ONNX written in {time.perf_counter() - started:.1f}s"
        )
        process, address = start_registry(work / "data")
        try:
            wait_serving_sync(address)
            with RegistryClient(address, actor="bench", transfer_timeout=1800) as client:
                client.create_model("large")
                # Warm the upload path (threads, ONNX checker imports) on a tiny file.
                small = work / "small.onnx"
                write_large_onnx(small, 4096)
                client.upload_file(small, pb.UploadMetadata(model="large"))
                baseline = memory_kib(process.pid)

                started = time.perf_counter()
                version = client.upload_file(
                    source, pb.UploadMetadata(model="large", sha256=digest, size_bytes=actual)
                )
                upload_s = time.perf_counter() - started
                after_upload = memory_kib(process.pid)

                target = work / "copy.onnx"
                started = time.perf_counter()
                meta = client.download("large", target, version=version.version)
                download_s = time.perf_counter() - started
                after_download = memory_kib(process.pid)
                matched = meta.artifact.sha256 == digest == file_sha256(target)
        finally:
            stop(process)

    mb = actual / 1e6
    print(f"upload:   {mb / upload_s:8.1f} MB/s  ({upload_s:.1f}s, version {version.version})")
    print(f"download: {mb / download_s:8.1f} MB/s  ({download_s:.1f}s, digest match: {matched})")
    print(f"server RSS before transfers: {baseline['VmRSS'] / 1024:.0f} MiB")
    print(
        f"server peak RSS growth: upload {(after_upload['VmHWM'] - baseline['VmHWM']) / 1024:+.0f}"
        f" MiB, upload+download {(after_download['VmHWM'] - baseline['VmHWM']) / 1024:+.0f} MiB"
        f" (artifact {actual / MIB:.0f} MiB)"
    )
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())
