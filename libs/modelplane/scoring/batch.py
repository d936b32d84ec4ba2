"""Batch scoring: a registered model over Parquet/CSV files, a directory of them, or a
SQL query, written as Parquet part files, resumable and exactly once.

The input is split into chunks in a deterministic order: Parquet files (sorted by
path) by row-group ranges read from their footers, so a skipped chunk costs nothing;
CSV files and query results by fixed row ranges of the stream (a skipped chunk is
read and dropped, not scored). A query must therefore return its rows in a
deterministic order (ORDER BY a unique key). Each chunk is read alone (never the whole
input; chunks that split one row group share its decoding), scored in batches of at
most `batch_rows` by ONNX Runtime in process (one run per CPU at once), written to
temporary files, renamed into place and then recorded in the manifest (see manifest.py
for the protocol and why it is exactly once). The local engine (`run_local`) reads
ahead, scores and writes on separate threads; the Ray engine (ray_engine.py) plans the
same chunks and scores them with the same `ChunkScorer` in actors.

Model inputs come either from input columns (`features`: their values, in order, make
the model's float matrix) or, when the registry version names a feature bundle, from
the feature service: each chunk's entity keys and event timestamps go through
`GetTrainingSet` (the point-in-time join), so a row is scored on the feature values in
force at its timestamp, with the bundle's fill values and the version's missing-value
policy, as the inference service would have scored it at that instant. Rows the REJECT
policy refuses are written with null outputs and the reason in `rejected`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from modelplane.client.feature import FeatureClient
from modelplane.registry.v1 import registry_pb2 as rpb
from modelplane.scoring.manifest import (
    PART_PREFIX,
    SUCCESS_NAME,
    TEMP_PREFIX,
    ChunkManifest,
    CommittedChunk,
    fsync_dir,
)
from modelplane.scoring.model import COLUMNS_SUFFIX, ScoringModel

DEFAULT_CHUNK_ROWS = 262_144
DEFAULT_BATCH_ROWS = 16_384
# Rows per GetTrainingSet call: its answer must fit in one gRPC message (64 MiB).
TRAINING_SET_ROWS = 100_000
ROW_COLUMN = "input_row"
"""Each output row's position in the input's deterministic order (0-based)."""
REJECTED_COLUMN = "rejected"
PREPARE_THREADS = 2
"""Chunks read and made into model input at once, ahead of the one being scored."""

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}

FREED_BUFFERS_KEPT_MS = 10_000
"""How long Arrow keeps memory a chunk freed for the next (reuse_freed_buffers)."""


def reuse_freed_buffers() -> bool:
    """Makes Arrow, in this process, keep the memory a chunk frees for the next ones
    (its jemalloc pool, freed pages given back to the OS only after
    FREED_BUFFERS_KEPT_MS) rather than give it back at once, as its default pool
    (mimalloc) does: each chunk allocates the same large buffers again (a heavy
    model's row group of 512-float lists decoded: 134 MB), and the next chunk then
    took fresh pages that the kernel faulted in and zeroed. For a process that runs a
    job (the CLI, a Ray actor): measured on 2 CPUs, the heavy MLP's reader spent ~8 us
    of CPU a row against 5-6.5 with it, and a light job's first run in a process went
    from ~830,000 to ~960,000 rows a second. False where pyarrow has no jemalloc (the
    default pool stays)."""
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        return False
    pa.jemalloc_set_decay_ms(FREED_BUFFERS_KEPT_MS)
    pa.set_memory_pool(pool)
    return True


class BatchInputError(ValueError):
    """The input does not fit the model or the options (missing columns, wrong width,
    wrong types); raised before anything is scored where it can be known then."""


# --- input ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Rows [start, start + rows) of the input (rows may be unknown (-1) until loaded:
    CSV and queries)."""

    chunk_id: str
    start: int
    load: Callable[[], pa.Table]


@dataclass(frozen=True)
class ParquetChunk:
    """One chunk of a Parquet input as plain values (a path and row ranges), so that it
    can be planned in one process and read in another (a Ray actor): rows [begin, stop)
    of the file, whose row groups hold `groups` rows each, are input rows
    [start, start + stop - begin)."""

    chunk_id: str
    start: int
    path: str
    groups: tuple[int, ...]
    begin: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.begin

    def load(self, columns: Sequence[str], cache: RowGroupCache | None = None) -> pa.Table:
        return _parquet_loader(self.path, self.groups, self.begin, self.stop, columns, cache)()


class InputSource(Protocol):
    schema: pa.Schema
    total_rows: int | None

    def identity(self) -> dict[str, Any]: ...

    def chunks(self, columns: Sequence[str], chunk_rows: int, skip: set[str]) -> Iterator[Chunk]:
        """Every chunk in order; those in `skip` may come with a loader that is never
        called (Parquet) or are read and dropped (streams)."""
        ...


class RemoteModel(Protocol):
    """Scores rows elsewhere (the inference service: via_service.py)."""

    def run(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every output for every row of `x`, and each row's version that answered."""
        ...

    def close(self) -> None: ...


def _chunk_id(prefix: str, start: int) -> str:
    return f"{prefix}r{start:012d}"


class FileInput:
    """Parquet or CSV files, or a directory of them (found by pyarrow.dataset)."""

    def __init__(self, paths: Sequence[Path], file_format: str = "") -> None:
        if not paths:
            raise BatchInputError("no input files given")
        fmt = file_format or _format_of(paths[0])
        if fmt not in ("parquet", "csv"):
            raise BatchInputError(f"input format {fmt!r}: expected parquet or csv")
        self.format = fmt
        try:
            dataset = ds.dataset(
                [str(p) for p in paths] if len(paths) > 1 else str(paths[0]), format=fmt
            )
        except (FileNotFoundError, pa.ArrowInvalid) as exc:
            raise BatchInputError(f"cannot read the input: {exc}") from None
        self.files = sorted(dataset.files)
        if not self.files:
            raise BatchInputError(f"no {fmt} files in {', '.join(map(str, paths))}")
        self.schema = dataset.schema
        self._row_groups: list[list[int]] = []
        self.total_rows: int | None = None
        if fmt == "parquet":
            for path in self.files:
                meta = pq.ParquetFile(path).metadata
                self._row_groups.append(
                    [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                )
            self.total_rows = sum(sum(groups) for groups in self._row_groups)

    def identity(self) -> dict[str, Any]:
        files = []
        for path in self.files:
            stat = os.stat(path)
            files.append({"path": os.path.abspath(path), "bytes": stat.st_size})
        return {"format": self.format, "files": files, "rows": self.total_rows}

    def parquet_chunks(self, chunk_rows: int) -> list[ParquetChunk]:
        """Every chunk of a Parquet input, in order (both engines plan with this, so a
        job's chunk ids do not depend on the engine that scores it)."""
        if self.format != "parquet":
            raise BatchInputError(f"{self.format} input: chunks are planned as it is read")
        planned = []
        start = 0
        for index, path in enumerate(self.files):
            groups = tuple(self._row_groups[index])
            for begin, stop in _plan_row_ranges(groups, chunk_rows):
                chunk_id = _chunk_id(f"f{index:05d}-", start)
                planned.append(ParquetChunk(chunk_id, start, path, groups, begin, stop))
                start += stop - begin
        return planned

    def chunks(self, columns: Sequence[str], chunk_rows: int, skip: set[str]) -> Iterator[Chunk]:
        if self.format == "parquet":
            cache = RowGroupCache()
            for planned in self.parquet_chunks(chunk_rows):
                yield Chunk(planned.chunk_id, planned.start, partial(planned.load, columns, cache))
            return
        start = 0
        for index, path in enumerate(self.files):
            prefix = f"f{index:05d}-"
            for table in _csv_tables(path, self.schema, columns, chunk_rows):
                yield Chunk(_chunk_id(prefix, start), start, _loaded(table))
                start += table.num_rows


def _loaded(table: pa.Table) -> Callable[[], pa.Table]:
    return lambda: table


def _format_of(path: Path) -> str:
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
        return "csv" if ".csv" in suffixes and ".parquet" not in suffixes else "parquet"
    return "csv" if path.suffix.lower() == ".csv" else "parquet"


def _plan_row_ranges(groups: Sequence[int], chunk_rows: int) -> list[tuple[int, int]]:
    """[begin, end) row ranges of one file: whole row groups gathered up to about
    `chunk_rows` rows (so a chunk reads only its own groups), a larger group split."""
    ranges: list[tuple[int, int]] = []
    begin = offset = 0
    for size in groups:
        if size > chunk_rows:
            if offset > begin:
                ranges.append((begin, offset))
            parts = math.ceil(size / chunk_rows)
            cuts = [offset + size * k // parts for k in range(parts + 1)]
            ranges.extend(itertools.pairwise(cuts))
            offset += size
            begin = offset
            continue
        if offset + size - begin > chunk_rows:
            ranges.append((begin, offset))
            begin = offset
        offset += size
    if offset > begin:
        ranges.append((begin, offset))
    return ranges


class RowGroupCache:
    """Decoded row groups that consecutive chunks share. A row group larger than
    `chunk_rows` is split into chunks, and Parquet reads whole row groups: without this,
    each of those chunks decoded the whole group again (8 chunks of one 65,536-row group
    of 512-float lists: 8 times the reading, which then took longer than the model).
    Holds the last few groups read (chunks come in order), each decoded once even when
    two reader threads ask for it at the same time."""

    def __init__(self, capacity: int = PREPARE_THREADS + 1) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._groups: OrderedDict[tuple[Any, ...], Future[pa.Table]] = OrderedDict()

    def get(self, key: tuple[Any, ...], read: Callable[[], pa.Table]) -> pa.Table:
        with self._lock:
            found = self._groups.get(key)
            owner = found is None
            if found is None:
                found = self._groups[key] = Future()
                while len(self._groups) > self._capacity:
                    self._groups.popitem(last=False)
            else:
                self._groups.move_to_end(key)
        if owner:
            try:
                found.set_result(read())
            except BaseException as exc:
                with self._lock:
                    self._groups.pop(key, None)
                found.set_exception(exc)
        return found.result()


def _parquet_loader(
    path: str,
    groups: Sequence[int],
    begin: int,
    stop: int,
    columns: Sequence[str],
    cache: RowGroupCache | None = None,
) -> Callable[[], pa.Table]:
    def load() -> pa.Table:
        starts = np.concatenate([[0], np.cumsum(groups)])
        wanted = [i for i in range(len(groups)) if starts[i] < stop and starts[i + 1] > begin]

        def read() -> pa.Table:
            # One thread: this runs beside ONNX Runtime, which has the CPUs; Arrow's own
            # threads only contend with it (measured 2.3x slower on 2 cores). Mapped,
            # not read: reading copied every byte from the page cache into freshly
            # zeroed buffers, on Arrow's I/O threads (a tenth of a light model's job).
            return pq.ParquetFile(path, memory_map=True).read_row_groups(
                wanted, columns=list(columns), use_threads=False
            )

        part_of_one = len(wanted) == 1 and stop - begin < groups[wanted[0]]
        if cache is not None and part_of_one:
            table = cache.get((path, wanted[0], tuple(columns)), read)
        else:
            table = read()
        return table.slice(begin - int(starts[wanted[0]]), stop - begin)

    return load


def _csv_tables(
    path: str, schema: pa.Schema, columns: Sequence[str], chunk_rows: int
) -> Iterator[pa.Table]:
    """The file's rows in tables of `chunk_rows` (the last one shorter), streamed."""
    reader = pa_csv.open_csv(
        path,
        convert_options=pa_csv.ConvertOptions(
            column_types={f.name: f.type for f in schema}, include_columns=list(columns)
        ),
    )
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in reader:
        pending.append(batch)
        held += batch.num_rows
        while held >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, chunk_rows)
            rest = table.slice(chunk_rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


def redact(url: str) -> str:
    """A database URL without its password (identity and messages only)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class SqlInput:
    """The rows of a query on SQLite (`sqlite:///path`) or PostgreSQL (`postgresql://`),
    fetched `chunk_rows` at a time (a server-side cursor on PostgreSQL). The query must
    order its rows deterministically: chunks are row ranges of its result."""

    def __init__(self, query: str, url: str) -> None:
        self.query = query
        self.url = url
        self.total_rows: int | None = None
        scheme = urlsplit(url).scheme
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise BatchInputError(f"--db {redact(url)!r}: expected sqlite:///PATH or postgresql://")
        self.kind = "sqlite" if scheme == "sqlite" else "postgresql"
        first = next(self._tables(1, limit_one=True), None)
        if first is None:
            raise BatchInputError("the query returned no rows")
        self.schema = first.schema

    def identity(self) -> dict[str, Any]:
        return {"format": "sql", "db": redact(self.url), "query": self.query}

    def _tables(self, rows: int, limit_one: bool = False) -> Iterator[pa.Table]:
        if self.kind == "sqlite":
            # sqlite:///relative/path or sqlite:////absolute/path, as SQLAlchemy spells them.
            path = self.url.removeprefix("sqlite:").removeprefix("//").removeprefix("/")
            if not Path(path).is_file():
                raise BatchInputError(f"--db: no SQLite file {path}")
            connection: Any = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            cursor = connection.cursor()
        else:
            import psycopg

            connection = psycopg.connect(self.url)
            cursor = connection.cursor(name=f"modelplane_batch_{uuid.uuid4().hex[:8]}")
        try:
            try:
                cursor.execute(self.query)
            except Exception as exc:
                raise BatchInputError(f"the query failed: {exc}") from None
            names = [d[0] for d in cursor.description]
            while rows_ := cursor.fetchmany(rows):
                columns = list(zip(*rows_, strict=True))
                yield pa.table({n: pa.array(list(c)) for n, c in zip(names, columns, strict=True)})
                if limit_one:
                    return
        finally:
            connection.close()

    def chunks(self, columns: Sequence[str], chunk_rows: int, skip: set[str]) -> Iterator[Chunk]:
        start = 0
        for table in self._tables(chunk_rows):
            selected = table.select(list(columns)).cast(
                pa.schema([self.schema.field(c) for c in columns]), safe=False
            )
            yield Chunk(_chunk_id("q-", start), start, _loaded(selected))
            start += table.num_rows


# --- model inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleJoin:
    """A version's feature bundle, resolved in the feature service's definitions."""

    bundle: str
    version: int
    refs: tuple[str, ...]
    fills: tuple[float, ...]
    join_keys: tuple[str, ...]
    reject_missing: bool


def resolve_bundle(client: FeatureClient, feature_input: rpb.FeatureInput) -> BundleJoin:
    definitions = client.list_definitions()
    bundles = {b.name: b for b in definitions.bundles}
    if feature_input.bundle not in bundles:
        raise BatchInputError(f"the feature service has no bundle {feature_input.bundle!r}")
    bundle = bundles[feature_input.bundle]
    views = {v.name: v for v in definitions.feature_views}
    entities = {e.name: e for e in definitions.entities}
    keys: list[str] = []
    for feature in bundle.features:
        view = views[feature.ref.split(":", 1)[0]]
        for key in entities[view.entity].join_keys:
            if key.name not in keys:
                keys.append(key.name)
    return BundleJoin(
        bundle=bundle.name,
        version=bundle.version,
        refs=tuple(f.ref for f in bundle.features),
        fills=tuple(
            f.fill_value if f.HasField("fill_value") else math.nan for f in bundle.features
        ),
        join_keys=tuple(keys),
        reject_missing=feature_input.missing_policy != rpb.MISSING_FEATURE_POLICY_FILL,
    )


@dataclass(frozen=True)
class ModelFeed:
    """How a chunk becomes the model's input: its name, dtype and width, and the
    columns (or bundle) that fill it."""

    input_name: str
    dtype: Any
    width: int
    features: tuple[str, ...] = ()
    bundle: BundleJoin | None = None


def model_feed(
    model: ScoringModel,
    features: Sequence[str],
    bundle: BundleJoin | None,
    list_width: int = 0,
) -> ModelFeed:
    """`list_width`: the size of a single fixed-size list feature column (a vector per
    row, e.g. an embedding), which then fills the whole input."""
    inputs = model.session.get_inputs()
    wanted = (model.feature_input.input if bundle is not None and model.feature_input else "") or ""
    if wanted:
        chosen = [i for i in inputs if i.name == wanted]
        if not chosen:
            raise BatchInputError(f"the model has no input {wanted!r}")
        spec = chosen[0]
    elif len(inputs) == 1:
        spec = inputs[0]
    else:
        raise BatchInputError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
            "batch scoring feeds one"
        )
    if spec.type not in _ORT_DTYPES:
        raise BatchInputError(f"model input {spec.name!r} is {spec.type}; expected float")
    shape = list(spec.shape)
    if len(shape) != 2:
        raise BatchInputError(f"model input {spec.name!r} has shape {shape}; expected [rows, n]")
    width = len(bundle.refs) if bundle is not None else (list_width or len(features))
    if isinstance(shape[1], int) and shape[1] != width:
        source = (
            f"bundle {bundle.bundle!r} has {width} features"
            if bundle is not None
            else f"--features names {width} columns"
            if not list_width
            else f"column {features[0]!r} holds {width} values"
        )
        raise BatchInputError(
            f"model input {spec.name!r} takes {shape[1]} values per row; {source}"
        )
    return ModelFeed(spec.name, _ORT_DTYPES[spec.type], width, tuple(features), bundle)


def _numeric(column: pa.ChunkedArray | pa.Array, name: str, dtype: Any) -> np.ndarray:
    kind = column.type
    if pa.types.is_boolean(kind):
        column = column.cast(pa.int8())
    elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        raise BatchInputError(f"feature column {name!r} is {kind}; expected numbers")
    if column.null_count:
        column = column.cast(pa.float64()).fill_null(math.nan)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=dtype)


class FeatureColumns:
    """A chunk's model input as columns: one array per feature, in pieces (Arrow's
    record batches), never interleaved into a [rows, width] matrix. The model takes
    them `block` by `block` ([width, rows], see `ScoringModel.by_columns`), each copied
    straight from these arrays on the scoring threads.

    Measured in a light model's job (64 float columns, a 64x256x256x8 MLP, 2 CPUs):
    interleaving the columns into rows in NumPy (a transposing copy, 5.5 ns a value)
    took 0.6-0.75 us of CPU a row, as much as decoding them from Parquet; copying them
    into a column-major matrix still took 0.2-0.3 us; the model takes about 6 us."""

    def __init__(self, pieces: list[list[np.ndarray]], width: int, dtype: Any) -> None:
        self.pieces = [piece for piece in pieces if len(piece[0])]
        self.starts = np.cumsum([0, *(len(piece[0]) for piece in self.pieces)])
        self.shape = (int(self.starts[-1]), width)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def block(self, begin: int, end: int) -> np.ndarray:
        """Rows [begin, end) as a C-contiguous [width, end - begin] array."""
        out = np.empty((self.shape[1], end - begin), self.dtype)
        for piece, start in zip(self.pieces, self.starts.tolist(), strict=False):
            low, high = max(begin, start), min(end, start + len(piece[0]))
            if low < high:
                for j, column in enumerate(piece):
                    out[j, low - begin : high - begin] = column[low - start : high - start]
        return out

    def matrix(self) -> np.ndarray:
        """Every row, as a C-contiguous [rows, width] matrix."""
        return np.ascontiguousarray(self.block(0, len(self)).T)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (input order kept) as a C-contiguous [len(rows), width] matrix."""
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        for piece, start in zip(self.pieces, self.starts.tolist(), strict=False):
            here = (rows >= start) & (rows < start + len(piece[0]))
            if here.any():
                local = rows[here] - start
                for j, column in enumerate(piece):
                    out[here, j] = column[local]
        return out


ModelInput = np.ndarray | FeatureColumns
"""A chunk's model input: a C-contiguous [rows, width] matrix (a list column holding a
vector per row), or its columns."""


def rows_of(x: ModelInput, rows: np.ndarray) -> np.ndarray:
    """Rows of a model input as a [len(rows), width] matrix."""
    return x.take(rows) if isinstance(x, FeatureColumns) else x[rows]


def feature_input(table: pa.Table, feed: ModelFeed) -> ModelInput:
    """The model input of the feature columns: one list column (a vector per row)
    as a matrix, or numeric columns as `FeatureColumns`, record batch by record batch
    (zero-copy where Arrow's values already have the model's dtype and no nulls)."""
    if len(feed.features) == 1 and pa.types.is_fixed_size_list(
        table.schema.field(feed.features[0]).type
    ):
        column = table[feed.features[0]].combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False)
        return np.ascontiguousarray(values.reshape(len(table), -1), dtype=feed.dtype)
    pieces = [
        [_numeric(batch.column(j), name, feed.dtype) for j, name in enumerate(feed.features)]
        for batch in table.select(list(feed.features)).to_batches()
    ]
    if not pieces:
        pieces = [[np.empty(0, feed.dtype) for _ in feed.features]]
    return FeatureColumns(pieces, len(feed.features), feed.dtype)


def bundle_input(
    client: FeatureClient, table: pa.Table, join: BundleJoin, timestamp: str, dtype: Any
) -> tuple[FeatureColumns, np.ndarray]:
    """The bundle's features as of each row's timestamp (GetTrainingSet), as the
    bundle tensor holds them (fill values where not PRESENT), and per row the reason a
    REJECT policy refuses it ('' where none)."""
    entities = table.select([*join.join_keys, timestamp])
    columns = [np.empty(table.num_rows, dtype) for _ in join.refs]
    reasons = np.full(table.num_rows, "", dtype=object)
    for start in range(0, table.num_rows, TRAINING_SET_ROWS):
        part = entities.slice(start, TRAINING_SET_ROWS)
        joined = client.training_set(part, join.bundle, timestamp_column=timestamp, statuses=True)
        stop = start + part.num_rows
        for j, (ref, fill) in enumerate(zip(join.refs, join.fills, strict=True)):
            name = ref.replace(":", "__", 1)
            status = joined[f"{name}__status"].to_numpy(zero_copy_only=False)
            present = status == "PRESENT"
            values = _numeric(joined[name], ref, np.float64).astype(np.float32)
            columns[j][start:stop] = np.where(present, values, np.float32(fill))
            if join.reject_missing:
                missing = (~present) & (reasons[start:stop] == "")
                reasons[start:stop][missing] = [f"{ref} {s}" for s in status[missing]]
    return FeatureColumns([columns], len(join.refs), dtype), reasons


# --- scoring --------------------------------------------------------------------------------


def start_model(
    model: ScoringModel,
    feed: ModelFeed,
    x: ModelInput,
    batch_rows: int,
    pool: ThreadPoolExecutor | None = None,
    threads: int = 1,
) -> Callable[[], dict[str, np.ndarray]]:
    """Queues the model over `x`, `batch_rows` at a time, on `pool`'s `threads` if given
    (ONNX Runtime runs a session concurrently, releasing the GIL); returns what waits
    for every output of every row, in the rows' order. The pool's queue is first in,
    first out: a chunk started before the last one's outputs are waited for keeps
    every thread busy where the last chunk's final batches left one idle. Columns go
    to the model as they are (`ScoringModel.by_columns`)."""
    names = model.output_names
    if isinstance(x, FeatureColumns):
        session = model.by_columns(feed.input_name)
        input_name = feed.input_name + COLUMNS_SUFFIX
        block: Callable[[int, int], np.ndarray] = x.block
    else:
        session, input_name = model.session, feed.input_name
        block = lambda begin, end: x[begin:end]  # noqa: E731
    pieces = math.ceil(len(x) / batch_rows)
    if pool is not None and pieces:
        # As many pieces as threads, or a multiple, of even sizes (at most batch_rows):
        # 6,250 rows in batches of 4,096 and 2,154 kept one thread idle half the time.
        workers = max(1, threads)
        pieces = math.ceil(pieces / workers) * workers
    bounds = [len(x) * k // pieces for k in range(pieces + 1)] if pieces else [0]
    ranges = [(b, e) for b, e in itertools.pairwise(bounds) if e > b]

    def run(rows: tuple[int, int]) -> list[Any]:
        return session.run(None, {input_name: block(*rows)})

    def outputs(results: list[list[Any]]) -> dict[str, np.ndarray]:
        return {
            name: np.concatenate([r[i] for r in results]) if results else np.empty((0,), np.float32)
            for i, name in enumerate(names)
        }

    if pool is not None and len(ranges) > 1:
        futures = [pool.submit(run, rows) for rows in ranges]
        return lambda: outputs([f.result() for f in futures])
    return lambda: outputs([run(rows) for rows in ranges])


def _output_array(values: np.ndarray, mask: np.ndarray | None) -> pa.Array:
    if values.ndim == 1:
        return pa.array(values, mask=mask)
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    width = int(np.prod(values.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(
        flat, width, mask=None if mask is None else pa.array(mask)
    )


@dataclass(frozen=True)
class BatchOptions:
    output: Path
    features: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    timestamp: str = ""
    partition_by: tuple[str, ...] = ()
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    batch_rows: int = DEFAULT_BATCH_ROWS
    chunk_delay_s: float = 0.0
    """Testing only: a pause after each committed chunk, so a test can kill the job
    half way (set by MODELPLANE_SCORE_CHUNK_DELAY_S in the CLI)."""
    progress: bool = True
    monitoring_sample: float = 0.0
    output_db: str = ""
    """A database (sqlite:///PATH or postgresql://...) whose `output_table` receives the
    predictions instead of Parquet files in `output` (db_output.py)."""
    output_table: str = ""
    output_schema: str = ""
    scoring_threads: int = 1
    """Batches scored at once, each on its own thread. With a session of one intra-op
    thread, one per CPU uses the machine better than one run spread over the CPUs:
    a light MLP ran 1.2-1.6x faster on 2 cores (no run waits for its slowest thread,
    which the job's reader and writer threads, or a neighbour, may hold up)."""


@dataclass
class BatchResult:
    rows_scored: int = 0
    rows_skipped: int = 0
    rows_rejected: int = 0
    chunks_scored: int = 0
    chunks_skipped: int = 0
    seconds: float = 0.0
    output: Path | str = field(default_factory=Path)

    @property
    def rows_per_s(self) -> float:
        return self.rows_scored / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"scored {self.rows_scored:,} rows in {self.chunks_scored} chunks "
            f"({self.rows_per_s:,.0f} rows/s, {self.seconds:.1f} s); skipped "
            f"{self.chunks_skipped} committed chunks ({self.rows_skipped:,} rows); "
            f"{self.rows_rejected:,} rows rejected; output {self.output}"
        )


class BatchJob:
    """One job: an input, a loaded model, how it is fed, and the options. `identity()`
    is what the manifest keeps; its `scorer()` turns a chunk's rows into its output.
    The identity leaves the engine out: chunks are planned alike by both engines, so a
    job begun by one may be resumed by the other."""

    def __init__(
        self,
        source: InputSource,
        model: ScoringModel,
        options: BatchOptions,
        feature_client: FeatureClient | None = None,
        monitoring: Any = None,
        service: RemoteModel | None = None,
    ) -> None:
        self.source = source
        self.model = model
        self.options = options
        self.feature_client = feature_client
        self.monitoring = monitoring
        self.service = service
        if options.output_db and options.partition_by:
            raise BatchInputError("--partition-by is for Parquet output, not --output-db")
        bundle: BundleJoin | None = None
        if options.features:
            pass
        elif model.feature_input is not None and model.feature_input.bundle:
            if feature_client is None:
                raise BatchInputError(
                    f"{model.name}/{model.version} is fed by feature bundle "
                    f"{model.feature_input.bundle!r}: give --feature-service (or --features "
                    "to read the model's input from columns)"
                )
            if not options.timestamp:
                raise BatchInputError(
                    "a model fed by a feature bundle needs --timestamp: the input's event "
                    "time column, the instant each row's features are read as of"
                )
            bundle = resolve_bundle(feature_client, model.feature_input)
        else:
            raise BatchInputError("give --features: the input columns of the model's input")
        list_width = 0
        if len(options.features) == 1 and options.features[0] in source.schema.names:
            kind = source.schema.field(options.features[0]).type
            if pa.types.is_fixed_size_list(kind):
                list_width = kind.list_size
        self.feed = model_feed(model, options.features, bundle, list_width)
        self.keys = tuple(options.keys) or (bundle.join_keys if bundle else ())
        needed = [*self.feed.features, *self.keys]
        if options.timestamp:
            needed.append(options.timestamp)
        if bundle is not None:
            needed.extend(bundle.join_keys)
        for name in options.partition_by:
            if name not in (*self.keys, options.timestamp):
                raise BatchInputError(
                    f"--partition-by {name!r}: partition by a --keys or --timestamp column"
                )
        self.columns = list(dict.fromkeys(needed))
        missing = [c for c in self.columns if c not in source.schema.names]
        if missing:
            raise BatchInputError(
                f"the input has no column {', '.join(map(repr, missing))} (it has "
                f"{', '.join(source.schema.names[:40])})"
            )
        if not self.feed.features and bundle is None:
            raise BatchInputError("no model input columns")

    def identity(self) -> dict[str, Any]:
        bundle = self.feed.bundle
        return {
            "input": self.source.identity(),
            "model": {
                "name": self.model.name,
                "version": self.model.version,
                "sha256": self.model.sha256,
            },
            "options": {
                "features": list(self.feed.features),
                "bundle": dataclasses.asdict(bundle) if bundle else None,
                "keys": list(self.keys),
                "timestamp": self.options.timestamp,
                "partition_by": list(self.options.partition_by),
                "chunk_rows": self.options.chunk_rows,
                # Only when set, so that the identity of other jobs is what it was.
                **({"via_service": True} if self.service is not None else {}),
            },
        }

    def job_id(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def scorer(self) -> ChunkScorer:
        return ChunkScorer(
            self.model,
            self.feed,
            self.keys,
            self.options,
            self.feature_client,
            self.monitoring,
            self.service,
        )


@dataclass(frozen=True)
class Scored:
    """A chunk's model outputs (zeros where rejected), which rows were rejected, and
    why."""

    outputs: dict[str, np.ndarray]
    mask: np.ndarray | None
    reasons: np.ndarray | None
    rejected: int
    versions: np.ndarray | None = None
    """Scored through the inference service: each row's version that answered (the
    job's version where rejected); None: the job's version."""


class ChunkPosition(Protocol):
    @property
    def chunk_id(self) -> str: ...
    @property
    def start(self) -> int: ...


class ChunkScorer:
    """What turns a chunk's rows into its committed-to-be part files: the loaded model,
    how it is fed, and the job's options. Built by `BatchJob.scorer()` in process, or
    from its parts in a Ray actor (ray_engine.py), so both engines score and write a
    chunk with the same code."""

    def __init__(
        self,
        model: ScoringModel,
        feed: ModelFeed,
        keys: tuple[str, ...],
        options: BatchOptions,
        feature_client: FeatureClient | None = None,
        monitoring: Any = None,
        service: RemoteModel | None = None,
    ) -> None:
        self.model = model
        self.feed = feed
        self.keys = keys
        self.options = options
        self.feature_client = feature_client
        self.monitoring = monitoring
        self.service = service
        self._pool: ThreadPoolExecutor | None = None
        if options.scoring_threads > 1 and service is None:
            self._pool = ThreadPoolExecutor(options.scoring_threads, thread_name_prefix="score")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def score_chunk(
        self, chunk: ChunkPosition, table: pa.Table
    ) -> tuple[pa.Table, ModelInput, int]:
        """The chunk's output table, its model input and its rejected rows: the
        three steps below in a row (the local engine runs them on three threads)."""
        x, reasons = self.prepare(chunk, table)
        scored = self.predict(x, reasons)
        return self.output_table(chunk, table, scored), x, scored.rejected

    def prepare(
        self, chunk: ChunkPosition, table: pa.Table
    ) -> tuple[ModelInput, np.ndarray | None]:
        """The model input of the chunk's rows and, for a bundle whose policy
        rejects missing features, each row's reason to be rejected ('' where none)."""
        feed = self.feed
        reasons: np.ndarray | None = None
        x: ModelInput
        if feed.bundle is not None:
            assert self.feature_client is not None
            x, reasons = bundle_input(
                self.feature_client, table, feed.bundle, self.options.timestamp, feed.dtype
            )
        else:
            x = feature_input(table, feed)
        if x.shape[1] != feed.width:
            raise BatchInputError(
                f"chunk {chunk.chunk_id}: {x.shape[1]} values per row for a model input of "
                f"{feed.width}"
            )
        return x, reasons

    def predict(self, x: ModelInput, reasons: np.ndarray | None) -> Scored:
        """The model's outputs for every row not rejected."""
        return self.start_predict(x, reasons)()

    def start_predict(self, x: ModelInput, reasons: np.ndarray | None) -> Callable[[], Scored]:
        """Starts the model on every row not rejected (see `start_model`); returns
        what waits for its outputs."""
        if reasons is not None and (reasons != "").any():
            mask = reasons != ""
            wait = self._start(rows_of(x, np.flatnonzero(~mask)))

            def scored_in_part() -> Scored:
                outputs_ok, versions_ok = wait()
                outputs = {}
                for name, values in outputs_ok.items():
                    full = np.zeros((len(x), *values.shape[1:]), dtype=values.dtype)
                    full[~mask] = values
                    outputs[name] = full
                versions = None
                if versions_ok is not None:
                    versions = np.full(len(x), self.model.version, np.int64)
                    versions[~mask] = versions_ok
                return Scored(outputs, mask, reasons, int(mask.sum()), versions)

            return scored_in_part
        wait = self._start(x)

        def scored() -> Scored:
            outputs, versions = wait()
            return Scored(outputs, None, reasons, 0, versions)

        return scored

    def _start(
        self, x: ModelInput
    ) -> Callable[[], tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Outputs of rows `x`, in process (started, see `start_model`) or through the
        inference service (then with each row's version that answered; done at once)."""
        if self.service is not None:
            answered = self.service.run(x.matrix() if isinstance(x, FeatureColumns) else x)
            return lambda: answered
        wait = start_model(
            self.model,
            self.feed,
            x,
            self.options.batch_rows,
            self._pool,
            self.options.scoring_threads,
        )
        return lambda: (wait(), None)

    def output_table(self, chunk: ChunkPosition, table: pa.Table, scored: Scored) -> pa.Table:
        rows = table.num_rows
        scored_at = pa.scalar(time.time_ns() // 1000, pa.timestamp("us", tz="UTC"))
        columns: dict[str, pa.Array | pa.ChunkedArray] = {
            "model": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(rows, np.int32)), pa.array([self.model.name])
            ),
            "model_version": pa.array(
                scored.versions
                if scored.versions is not None
                else np.full(rows, self.model.version, np.int64)
            ),
            ROW_COLUMN: pa.array(np.arange(chunk.start, chunk.start + rows, dtype=np.int64)),
        }
        for key in self.keys:
            columns[key] = table[key]
        if self.options.timestamp:
            columns[self.options.timestamp] = table[self.options.timestamp]
        columns["scored_at"] = pa.array(
            np.full(rows, scored_at.value, np.int64), pa.timestamp("us", tz="UTC")
        )
        for name, values in scored.outputs.items():
            columns[name] = _output_array(values, scored.mask)
        if self.feed.bundle is not None and self.feed.bundle.reject_missing:
            assert scored.reasons is not None
            columns[REJECTED_COLUMN] = pa.array(
                [r or None for r in scored.reasons.tolist()], pa.string()
            )
        return pa.table(columns)

    def write_chunk(self, chunk: ChunkPosition, output: pa.Table) -> list[str]:
        """Writes the chunk's part files (see `write_parts`)."""
        return write_parts(self.options, chunk, output)

    def log_sample(self, job_id: str, output: pa.Table, x: ModelInput, seconds: float) -> None:
        """A deterministic sample of the chunk's rows (by input row) as predictions,
        keyed by job and row so that a re-run logs nothing twice."""
        from modelplane.client.monitoring import prediction_batch

        rate = self.options.monitoring_sample
        rows = output[ROW_COLUMN].to_numpy()
        # A hash of the row number, so the sample spreads over the input.
        hashed = (rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
        chosen = hashed.astype(np.float64) / float(1 << 53) < rate
        if REJECTED_COLUMN in output.column_names:
            chosen &= output[REJECTED_COLUMN].is_null().to_numpy(zero_copy_only=False)
        index = np.flatnonzero(chosen)
        if not len(index):
            return
        outputs = {}
        for name in self.model.output_names:
            column = output[name].take(pa.array(index))
            if pa.types.is_fixed_size_list(column.type):
                width = column.type.list_size
                values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
                outputs[name] = values.reshape(len(index), width)
            else:
                outputs[name] = column.to_numpy().reshape(len(index), 1)
        names = list(self.feed.bundle.refs if self.feed.bundle else self.feed.features)
        if self.options.timestamp:
            times = (
                pc.cast(output[self.options.timestamp].take(pa.array(index)), pa.timestamp("us"))
                .cast(pa.int64())
                .to_numpy()
            )
        else:
            times = np.full(len(index), output["scored_at"][0].value, np.int64)
        # One batch per version that answered: through the inference service a row's
        # version is the one in its model_version column, not necessarily the resolved one.
        versions = output["model_version"].to_numpy()[index]
        batches = []
        for version in np.unique(versions):
            of_version = np.flatnonzero(versions == version)
            batches.append(
                prediction_batch(
                    self.model.name,
                    str(int(version)),
                    [f"batch-{job_id}-{int(r)}" for r in rows[index[of_version]]],
                    np.full(len(of_version), 1000.0 * seconds / max(1, output.num_rows)),
                    rows_of(x, index[of_version]),
                    names,
                    {name: values[of_version] for name, values in outputs.items()},
                    route="batch",
                    time_unix_us=times[of_version],
                )
            )
        self.monitoring.log_predictions(batches, producer_id=f"batch-{job_id}")


def write_parts(options: BatchOptions, chunk: ChunkPosition, output: pa.Table) -> list[str]:
    """Writes the chunk's part files (one per partition) to temporary names and renames
    them into place, fsynced; returns their paths relative to the output."""
    root = options.output
    groups: list[tuple[Path, pa.Table]] = []
    if options.partition_by:
        # Each row's partition as one code (the product of its columns' codes), in
        # vectorised steps rather than a Python comparison per row and partition.
        code = np.zeros(output.num_rows, dtype=np.int64)
        labels = []
        for name in options.partition_by:
            values, inverse = np.unique(
                np.asarray(_partition_values(output[name]), dtype=object),
                return_inverse=True,
            )
            code = code * len(values) + inverse
            labels.append(values)
        # In order of first appearance, as the rows come.
        present, first = np.unique(code, return_index=True)
        for value in present[np.argsort(first)]:
            rest, combo = int(value), []
            for values in reversed(labels):
                rest, index = divmod(rest, len(values))
                combo.append(values[index])
            combo.reverse()
            folder = root.joinpath(
                *(f"{c}={v}" for c, v in zip(options.partition_by, combo, strict=True))
            )
            groups.append((folder, output.filter(pa.array(code == value))))
    else:
        groups.append((root, output))
    # Dictionary encoding only where it pays (constant or few values): tried on the
    # outputs, row numbers, keys and event times (mostly distinct) it only cost CPU,
    # half the write time of a light model's chunk.
    few = {"model", "model_version", "scored_at", REJECTED_COLUMN, *options.partition_by}
    dictionary = [name for name in output.column_names if name in few]
    written = []
    for folder, part in groups:
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{PART_PREFIX}{chunk.chunk_id}.parquet"
        temporary = folder / f"{TEMP_PREFIX}{chunk.chunk_id}-{uuid.uuid4().hex[:8]}.parquet"
        pq.write_table(part, temporary, use_dictionary=dictionary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, final)
        written.append(final.relative_to(root).as_posix())
    for folder in {folder for folder, _ in groups} | {root}:
        fsync_dir(folder)
    return written


def _partition_values(column: pa.ChunkedArray) -> list[str]:
    if pa.types.is_timestamp(column.type):
        return [str(v) for v in pc.strftime(column, format="%Y-%m-%d").to_pylist()]
    return [str(v) for v in column.to_pylist()]


@dataclass
class _Prepared:
    """A chunk ready for the model (table and x None: committed, skipped)."""

    chunk: Chunk
    table: pa.Table | None = None
    x: ModelInput | None = None
    reasons: np.ndarray | None = None
    began: float = 0.0


def _prefetched(
    chunks: Iterator[Chunk],
    skip: set[str],
    prepare: Callable[[Chunk], _Prepared],
    readers: int = PREPARE_THREADS,
) -> Iterator[_Prepared]:
    """The chunks in order, each read and made into model input ahead, on `readers`
    threads, while the current one is scored (reading, decoding and the feature
    service's join overlap with ONNX Runtime, which releases the GIL). One reader could
    not keep up with a light model: decoding 64 Parquet columns and interleaving them
    took 1.5 us of one core per row, the model 1 us of two cores. The chunks are
    iterated on a thread of their own too (CSV files and queries are read there); at
    most `readers` chunks are read ahead (with readers >= 2)."""

    pool = ThreadPoolExecutor(readers, thread_name_prefix="batch-reader")
    # One waiting here and one in the producer's hand (blocked on put) when readers=2.
    slots: queue.Queue[Any] = queue.Queue(maxsize=max(1, readers - 1))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                if chunk.chunk_id in skip:
                    future: Future[_Prepared] = Future()
                    future.set_result(_Prepared(chunk))
                else:
                    future = pool.submit(prepare, chunk)
                slots.put(future)
            slots.put(done)
        except BaseException as exc:  # handed to the consumer
            slots.put(exc)

    thread = threading.Thread(target=produce, name="batch-chunks", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item.result()
    finally:
        stop.set()
        while thread.is_alive():
            try:
                item = slots.get_nowait()
                if isinstance(item, Future):
                    item.cancel()
            except queue.Empty:
                thread.join(0.05)
        pool.shutdown(wait=True, cancel_futures=True)


class _CommitThread:
    """Builds, writes and commits scored chunks in order on one thread, so that the
    scoring thread goes back to the model at once; at most `depth` chunks wait."""

    def __init__(self, commit: Callable[[_Prepared, Scored], None], depth: int = 1) -> None:
        self._commit = commit
        self._slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="batch-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._slots.get()) is not None:
            if self._error is None:
                try:
                    self._commit(*item)
                except BaseException as exc:  # raised in the scoring thread
                    self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, prepared: _Prepared, scored: Scored) -> None:
        self._check()
        self._slots.put((prepared, scored))

    def close(self, raise_errors: bool = True) -> None:
        """Waits for every submitted chunk to be committed."""
        self._slots.put(None)
        self._thread.join()
        if raise_errors:
            self._check()


def write_success(job: BatchJob, result: BatchResult) -> None:
    """The `_SUCCESS` marker of a job whose every chunk is committed."""
    summary = {
        "job_id": job.job_id(),
        "rows": result.rows_scored + result.rows_skipped,
        "chunks": result.chunks_scored + result.chunks_skipped,
        "model": job.identity()["model"],
    }
    (job.options.output / SUCCESS_NAME).write_text(json.dumps(summary) + "\n")


class ChunkSink(Protocol):
    """Where a job's chunks are committed, each exactly once, and which are."""

    description: str

    def committed(self) -> dict[str, CommittedChunk]: ...

    def commit(self, chunk: ChunkPosition, output: pa.Table) -> None:
        """Makes the chunk's output durable and records it committed, atomically."""
        ...

    def finish(self, result: BatchResult) -> None:
        """Marks a job whose every chunk is committed."""
        ...

    def close(self) -> None: ...


class ParquetSink:
    """Part files in `output`, recorded in its `_manifest.sqlite` (manifest.py)."""

    def __init__(self, job: BatchJob) -> None:
        self.job = job
        self.description = str(job.options.output)
        self.manifest = ChunkManifest.open(job.options.output, job.identity())

    def committed(self) -> dict[str, CommittedChunk]:
        return self.manifest.committed()

    def commit(self, chunk: ChunkPosition, output: pa.Table) -> None:
        files = write_parts(self.job.options, chunk, output)
        self.manifest.commit(chunk.chunk_id, output.num_rows, files)

    def finish(self, result: BatchResult) -> None:
        write_success(self.job, result)

    def close(self) -> None:
        self.manifest.close()


class TableSink:
    """Rows of a database table, each chunk's inserted with its manifest row in one
    transaction (db_output.py)."""

    def __init__(self, job: BatchJob) -> None:
        from modelplane.scoring.db_output import DbOutput

        options = job.options
        self.output = DbOutput.open(
            options.output_db, options.output_table, options.output_schema, job.identity()
        )
        self.description = self.output.description

    def committed(self) -> dict[str, CommittedChunk]:
        return self.output.committed()

    def commit(self, chunk: ChunkPosition, output: pa.Table) -> None:
        self.output.commit(chunk.chunk_id, output)

    def finish(self, result: BatchResult) -> None:
        self.output.finish()

    def close(self) -> None:
        self.output.close()


def open_sink(job: BatchJob) -> ChunkSink:
    return TableSink(job) if job.options.output_db else ParquetSink(job)


def run_local(job: BatchJob) -> BatchResult:
    """Scores every chunk the manifest does not hold, in order, committing each.

    Three kinds of threads, each chunk passing through them in order: readers (read
    the chunk, make its model input), the scoring threads (ONNX Runtime, on all CPUs:
    this thread queues a chunk's runs, and waits for the one before it only once those
    are queued) and a writer (output table, part files, manifest commit, monitoring
    sample). On 2 cores a light model's chunk spent a third of its time outside ONNX
    Runtime when the three ran in a row; now the model's threads are idle only while
    the others are busy. At most about five chunks' model inputs are in memory (two
    read ahead, one waiting, two scored; and the one being written when predictions
    are sampled to monitoring): for wide inputs (embeddings), lower `chunk_rows`.
    """
    from tqdm import tqdm

    options = job.options
    sink = open_sink(job)
    result = BatchResult(output=sink.description)
    job_id = job.job_id()
    try:
        scorer = job.scorer()
    except BaseException:
        sink.close()
        raise

    def prepare(chunk: Chunk) -> _Prepared:
        began = time.perf_counter()
        table = chunk.load()
        x, reasons = scorer.prepare(chunk, table)
        # Only what the output copies is kept (the features are in x now).
        kept = [*job.keys, *([options.timestamp] if options.timestamp else [])]
        return _Prepared(chunk, table.select(list(dict.fromkeys(kept))), x, reasons, began)

    try:
        committed = sink.committed()
        skip = set(committed)
        started = time.perf_counter()
        bar = tqdm(
            total=job.source.total_rows,
            unit="rows",
            unit_scale=True,
            disable=not options.progress,
            desc=f"{job.model.name}/{job.model.version}",
        )

        sampled = job.monitoring is not None and options.monitoring_sample > 0

        def commit(prepared: _Prepared, scored: Scored) -> None:
            chunk, table = prepared.chunk, prepared.table
            assert table is not None
            output = scorer.output_table(chunk, table, scored)
            sink.commit(chunk, output)
            if sampled and prepared.x is not None:
                scorer.log_sample(job_id, output, prepared.x, time.perf_counter() - prepared.began)
            result.chunks_scored += 1
            result.rows_scored += output.num_rows
            result.rows_rejected += scored.rejected
            bar.update(output.num_rows)
            if options.chunk_delay_s:
                time.sleep(options.chunk_delay_s)  # ok-sleep: test hook, see BatchOptions

        with bar:
            writer = _CommitThread(commit)
            try:
                chunks = job.source.chunks(job.columns, options.chunk_rows, skip)
                # The chunk whose model runs were queued last, and what waits for them:
                # handed to the writer once the next chunk's runs are queued behind.
                scoring: tuple[_Prepared, Callable[[], Scored]] | None = None
                for prepared in _prefetched(chunks, skip, prepare):
                    chunk = prepared.chunk
                    if prepared.x is None or chunk.chunk_id in committed:
                        done = committed[chunk.chunk_id]
                        result.chunks_skipped += 1
                        result.rows_skipped += done.rows
                        bar.update(done.rows)
                        continue
                    queued = scorer.start_predict(prepared.x, prepared.reasons)
                    if scoring is not None:
                        writer.submit(scoring[0], scoring[1]())
                    scoring = (prepared, queued)
                    if not sampled:  # the model input is not needed any more: free it
                        prepared.x = None
                if scoring is not None:
                    writer.submit(scoring[0], scoring[1]())
            except BaseException:
                writer.close(raise_errors=False)
                raise
            writer.close()
        result.seconds = time.perf_counter() - started
        sink.finish(result)
    finally:
        scorer.close()
        sink.close()
    return result
