"""How Arrow's allocator (the mimalloc built into pyarrow) gets memory for a batch job.
mimalloc reads its options from the environment once, when pyarrow is first imported,
so a process must choose before that: the `modelplane` command does for `score batch`,
and the batch benchmark for itself.
This module must not import pyarrow.
"""

from __future__ import annotations

import os
import sys

ALLOW_THP = "MIMALLOC_ALLOW_THP"
BATCH_JOB = {ALLOW_THP: "0"}
"""mimalloc's memory in 4 KiB pages, not transparent huge pages of 2 MiB."""


def for_batch_job() -> bool:
    """Sets BATCH_JOB for this process (a value already in the environment wins).

    Why: where the kernel grants transparent huge pages on request (this machine's
    `madvise` mode), mimalloc asks for them, and the first write to each 2 MiB page
    (mimalloc threading a free list through a fresh page of small objects, or
    decoding into it) has the kernel zero all of it. A batch job decodes and frees its
    chunks' columns on several threads, and perf showed the first run of a 3M-row
    light-MLP job spending 11% of its CPU in that zeroing (1.4% with small pages), most
    of it under `mi_page_free_list_extend`. Measured on that job, 2 CPUs, fresh
    processes in alternation: the reader threads' CPU per row fell from 0.48-0.69 to
    0.29-0.56 µs, and the job went from 0.69-0.76x to 0.73-0.83x of the in-process ONNX
    Runtime ceiling. mimalloc still returns freed memory to the OS as usual.

    Returns whether it takes effect: not once pyarrow is loaded (in-process callers,
    tests)."""
    if "pyarrow" in sys.modules:
        return False
    for name, value in BATCH_JOB.items():
        os.environ.setdefault(name, value)
    return True
