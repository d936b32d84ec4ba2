"""The memory a Ray scoring actor asks for: its base and a few copies of its chunk's model
input, never more than an equal share of the cluster's memory."""

from __future__ import annotations

from modelplane.scoring.ray_engine import ACTOR_BASE_BYTES, CHUNK_COPIES, actor_memory

GIB = 1 << 30


def test_an_actor_asks_for_its_chunk_copies_and_a_base():
    # 262,144 rows of 512 float32 features: 0.5 GiB of model input a chunk.
    wanted = actor_memory(262_144, 512 * 4, cluster_bytes=24 * GIB, actors=2)
    assert wanted == ACTOR_BASE_BYTES + CHUNK_COPIES * GIB // 2


def test_no_actor_asks_for_more_than_its_share_of_the_cluster():
    assert actor_memory(262_144, 512 * 4, cluster_bytes=4 * GIB, actors=2) == 2 * GIB
    # A cluster that does not say how much memory it has: the estimate as it is.
    assert actor_memory(1_000, 8, cluster_bytes=0.0, actors=2) == ACTOR_BASE_BYTES + 40_000
