"""Record keys depend on the record alone, never on the batch it came in (labels arrive
in other batches than their predictions, and a retry may regroup records), and take any
request id, not only ASCII ones (a fuzzed LogLabels with a non-ASCII id ended INTERNAL)."""

from __future__ import annotations

import numpy as np

from modelplane.services.monitoring.record_keys import record_keys


def _key(request_id: str, row: int = 0) -> int:
    return int(record_keys([request_id], np.array([row]))[0])


def test_a_key_does_not_depend_on_the_other_ids_of_its_batch():
    ids = ["r-0", "a-much-longer-request-id-0123456789", "", "r-0"]
    keys = record_keys(ids, np.array([0, 0, 0, 1]))
    assert keys.tolist() == [_key("r-0"), _key(ids[1]), _key(""), _key("r-0", 1)]
    assert len(set(keys.tolist())) == 4


def test_ids_differing_in_length_or_row_have_different_keys():
    assert len({_key("a"), _key("a" * 8), _key("a" * 9), _key("a", 1), _key("")}) == 5


def test_non_ascii_ids_hash_as_their_utf8_bytes():
    ids = ["café", "\U0001dbcc", "r-0", "日本"]
    keys = record_keys(ids, np.zeros(4, dtype=np.int64))
    assert keys.tolist() == [_key(i) for i in ids]
    assert len(set(keys.tolist())) == 4
