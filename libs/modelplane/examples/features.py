"""The demo feature repository `modelplane up` serves on first run.

One entity, one view whose offline source is a Parquet file of synthetic rows, and a
bundle that is exactly the input of the demo model of the same name: a caller reads
the bundle as a tensor from the feature service and passes it to the inference
service as it is.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCORER = "customer_scorer"  # the bundle's name and its model's
CUSTOMERS = 1_000
ROWS_PER_CUSTOMER = 3
DAY_US = 86_400_000_000

DEFINITIONS = f"""\
# modelplane demo features (source paths are relative to this file)
entities:
  - name: customer
    join_keys: [customer_id]
feature_views:
  - name: customer_stats
    entity: customer
    max_age: 30d
    source: {{path: customer_stats.parquet, timestamp_field: event_timestamp}}
    features:
      - {{name: trips_7d, type: int64}}
      - {{name: trips_30d, type: int64}}
      - {{name: avg_fare, type: double}}
      - {{name: avg_rating, type: double}}
      - {{name: cancel_rate, type: double}}
      - {{name: card_on_file, type: bool}}
      - {{name: tenure_years, type: double}}
      - {{name: complaints_90d, type: int64}}
bundles:
  - name: {SCORER}
    features:
      - customer_stats:trips_7d
      - customer_stats:trips_30d
      - customer_stats:avg_fare
      - customer_stats:avg_rating
      - customer_stats:cancel_rate
      - customer_stats:card_on_file
      - customer_stats:tenure_years
      - {{ref: customer_stats:complaints_90d, fill_value: 0}}
"""
WIDTH = 8  # features in the bundle: the model's input width


def source_table(now_us: int, seed: int = 11) -> pa.Table:
    """Customers 1..CUSTOMERS, each with a row per day for the last few days."""
    rng = np.random.default_rng(seed)
    rows = CUSTOMERS * ROWS_PER_CUSTOMER
    ids = np.repeat(np.arange(1, CUSTOMERS + 1, dtype=np.int64), ROWS_PER_CUSTOMER)
    age_days = np.tile(np.arange(ROWS_PER_CUSTOMER)[::-1], CUSTOMERS)
    trips_7d = rng.poisson(6, rows)
    return pa.table(
        {
            "customer_id": ids,
            "event_timestamp": pa.array(
                now_us - age_days * DAY_US - rng.integers(0, 3_600_000_000, rows),
                pa.timestamp("us", tz="UTC"),
            ),
            "trips_7d": trips_7d.astype(np.int64),
            "trips_30d": (trips_7d * 4 + rng.poisson(3, rows)).astype(np.int64),
            "avg_fare": np.round(rng.gamma(4.0, 4.0, rows), 2),
            "avg_rating": np.round(np.clip(rng.normal(4.6, 0.3, rows), 1.0, 5.0), 2),
            "cancel_rate": np.round(rng.beta(1.0, 12.0, rows), 3),
            "card_on_file": rng.random(rows) < 0.8,
            "tenure_years": np.round(rng.exponential(2.0, rows), 2),
            "complaints_90d": rng.poisson(0.3, rows).astype(np.int64),
        }
    )


def ensure_demo_features(directory: Path) -> Path:
    """Writes `features.yaml` and its Parquet source on first run; returns the YAML's
    path. Later runs reuse both (the online store keeps what was materialized)."""
    definitions = directory / "features.yaml"
    if definitions.exists():
        return definitions
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(source_table(time.time_ns() // 1_000), directory / "customer_stats.parquet")
    # Written last: its presence marks the demo as complete.
    definitions.write_text(DEFINITIONS)
    return definitions
