"""Record keys: a stable 64-bit hash of (request id, row index), and a bounded index of
the keys stored recently, so a retried batch is recognised without a per-record
database index.

Why not a unique index in SQL: on this machine kind one SQLite insert into a unique
index of text (or even integer) keys costs 5-17 µs per record once the table holds a
million rows, which alone caps ingest below 200k records/s. Batches are stored whole
instead, each with its keys as one blob, and duplicates are found here, in memory.

The promise this gives: a record whose key is among the capacity/2 most recently stored
keys of its model (capacity 2 million by default: a million records, hours of a busy
model's traffic and far more than any retry takes) is never stored twice. The index is
rebuilt from the stored key blobs at start, so a restart keeps it. Two different keys
share a hash with probability about n^2 / 2^65 among n keys (1 in 10^7 for 2 million);
such a record would be taken for a duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_U64 = np.uint64
# splitmix64's constants: a cheap mix with full avalanche, vectorised over uint64.
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    h = (h ^ (h >> _U64(30))) * _MIX1
    h = (h ^ (h >> _U64(27))) * _MIX2
    return h ^ (h >> _U64(31))


def record_keys(request_ids: Sequence[str], row_indices: np.ndarray) -> np.ndarray:
    """uint64 key per record, the same in every process and release (stored keys are
    compared with new ones after a restart) and whatever else the call carries: a key
    depends on its id's bytes, its length and the row index only (labels arrive in
    other batches than their predictions). Vectorised: the ids become one fixed-width
    byte matrix, hashed 8 bytes at a time, each row over the lanes its id fills. (An id's
    trailing NUL bytes do not count, as numpy's byte strings drop them.)"""
    rows = len(request_ids)
    try:
        encoded = np.array(request_ids, dtype=np.bytes_)  # ASCII ids: numpy encodes them
    except UnicodeEncodeError:
        # Any other id as its UTF-8 bytes: the same bytes as numpy's for ASCII ones.
        encoded = np.array([i.encode("utf-8") for i in request_ids], dtype=np.bytes_)
    width = max(8, -(-encoded.dtype.itemsize // 8) * 8)
    words = np.zeros((rows, width), dtype=np.uint8)
    raw = encoded.view(np.uint8).reshape(rows, encoded.dtype.itemsize)
    words[:, : raw.shape[1]] = raw
    lanes = words.view("<u8")
    lengths = np.char.str_len(encoded).astype(_U64)
    filled = np.maximum(1, (lengths + _U64(7)) // _U64(8))  # lanes holding the id
    with np.errstate(over="ignore"):
        h = np.full(rows, _GOLDEN, dtype=_U64) ^ lengths
        for column in range(lanes.shape[1]):
            mixed = _mix(h ^ lanes[:, column])
            # Lanes past an id's end are the batch's padding: left out of its key, or
            # the key would depend on the longest id it arrived with.
            h = np.where(column < filled, mixed, h)
        return _mix(h ^ (row_indices.astype(_U64) * _GOLDEN))


ROW_BITS = 20  # rows per batch < 2^20 (a call holds at most 65,536 records)


def location(seq: int, rows: np.ndarray) -> np.ndarray:
    """Where a record is stored: its batch's sequence number and its row in it."""
    return (np.int64(seq) << ROW_BITS) | rows.astype(np.int64)


def split_location(loc: int) -> tuple[int, int]:
    return loc >> ROW_BITS, loc & ((1 << ROW_BITS) - 1)


# Below this many keys still probing, a Python loop is cheaper than numpy steps.
_TAIL = 16


class _HashTable:
    """Open addressing with linear probing over two numpy arrays; every operation is
    vectorised over a batch of keys (a Python loop per probe step, not per key).
    Key 0 marks an empty slot, so the key 0 is stored as 1 (one more hash collision)."""

    def __init__(self, slots: int) -> None:
        self.keys = np.zeros(slots, dtype=_U64)
        self.locations = np.zeros(slots, dtype=np.int64)
        self.size = 0

    @property
    def mask(self) -> np.uint64:
        return _U64(len(self.keys) - 1)

    def find(self, keys: np.ndarray) -> np.ndarray:
        found = np.full(len(keys), -1, dtype=np.int64)
        pending = np.arange(len(keys))
        slot = keys & self.mask
        while len(pending) > _TAIL:
            at = self.keys[slot]
            hit = at == keys[pending]
            found[pending[hit]] = self.locations[slot[hit]]
            going = ~hit & (at != 0)
            pending, slot = pending[going], (slot[going] + _U64(1)) & self.mask
        # The few keys in long probe chains: a numpy step per probe would cost more.
        mask = int(self.mask)
        table = self.keys
        for index, at in zip(pending.tolist(), slot.tolist(), strict=True):
            key = keys[index]
            while (stored := table[at]) != 0:
                if stored == key:
                    found[index] = self.locations[at]
                    break
                at = (at + 1) & mask
        return found

    def insert(self, keys: np.ndarray, locations: np.ndarray) -> None:
        """Keys known to be absent and distinct."""
        slot = keys & self.mask
        while len(keys):
            free = self.keys[slot] == 0
            # Of several keys aiming at one free slot, one write lands: the others see
            # a different key there afterwards and probe on.
            self.keys[slot[free]] = keys[free]
            took = free & (self.keys[slot] == keys)
            self.locations[slot[took]] = locations[took]
            self.size += int(took.sum())
            keys, locations = keys[~took], locations[~took]
            slot = (slot[~took] + _U64(1)) & self.mask
            if len(keys) <= _TAIL:
                self._insert_each(keys, locations, slot)
                return

    def _insert_each(self, keys: np.ndarray, locations: np.ndarray, slots: np.ndarray) -> None:
        mask = int(self.mask)
        for key, loc, at in zip(keys.tolist(), locations.tolist(), slots.tolist(), strict=True):
            while self.keys[at] != 0:
                at = (at + 1) & mask
            self.keys[at] = key
            self.locations[at] = loc
            self.size += 1

    def grown(self) -> _HashTable:
        bigger = _HashTable(len(self.keys) * 2)
        used = self.keys != 0
        bigger.insert(self.keys[used], self.locations[used])
        return bigger


class RecentKeys:
    """The most recent keys of one model → their location, in bounded memory.

    Two generations of hash tables bound it: new keys go to the current one; when it
    holds capacity/2 keys, the previous one is dropped and the current becomes the
    previous. So at least the newest capacity/2 keys, and at most capacity, are known.
    Memory: 32 bytes per key at worst (16 per slot, tables at most half full).
    """

    _FIRST_SLOTS = 1 << 12

    def __init__(self, capacity: int = 2_000_000) -> None:
        self._half = max(1, capacity // 2)
        self._current = _HashTable(self._FIRST_SLOTS)
        self._previous: _HashTable | None = None

    def __len__(self) -> int:
        return self._current.size + (self._previous.size if self._previous else 0)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Location of each key, or -1 when unknown."""
        keys = np.where(keys == 0, _U64(1), keys)
        found = self._current.find(keys)
        if self._previous is not None:
            missing = found < 0
            found[missing] = self._previous.find(keys[missing])
        return found

    def add(self, keys: np.ndarray, locations: np.ndarray) -> None:
        """Keys not yet known (see `find`) and distinct."""
        keys = np.where(keys == 0, _U64(1), keys)
        if self._current.size + len(keys) > self._half:
            self._previous, self._current = self._current, _HashTable(self._FIRST_SLOTS)
        while (self._current.size + len(keys)) * 2 > len(self._current.keys):
            self._current = self._current.grown()
        self._current.insert(keys, locations)
