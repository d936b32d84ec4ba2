"""JSON columns: how the nested parts of a version are written to and read from a row."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from modelplane.services.registry.domain import (
    FeatureInput,
    FeatureStatistics,
    Lineage,
    Metric,
    MissingFeaturePolicy,
    ModelCard,
    RouteWeight,
    Signature,
    TensorSpec,
)


def to_us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def from_us(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _spec(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(raw["name"], raw["datatype"], tuple(raw["shape"]))


def signature_to_json(signature: Signature) -> str:
    def spec(item: TensorSpec) -> dict[str, Any]:
        return {"name": item.name, "datatype": item.datatype, "shape": list(item.shape)}

    return dumps(
        {
            "inputs": [spec(s) for s in signature.inputs],
            "outputs": [spec(s) for s in signature.outputs],
            "ir_version": signature.ir_version,
            "opset_version": signature.opset_version,
        }
    )


def signature_from_json(text: str) -> Signature:
    raw = json.loads(text)
    return Signature(
        inputs=tuple(_spec(s) for s in raw["inputs"]),
        outputs=tuple(_spec(s) for s in raw["outputs"]),
        ir_version=raw["ir_version"],
        opset_version=raw["opset_version"],
    )


def lineage_to_json(lineage: Lineage) -> str:
    return dumps(
        {
            "training_data_ref": lineage.training_data_ref,
            "training_data_version": lineage.training_data_version,
            "code_revision": lineage.code_revision,
            "params": dict(lineage.params),
            "metrics": [
                {"name": m.name, "value": m.value, "slice": dict(m.slice)} for m in lineage.metrics
            ],
        }
    )


def lineage_from_json(text: str) -> Lineage:
    raw = json.loads(text)
    return Lineage(
        training_data_ref=raw["training_data_ref"],
        training_data_version=raw["training_data_version"],
        code_revision=raw["code_revision"],
        params=raw["params"],
        metrics=tuple(Metric(m["name"], m["value"], m["slice"]) for m in raw["metrics"]),
    )


def card_to_json(card: ModelCard) -> str:
    return dumps(
        {
            "intended_use": card.intended_use,
            "out_of_scope_uses": card.out_of_scope_uses,
            "limitations": card.limitations,
            "ethical_considerations": card.ethical_considerations,
            "evaluation_data": card.evaluation_data,
        }
    )


def card_from_json(text: str) -> ModelCard:
    return ModelCard(**json.loads(text))


def stats_to_json(stats: tuple[FeatureStatistics, ...]) -> str:
    return dumps(
        [
            {
                "name": s.name,
                "bin_edges": list(s.bin_edges),
                "counts": list(s.counts),
                **({"categories": list(s.categories)} if s.categories else {}),
            }
            for s in stats
        ]
    )


def stats_from_json(text: str) -> tuple[FeatureStatistics, ...]:
    return tuple(
        FeatureStatistics(
            s["name"], tuple(s["bin_edges"]), tuple(s["counts"]), tuple(s.get("categories", ()))
        )
        for s in json.loads(text)
    )


def routes_to_json(routes: tuple[RouteWeight, ...]) -> str:
    return dumps([[r.alias, r.weight] for r in routes])


def routes_from_json(text: str) -> tuple[RouteWeight, ...]:
    return tuple(RouteWeight(str(alias), int(weight)) for alias, weight in json.loads(text))


def feature_input_to_json(feature_input: FeatureInput | None) -> str:
    """'' for none: the column's default, which rows written before it existed hold."""
    return "" if feature_input is None else dumps(feature_input.details())


def feature_input_from_json(text: str) -> FeatureInput | None:
    if not text:
        return None
    raw = json.loads(text)
    return FeatureInput(raw["bundle"], raw["input"], MissingFeaturePolicy(raw["missing_policy"]))
