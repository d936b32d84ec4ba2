"""Where the load loops run: in this process, or in worker processes when one
Python process cannot keep the server busy (one event loop tops out around a few
thousand requests/s).

Both engines take one `Share` per process and return one `Samples` per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import MutableSequence, Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol

import grpc

from modelplane.client.credentials import ClientCredentials
from modelplane.loadtest.generator import Samples, Share, channel_options, raw_infer, run_share

CONNECT_TIMEOUT_S = 30.0


class EngineError(RuntimeError):
    """The load generator could not connect or a worker failed."""


class Engine(Protocol):
    @property
    def processes(self) -> int: ...

    @property
    def progress(self) -> Sequence[int]:
        """Measured requests completed so far, one counter per process."""
        ...

    async def run(self, shares: Sequence[Share]) -> list[Samples]: ...

    async def close(self) -> None: ...


async def _open_channels(target: str, count: int) -> list[grpc.aio.Channel]:
    # TLS and the token as every client of ours gets them (see modelplane.client.credentials).
    credentials = ClientCredentials.from_env()
    channels = [credentials.aio_channel(target, options=channel_options(i)) for i in range(count)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
    except TimeoutError as exc:
        for channel in channels:
            await channel.close()
        raise EngineError(f"cannot connect to {target} within {CONNECT_TIMEOUT_S:.0f}s") from exc
    return channels


class InlineEngine:
    """Runs the loops on the caller's event loop."""

    def __init__(self, channels: list[grpc.aio.Channel], message: bytes) -> None:
        self._channels = channels
        self._infers = [raw_infer(channel) for channel in channels]
        self._message = message
        self._progress: list[int] = [0]

    @classmethod
    async def connect(cls, target: str, message: bytes, channels: int = 1) -> InlineEngine:
        return cls(await _open_channels(target, channels), message)

    @property
    def processes(self) -> int:
        return 1

    @property
    def progress(self) -> Sequence[int]:
        return self._progress

    async def run(self, shares: Sequence[Share]) -> list[Samples]:
        (share,) = shares
        self._progress[0] = 0
        return [await run_share(self._infers, self._message, share, self._progress)]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def _worker_main(
    conn: Connection, target: str, message: bytes, channels: int, progress: Any, slot: int
) -> None:
    """Entry point of a worker process: connect, then run one share per command."""
    asyncio.run(_worker_loop(conn, target, message, channels, progress, slot))


async def _worker_loop(
    conn: Connection,
    target: str,
    message: bytes,
    channels: int,
    progress: MutableSequence[int],
    slot: int,
) -> None:
    try:
        opened = await _open_channels(target, channels)
    except EngineError as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", None))
    infers = [raw_infer(channel) for channel in opened]
    loop = asyncio.get_running_loop()
    try:
        while True:
            share = await loop.run_in_executor(None, conn.recv)
            if share is None:
                return
            progress[slot] = 0
            try:
                samples = await run_share(infers, message, share, progress, slot)
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                continue
            conn.send(("ok", samples))
    finally:
        for channel in opened:
            await channel.close()


class ProcessEngine:
    """N worker processes (spawned, so no gRPC state is inherited across fork), each
    with its own event loop and channels; the caller's process only coordinates."""

    def __init__(self, processes: int) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._progress = self._context.Array("q", processes, lock=False)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._count = processes

    @classmethod
    async def connect(
        cls, target: str, message: bytes, processes: int, channels: int = 1
    ) -> ProcessEngine:
        engine = cls(processes)
        try:
            for slot in range(processes):
                parent, child = engine._context.Pipe()
                proc = engine._context.Process(
                    target=_worker_main,
                    args=(child, target, message, channels, engine._progress, slot),
                    name=f"loadtest-worker-{slot}",
                    daemon=True,
                )
                proc.start()
                child.close()
                engine._conns.append(parent)
                engine._procs.append(proc)
            await engine._gather("ready")
        except BaseException:
            await engine.close()
            raise
        return engine

    async def _gather(self, expected: str) -> list[Any]:
        loop = asyncio.get_running_loop()

        def receive(conn: Connection) -> tuple[str, Any]:
            try:
                reply: tuple[str, Any] = conn.recv()
            except EOFError:
                return ("error", "worker process exited")
            return reply

        replies = await asyncio.gather(
            *(loop.run_in_executor(None, receive, conn) for conn in self._conns)
        )
        failures = [detail for kind, detail in replies if kind != expected]
        if failures:
            raise EngineError(f"load generator worker failed: {failures[0]}")
        return [detail for _, detail in replies]

    @property
    def processes(self) -> int:
        return self._count

    @property
    def progress(self) -> Sequence[int]:
        return self._progress  # type: ignore[no-any-return]

    async def run(self, shares: Sequence[Share]) -> list[Samples]:
        if len(shares) != len(self._conns):
            raise ValueError(f"{len(shares)} shares for {len(self._conns)} workers")
        for conn, share in zip(self._conns, shares, strict=True):
            conn.send(share)
        return await self._gather("ok")

    async def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        loop = asyncio.get_running_loop()
        for proc in self._procs:
            await loop.run_in_executor(None, proc.join, 10.0)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        self._procs.clear()


async def connect_engine(
    target: str, message: bytes, processes: int = 1, channels: int = 1
) -> Engine:
    if processes < 1:
        raise ValueError("--processes must be at least 1")
    if processes == 1:
        return await InlineEngine.connect(target, message, channels)
    return await ProcessEngine.connect(target, message, processes, channels)
