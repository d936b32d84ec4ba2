"""Small builders shared by the registry tests."""

from __future__ import annotations

import hashlib

from modelplane.services.registry import domain

SERVING_CONFIG = """max_batch_size: 32
dynamic_batching { preferred_batch_size: [8, 32] max_queue_delay_microseconds: 500 }
instance_group [ { count: 2 kind: KIND_CPU } ]
"""


def fake_version(seed: str = "a", **metadata: object) -> domain.NewVersion:
    """Version metadata as the servicer would hand it to a store (stores do not read
    artifact bytes, so the digest only has to be well formed)."""
    return domain.NewVersion(
        artifact=domain.Artifact(hashlib.sha256(seed.encode()).hexdigest(), 1234),
        signature=domain.Signature(
            inputs=(domain.TensorSpec("input", "FP32", (-1, 4)),),
            outputs=(domain.TensorSpec("output", "FP32", (-1, 2)),),
            ir_version=10,
            opset_version=17,
        ),
        metadata=domain.VersionMetadata(**metadata),  # type: ignore[arg-type]
    )


def rich_metadata() -> dict[str, object]:
    return {
        "description": "gradient boosted fraud scorer",
        "lineage": domain.Lineage(
            training_data_ref="s3://lake/fraud/transactions",
            training_data_version="2026-11-01",
            code_revision="4f2a9c1",
            params={"max_depth": "6", "learning_rate": "0.1"},
            metrics=(
                domain.Metric("auc", 0.91),
                domain.Metric("auc", 0.87, {"region": "eu"}),
                domain.Metric("auc", 0.93, {"region": "us"}),
            ),
        ),
        "card": domain.ModelCard(
            intended_use="score card transactions for fraud review",
            out_of_scope_uses="credit decisions",
            limitations="trained on 2025 data only",
            ethical_considerations="region is a proxy for nationality; audited quarterly",
            evaluation_data="held-out November 2026 transactions",
        ),
        "feature_statistics": (
            domain.FeatureStatistics("amount", (0.0, 10.0, 100.0, 1000.0), (40, 50, 10)),
        ),
        "serving_config": SERVING_CONFIG,
    }
