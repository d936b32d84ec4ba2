"""A process that runs a batch job keeps the Arrow memory a chunk frees for the next
chunks (reuse_freed_buffers): checked in a fresh process, whose default pool it changes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHECK = textwrap.dedent(
    """
    import pyarrow as pa
    from modelplane.scoring.batch import reuse_freed_buffers

    before = pa.default_memory_pool().backend_name
    assert reuse_freed_buffers()
    table = pa.table({"x": list(range(100_000))})
    pool = pa.default_memory_pool()
    print(before, pool.backend_name, pool.bytes_allocated() >= 800_000, table["x"][-1])
    """
)


def test_a_job_process_switches_arrow_to_a_pool_that_keeps_freed_pages():
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["mimalloc", "jemalloc", "True", "99999"]
