"""ONNX Runtime sessions: execution provider choice, thread budget, tensor signatures."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelplane.kernel.cpu_share import pin_thread, thread_affinity
from modelplane.kernel.errors import FailedPrecondition, InvalidArgument
from modelplane.services.inference.batcher import Tensors, running_alone
from modelplane.services.inference.datatypes import Datatype, from_onnx

log = logging.getLogger("modelplane.inference.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_NAMES = {"cuda": CUDA, "gpu": CUDA, "cpu": CPU}


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    """The providers handed to ONNX Runtime, first preferred, and why."""

    providers: tuple[str, ...]
    reason: str

    @property
    def primary(self) -> str:
        return self.providers[0]


def choose_providers(requested: str, available: Sequence[str]) -> ProviderChoice:
    """CUDA when asked for ("cuda"/"gpu") or allowed ("auto") and present, else CPU.

    An explicit "cuda" on a machine without onnxruntime-gpu's CUDA provider falls back
    to CPU with a reason rather than failing the load: the same model configuration
    then runs on CPU-only replicas too.
    """
    wanted = requested.strip().lower() or "auto"
    if wanted not in ("auto", *PROVIDER_NAMES):
        raise InvalidArgument(f"execution provider '{requested}' is not one of auto, cpu, cuda")
    if wanted == "cpu":
        return ProviderChoice((CPU,), "CPU requested")
    if CUDA in available:
        return ProviderChoice(
            (CUDA, CPU), f"CUDA {'requested' if wanted != 'auto' else 'available'}"
        )
    if wanted == "auto":
        return ProviderChoice((CPU,), "CUDA not available")
    return ProviderChoice((CPU,), "CUDA requested but not available (install onnxruntime-gpu)")


@dataclass(frozen=True, slots=True)
class TensorSignature:
    """A model input or output: its name, datatype and full shape (None = symbolic)."""

    name: str
    datatype: Datatype
    shape: tuple[int | None, ...]


def _signature(arg: ort.NodeArg) -> TensorSignature:
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else None for dim in (arg.shape or ()))
    return TensorSignature(arg.name, from_onnx(arg.type, arg.name), shape)


LONE_SESSION_MAX_BYTES = 1 << 30
"""Largest model file given a lone-batch session: it holds a second copy of the weights."""


class OrtRuntime:
    """One runtime instance: an InferenceSession and its tensor signatures.

    With `lone_cpus` (CPUs besides `cpus` that serve the event loop), a CPU instance keeps
    a second session whose extra intra-op threads run there, for batches that are the only
    work of the process (`running_alone`): a lone request is then computed on every CPU
    instead of one, while the event loop has nothing to do but wait for it. On 2 CPUs the
    heavy demo MLP's row went from ~810 to ~420 µs in ONNX Runtime and the c=1 p50 of a
    served request fell ~24% (issue 19). Under load every batch runs on the first session,
    on `cpus` alone, so the event loop keeps its CPU."""

    def __init__(
        self,
        path: Path,
        providers: ProviderChoice,
        intra_op_threads: int,
        allow_spinning: bool = False,
        cpus: frozenset[int] = frozenset(),
        lone_cpus: frozenset[int] = frozenset(),
    ) -> None:
        self.cpus = cpus
        self.session = _session(path, providers, intra_op_threads, allow_spinning, cpus)
        self.provider = self.session.get_providers()[0]
        self.lone_session: ort.InferenceSession | None = None
        if lone_cpus and self.provider == CPU and path.stat().st_size <= LONE_SESSION_MAX_BYTES:
            # One more intra-op thread per lent CPU, free to run on all of them (the
            # scheduler wakes each on an idle one); the calling (batch) thread stays on
            # `cpus` and computes its share as in the first session.
            self.lone_session = _session(
                path,
                providers,
                intra_op_threads + len(lone_cpus - cpus),
                allow_spinning,
                cpus | lone_cpus,
            )
        self.inputs = tuple(_signature(arg) for arg in self.session.get_inputs())
        self.outputs = tuple(_signature(arg) for arg in self.session.get_outputs())
        self._output_names = [output.name for output in self.outputs]
        self._run = self.session.run
        self._lone_run = self.lone_session.run if self.lone_session is not None else None

    def prepare_thread(self) -> None:
        """Called by the thread that will run this instance's batches (the batcher's):
        it computes too (ONNX Runtime's calling thread takes a share of each operator),
        so it runs on the same CPUs as the intra-op threads."""
        pin_thread(self.cpus)

    def __call__(self, feeds: Tensors) -> dict[str, np.ndarray]:
        run = self._run
        if self._lone_run is not None and running_alone():
            run = self._lone_run
        values = run(self._output_names, feeds)
        return dict(zip(self._output_names, values, strict=True))


def _session(
    path: Path,
    providers: ProviderChoice,
    intra_op_threads: int,
    allow_spinning: bool,
    cpus: frozenset[int],
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, intra_op_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning pool threads burn CPU between batches; a server pays for that CPU.
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
    )
    try:
        # ONNX Runtime starts its intra-op threads here; they inherit this thread's
        # CPUs. (Given an explicit thread count it sets no affinity of its own; left at 0
        # it would pin one thread per core, whatever CPUs the process may use.)
        with thread_affinity(cpus):
            return ort.InferenceSession(
                str(path), sess_options=options, providers=list(providers.providers)
            )
    except Exception as exc:
        raise FailedPrecondition(f"ONNX Runtime cannot load {path.name}: {exc}") from exc


def available_providers() -> list[str]:
    return list(ort.get_available_providers())
