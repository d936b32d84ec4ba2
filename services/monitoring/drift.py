"""Drift of a window's columns against a version's reference, and the verdicts.

The reference of a version is either the registry's feature statistics (training rows
binned at quantile edges) or, when the registry has none, a frozen summary of the first
rows the service saw. Each column of a window is compared with it bin by bin:

- numeric columns: a two-sample Kolmogorov-Smirnov test evaluated at the reference's bin
  edges. Binning can only hide differences, so the binned D is at most the raw-data D and
  the test is conservative (fewer false alarms, slightly less power);
- categorical columns: a chi-square test of homogeneity on the 2 x k table of reference
  and current counts.

Verdicts control the family-wise error rate across a version's columns with
Holm-Bonferroni: with the default alpha of 0.01, an unshifted window is called drifted
(in any column) about once in a hundred windows. Effect-size floors (PSI, Jensen-Shannon
distance) per column keep very large windows from flagging differences too small to
matter.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy import stats as scipy_stats
from scipy.spatial import distance

from modelplane.kernel.errors import InvalidArgument
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring.statistics import (
    OTHER,
    CategoricalColumn,
    Column,
    NumericColumn,
    WindowStats,
)

log = logging.getLogger("modelplane.monitoring.drift")

DEFAULT_FAMILY_ALPHA = 0.01
DEFAULT_MIN_SAMPLES = 1000
DEFAULT_REFERENCE_ROWS = 10_000
# Ranks of ColumnReport.quantiles.
QUANTILE_RANKS = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# Added to every bin's share before PSI, so an empty bin on one side gives a large but
# finite term (ln(share / 1e-4)) instead of infinity; 1e-4 is far below the share of any
# bin of a 10-bin reference, so it barely moves PSI where both sides have rows.
PSI_EPSILON = 1e-4
# Chi-square's approximation needs expected counts of about 5 or more per cell;
# categories expected below that on either side are pooled into one cell for the test.
CHI2_MIN_EXPECTED = 5.0


class FeatureStatisticsLike(Protocol):
    """The registry's FeatureStatistics message, or anything shaped like it."""

    @property
    def name(self) -> str: ...
    @property
    def bin_edges(self) -> Sequence[float]: ...
    @property
    def counts(self) -> Sequence[int]: ...
    @property
    def categories(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class ColumnReference:
    """The reference distribution of one column: counts per numeric bin (`bin_edges`)
    or per category (`categories`); exactly one of the two is set."""

    counts: tuple[int, ...]
    bin_edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def categorical(self) -> bool:
        return bool(self.categories) or not self.bin_edges

    @property
    def total(self) -> int:
        return sum(self.counts)

    @classmethod
    def numeric(cls, edges: Sequence[float], counts: Sequence[int]) -> ColumnReference:
        """A checked numeric reference: edges finite and strictly increasing, one count
        per bin, no negative counts."""
        edge_array = np.asarray(edges, dtype=np.float64)
        if len(edge_array) < 2 or not np.all(np.isfinite(edge_array)):
            raise InvalidArgument("reference edges: need at least two finite values")
        if not np.all(np.diff(edge_array) > 0):
            raise InvalidArgument("reference edges must be strictly increasing")
        if len(counts) != len(edge_array) - 1 or any(c < 0 for c in counts):
            raise InvalidArgument("reference counts: one non-negative count per bin")
        return cls(counts=tuple(int(c) for c in counts), bin_edges=tuple(edge_array.tolist()))

    @classmethod
    def categorical_counts(cls, counts: Mapping[str, int]) -> ColumnReference:
        """A categorical reference from rows per category (the empty category is
        missing, so it is left out)."""
        items = sorted(((k, int(v)) for k, v in counts.items() if k), key=_frequent_first)
        if any(n < 0 for _, n in items):
            raise InvalidArgument("reference counts must not be negative")
        return cls(counts=tuple(n for _, n in items), categories=tuple(k for k, _ in items))

    def to_json(self) -> dict[str, object]:
        if self.categorical:
            return {"categories": list(self.categories), "counts": list(self.counts)}
        return {"bin_edges": list(self.bin_edges), "counts": list(self.counts)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ColumnReference:
        counts = data.get("counts")
        if not isinstance(counts, list):
            raise InvalidArgument("reference column without counts")
        categories = data.get("categories")
        if isinstance(categories, list):
            if len(categories) != len(counts):
                raise InvalidArgument("reference categories and counts differ in length")
            return cls.categorical_counts(dict(zip(categories, counts, strict=True)))
        edges = data.get("bin_edges")
        if not isinstance(edges, list):
            raise InvalidArgument("reference column without bin edges or categories")
        return cls.numeric(edges, counts)


def _frequent_first(item: tuple[str, int]) -> tuple[bool, int, str]:
    """Sort key: most frequent first, ties by name, OTHER last."""
    return (item[0] == OTHER, -item[1], item[0])


@dataclass(frozen=True)
class Reference:
    """A version's reference: where it came from, its rows, and its columns."""

    source: int  # a pb.ReferenceSource value
    count: int
    columns: dict[str, ColumnReference] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """JSON, so a store can keep it as an opaque value (floats round-trip exactly)."""
        body = {
            "source": int(self.source),
            "count": self.count,
            "columns": {name: column.to_json() for name, column in self.columns.items()},
        }
        return json.dumps(body, sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Reference:
        try:
            body = json.loads(data)
            columns = {
                str(name): ColumnReference.from_json(column)
                for name, column in body["columns"].items()
            }
            return cls(source=int(body["source"]), count=int(body["count"]), columns=columns)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgument("stored reference does not parse") from exc


def reference_from_registry(statistics: Sequence[FeatureStatisticsLike]) -> Reference:
    """The reference given by the registry's feature statistics of a version. A
    statistic that does not validate is skipped (and logged), not fatal: the other
    columns are still worth watching."""
    columns: dict[str, ColumnReference] = {}
    for stat in statistics:
        try:
            if len(stat.categories):
                if len(stat.categories) != len(stat.counts):
                    raise InvalidArgument("one count per category")
                counts = dict(zip(stat.categories, stat.counts, strict=True))
                columns[stat.name] = ColumnReference.categorical_counts(counts)
            else:
                edges, bins = list(stat.bin_edges), list(stat.counts)
                columns[stat.name] = ColumnReference.numeric(edges, bins)
        except InvalidArgument as exc:
            log.warning("skipping reference statistics of %r: %s", stat.name, exc.message)
    count = max((column.total for column in columns.values()), default=0)
    return Reference(source=pb.REFERENCE_SOURCE_REGISTRY, count=count, columns=columns)


def reference_from_rows(stats: WindowStats, bins: int = 10) -> Reference:
    """A frozen reference from the statistics of a version's first rows (the
    FIRST_ROWS case). Numeric edges are the sketch's quantiles at evenly spaced ranks;
    counts come from the column's own histogram when it was kept over exactly these
    edges, else from the sketch (within its ~1.3 % rank error). Columns without a
    present value are left out."""
    if bins < 1:
        raise InvalidArgument("a reference needs at least one bin")
    columns: dict[str, ColumnReference] = {}
    for name, column in stats.columns.items():
        if column.present == 0:
            continue
        if isinstance(column, NumericColumn):
            edges = quantile_edges(column, bins)
            columns[name] = ColumnReference.numeric(
                edges.tolist(), column.bin_counts_over(edges).tolist()
            )
        else:
            columns[name] = ColumnReference.categorical_counts(column.counts)
    return Reference(source=pb.REFERENCE_SOURCE_FIRST_ROWS, count=stats.count, columns=columns)


def _up(value: float) -> float:
    """The next float32 above `value`: values and sketches are float32, so a split
    there separates `value` from everything larger, in the exact histogram and in
    the sketch alike."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def _down(value: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def quantile_edges(column: NumericColumn, bins: int) -> np.ndarray:
    """Strictly increasing edges at the column's quantiles of ranks 0, 1/bins, ..., 1.

    Ties (a discrete column) collapse quantiles; then the top value gets a bin of its
    own — the last bin is closed, so otherwise an atom at the maximum (the 1 of a 0/1
    flag) would share a bin with everything below it. A constant column gets three bins:
    below, at and above its value."""
    edges = np.unique(column.quantiles(np.linspace(0.0, 1.0, bins + 1).tolist()))
    if len(edges) < bins + 1:
        edges = np.append(edges, _up(edges[-1]))
    if len(edges) == 2:
        value = float(edges[0])
        edges = np.array([_down(value), value, _up(value), _up(_up(value))])
    return edges


@dataclass(frozen=True, eq=False)
class ColumnDrift:
    """One column of a window compared with its reference."""

    name: str
    categorical: bool
    test: str  # "ks", "chi2", or "" when nothing could be compared
    statistic: float
    p_value: float
    psi: float
    js_distance: float
    reference_counts: np.ndarray  # float64, per bin or category
    current_counts: np.ndarray  # float64, aligned with reference_counts
    bin_edges: np.ndarray  # numeric: the reference's edges; empty for categorical
    categories: tuple[str, ...]  # categorical: aligned with the counts
    count: int  # current rows, missing included
    missing: int


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index sum((q - p) * ln(q / p)) over bins, with shares
    smoothed by PSI_EPSILON (see there). 0 for identical shares; NaN when a side is
    empty."""
    p = _smoothed_shares(reference)
    q = _smoothed_shares(current)
    if p is None or q is None:
        return math.nan
    return float(np.sum((q - p) * np.log(q / p)))


def _smoothed_shares(counts: np.ndarray) -> np.ndarray | None:
    total = float(np.sum(counts))
    if total <= 0:
        return None
    return (counts / total + PSI_EPSILON) / (1.0 + PSI_EPSILON * len(counts))


def js_distance(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, so 0..1) of the two bin distributions; NaN when a
    side is empty."""
    if np.sum(reference) <= 0 or np.sum(current) <= 0:
        return math.nan
    return float(distance.jensenshannon(reference, current, base=2))


def ks_binned(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic D at the bin edges, from both histograms' CDFs, and its
    asymptotic p-value (Kolmogorov distribution at D * sqrt(n m / (n + m)))."""
    n, m = float(np.sum(reference)), float(np.sum(current))
    cdf_reference = np.cumsum(reference) / n
    cdf_current = np.cumsum(current) / m
    d = float(np.max(np.abs(cdf_reference - cdf_current)))
    p_value = float(scipy_stats.kstwobign.sf(d * math.sqrt(n * m / (n + m))))
    return d, min(1.0, p_value)


def chi2_homogeneity(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Chi-square statistic and p-value of the 2 x k table of counts.

    Categories empty on both sides are dropped. The chi-square approximation fails for
    cells expected below CHI2_MIN_EXPECTED rows: one stray row of a rare (or new)
    category would then dominate the statistic and raise false alarms. So those
    categories are pooled into one cell, and that cell, if still too small, is added to
    the smallest other category. A small new category is therefore seen in PSI and JS
    distance, not in the test.
    """
    table = np.vstack([reference, current]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    smaller_row_share = table.sum(axis=1).min() / table.sum()
    rare = table.sum(axis=0) * smaller_row_share < CHI2_MIN_EXPECTED
    if np.any(rare):
        pooled = table[:, rare].sum(axis=1)
        table = table[:, ~rare]
        if pooled.sum() * smaller_row_share >= CHI2_MIN_EXPECTED or table.shape[1] == 0:
            table = np.column_stack([table, pooled])
        else:
            table[:, np.argmin(table.sum(axis=0))] += pooled
    if table.shape[1] < 2:
        return 0.0, 1.0
    result = scipy_stats.chi2_contingency(table, correction=False)
    return float(result.statistic), float(result.pvalue)


def column_drift(name: str, reference: ColumnReference, current: Column) -> ColumnDrift:
    """Compares one window column with its reference; InvalidArgument when one is
    numeric and the other categorical.

    A numeric column's current counts are exact when the window counted it over the
    reference's edges (ingest creates columns with them); otherwise, e.g. a window that
    began before a FIRST_ROWS reference was frozen, they come from its sketch and carry
    its ~1.3 % rank error, which the KS test does not account for."""
    if isinstance(current, NumericColumn) and not reference.categorical:
        edges = np.asarray(reference.bin_edges, dtype=np.float64)
        ref = np.asarray(reference.counts, dtype=np.float64)
        cur = current.bin_counts_over(edges).astype(np.float64)
        categories: tuple[str, ...] = ()
        test = "ks"
    elif isinstance(current, CategoricalColumn) and reference.categorical:
        categories = _aligned_categories(reference, current)
        ref_map = dict(zip(reference.categories, reference.counts, strict=True))
        ref = np.array([ref_map.get(c, 0) for c in categories], dtype=np.float64)
        cur = np.array([current.counts.get(c, 0) for c in categories], dtype=np.float64)
        edges = np.empty(0)
        test = "chi2"
    else:
        raise InvalidArgument(f"column {name!r}: the reference and the window differ in kind")
    statistic, p_value = math.nan, math.nan
    if ref.sum() > 0 and cur.sum() > 0:
        statistic, p_value = ks_binned(ref, cur) if test == "ks" else chi2_homogeneity(ref, cur)
    else:
        test = ""
    return ColumnDrift(
        name=name,
        categorical=isinstance(current, CategoricalColumn),
        test=test,
        statistic=statistic,
        p_value=p_value,
        psi=psi(ref, cur),
        js_distance=js_distance(ref, cur),
        reference_counts=ref,
        current_counts=cur,
        bin_edges=edges,
        categories=categories,
        count=current.count,
        missing=current.missing,
    )


def _aligned_categories(reference: ColumnReference, current: CategoricalColumn) -> tuple[str, ...]:
    """The union of both sides' categories, most frequent in the reference first, then
    most frequent in the window, OTHER last."""
    totals = dict(zip(reference.categories, reference.counts, strict=True))
    order = {c: (totals.get(c, 0), n) for c, n in current.counts.items()}
    for c, n in totals.items():
        order.setdefault(c, (n, 0))
    ranked = sorted(order.items(), key=lambda kv: (kv[0] == OTHER, -kv[1][0], -kv[1][1], kv[0]))
    return tuple(c for c, _ in ranked)


@dataclass(frozen=True)
class Verdict:
    """The drift verdict of one column of a window."""

    name: str
    tested: bool
    adjusted_p_value: float  # NaN when not tested
    drifted: bool
    reason: str


def policy_limits(policy: pb.DriftPolicy) -> tuple[float, int]:
    """The family alpha and minimum rows of a policy, defaults filled in; InvalidArgument
    for an alpha outside (0, 1)."""
    alpha = policy.family_alpha or DEFAULT_FAMILY_ALPHA
    if not 0.0 < alpha < 1.0:
        raise InvalidArgument("drift policy: family_alpha must be in (0, 1)")
    return alpha, policy.min_samples or DEFAULT_MIN_SAMPLES


def assess(drifts: Mapping[str, ColumnDrift], policy: pb.DriftPolicy) -> dict[str, Verdict]:
    """Verdicts for a window's columns, in the order of `drifts`.

    Columns ignored by the policy, with fewer rows than min_samples, or with nothing to
    compare are not tested. The others' p-values are adjusted with Holm-Bonferroni; a
    column drifted iff its adjusted p-value is below the family alpha and its PSI and
    JS distance reach the column's floors."""
    alpha, min_samples = policy_limits(policy)
    untested: dict[str, str] = {}
    for name, drift in drifts.items():
        reason = _untested_reason(drift, policy, min_samples)
        if reason:
            untested[name] = reason
    tested = [name for name in drifts if name not in untested]
    adjusted = holm_bonferroni([drifts[name].p_value for name in tested])
    verdicts = {
        name: _verdict(drifts[name], p, alpha, policy.columns.get(name))
        for name, p in zip(tested, adjusted, strict=True)
    }
    for name, reason in untested.items():
        verdicts[name] = Verdict(
            name, tested=False, adjusted_p_value=math.nan, drifted=False, reason=reason
        )
    return {name: verdicts[name] for name in drifts}


def _untested_reason(drift: ColumnDrift, policy: pb.DriftPolicy, min_samples: int) -> str:
    threshold = policy.columns.get(drift.name)
    if threshold is not None and threshold.ignore:
        return "ignored by the drift policy"
    if drift.count < min_samples:
        return f"fewer than {min_samples} rows"
    if not drift.test:
        return "no present values to compare"
    return ""


def holm_bonferroni(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest is
    multiplied by (m - i), made monotone, capped at 1."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def _verdict(
    drift: ColumnDrift, adjusted_p: float, alpha: float, threshold: pb.ColumnThreshold | None
) -> Verdict:
    min_psi = threshold.min_psi if threshold is not None else 0.0
    min_js = threshold.min_js_distance if threshold is not None else 0.0
    if adjusted_p >= alpha:
        reason = f"adjusted p-value {adjusted_p:.3g} >= {alpha:g}"
    elif drift.psi < min_psi:
        reason = f"significant, but PSI {drift.psi:.3g} < {min_psi:g}"
    elif drift.js_distance < min_js:
        reason = f"significant, but JS distance {drift.js_distance:.3g} < {min_js:g}"
    else:
        return Verdict(
            drift.name,
            tested=True,
            adjusted_p_value=adjusted_p,
            drifted=True,
            reason=f"adjusted p-value {adjusted_p:.3g} < {alpha:g} ({drift.test})",
        )
    return Verdict(
        drift.name, tested=True, adjusted_p_value=adjusted_p, drifted=False, reason=reason
    )


def column_report(
    current: Column,
    drift: ColumnDrift | None = None,
    verdict: Verdict | None = None,
    *,
    name: str = "",
    is_output: bool = False,
) -> pb.ColumnReport:
    """A ColumnReport of a window column: its statistics, and the drift comparison and
    verdict when there is one (`name` is needed only without a drift)."""
    report = pb.ColumnReport(
        name=drift.name if drift is not None else name,
        is_output=is_output,
        categorical=isinstance(current, CategoricalColumn),
        count=current.count,
        missing=current.missing,
    )
    if isinstance(current, NumericColumn) and current.present:
        report.mean = current.mean
        report.stddev = current.stddev
        report.min = current.min
        report.max = current.max
        report.quantiles.extend(current.quantiles(QUANTILE_RANKS).tolist())
        report.quantile_ranks.extend(QUANTILE_RANKS)
    if drift is not None:
        _fill_drift(report, drift)
    if verdict is not None:
        report.adjusted_p_value = verdict.adjusted_p_value
        report.drifted = verdict.drifted
        report.reason = verdict.reason
    return report


def _fill_drift(report: pb.ColumnReport, drift: ColumnDrift) -> None:
    report.bin_edges.extend(drift.bin_edges.tolist())
    report.categories.extend(drift.categories)
    report.reference_counts.extend(drift.reference_counts.tolist())
    report.current_counts.extend(drift.current_counts.tolist())
    report.psi = drift.psi
    report.js_distance = drift.js_distance
    report.test = drift.test
    report.statistic = drift.statistic
    report.p_value = drift.p_value


def drift_reports(
    reference: Reference | None,
    columns: Mapping[str, Column],
    policy: pb.DriftPolicy,
    *,
    output_names: Collection[str] = (),
) -> list[pb.ColumnReport]:
    """Reports of every column of a window, in the window's column order: compared,
    tested and judged when the reference has the column, statistics only (with the
    reason) otherwise."""
    drifts: dict[str, ColumnDrift] = {}
    reasons: dict[str, str] = {}
    for name, column in columns.items():
        column_reference = reference.columns.get(name) if reference is not None else None
        if column_reference is None:
            reasons[name] = "no reference for this column"
            continue
        try:
            drifts[name] = column_drift(name, column_reference, column)
        except InvalidArgument as exc:
            reasons[name] = exc.message
    verdicts = assess(drifts, policy)
    reports = []
    for name, column in columns.items():
        report = column_report(
            column,
            drifts.get(name),
            verdicts.get(name),
            name=name,
            is_output=name in output_names,
        )
        if name in reasons:
            report.reason = reasons[name]
        reports.append(report)
    return reports
