"""`modelplane score batch --engine ray` on a local Ray instance (one per module: Ray
takes seconds to start): the same predictions as the local engine (columns, and a
model fed by a feature bundle), and a job killed with SIGKILL half way resumes exactly
once."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from functools import partial

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import ray

from modelplane.cli.main import main
from modelplane.scoring.batch import ROW_COLUMN
from modelplane.scoring.manifest import SUCCESS_NAME
from modelplane.scoring.ray_engine import _check_reachable
from tests.integration.scoring.conftest import BUNDLE_MODEL, MODEL, bundle_job, ort_outputs
from tests.integration.scoring.test_batch import (
    FEATURES,
    _committed,
    assert_every_row_once,
    input_table,
    kill_after,
    matrix,
    read_output,
    score,
    score_command,
    write_inputs,
)

pytestmark = [
    pytest.mark.slow,
    # Raised inside Ray Data (its own deprecated settings), not by our calls.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray instance this test process drives, and its address for the CLI
    processes that join it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_both_engines_give_identical_predictions(registry, ray_address, tmp_path):
    path = registry.register(MODEL, seed=11)
    rows = write_inputs(tmp_path / "in", files=2, rows=2_000, row_group=400)
    common = [
        str(tmp_path / "in"),
        "--features",
        ",".join(FEATURES),
        "--keys",
        "id,region",
        "--partition-by",
        "region",
        "--chunk-rows",
        "800",
        "--batch-rows",
        "300",
    ]
    assert score(registry, *common, "--output", str(tmp_path / "local")) == 0
    # This process is already connected to Ray: the job runs on that instance.
    assert (
        score(
            registry,
            *common,
            "--output",
            str(tmp_path / "ray"),
            "--engine",
            "ray",
            "--ray-actors",
            "2",
        )
        == 0
    )
    local = read_output(tmp_path / "local")
    on_ray = read_output(tmp_path / "ray")
    assert on_ray.column_names == local.column_names
    assert on_ray.schema == local.schema
    assert on_ray.drop_columns(["scored_at"]).equals(local.drop_columns(["scored_at"]))
    assert on_ray[ROW_COLUMN].to_pylist() == list(range(4_000))
    predictions = np.array(on_ray["output"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(predictions, ort_outputs(path, matrix(rows)))
    # The same chunks, hence the same part files, in the same partitions.
    assert sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("part-*")) == (
        sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("part-*"))
    )
    assert (tmp_path / "ray" / SUCCESS_NAME).exists()


def test_a_ray_job_killed_half_way_resumes_exactly_once(registry, ray_address, tmp_path):
    path = registry.register(MODEL, seed=12)
    rows = write_inputs(tmp_path / "in", files=2, rows=3_000, row_group=500)
    out = tmp_path / "out"
    command = score_command(registry, tmp_path, "--engine", "ray", "--ray-address", ray_address)
    # The driver pauses after each commit; the actors run ahead (their files, renamed
    # into place but not committed, are orphans for the re-run to delete).
    kill_after(command, partial(_committed, out), committed=2, delay_s=0.3)
    assert not (out / SUCCESS_NAME).exists()

    # The re-run, from this process (already connected to the same Ray instance).
    assert main(command[3:]) == 0
    assert_every_row_once(out, rows, path)
    assert all(pq.read_metadata(p).num_rows for p in out.rglob("part-*"))


def test_ray_engine_refuses_csv_input(registry, ray_address, tmp_path, capsys):
    registry.register(MODEL, seed=13)
    pa_csv.write_csv(input_table(10), tmp_path / "in.csv")
    args = [
        str(tmp_path / "in.csv"),
        "--features",
        ",".join(FEATURES),
        "--output",
        str(tmp_path / "out"),
    ]
    assert score(registry, *args, "--engine", "ray") == 2
    assert "--engine ray reads Parquet files" in capsys.readouterr().err


def test_an_address_where_no_cluster_answers_fails_fast():
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"no Ray cluster answers at 127\.0\.0\.1:1"):
        _check_reachable("127.0.0.1:1")
    assert time.monotonic() - started < 10
    _check_reachable("auto")  # resolved by Ray itself


def test_a_bundle_model_scores_alike_on_both_engines(
    registry, feature_service, ray_address, tmp_path
):
    common, _events = bundle_job(
        registry, feature_service, tmp_path, seed=15, hidden=8, events_seed=8
    )
    model = f"{BUNDLE_MODEL}/1"
    assert score(registry, *common, "--output", str(tmp_path / "local"), model=model) == 0
    ray_args = ["--engine", "ray", "--output", str(tmp_path / "ray")]
    assert score(registry, *common, *ray_args, model=model) == 0
    local = read_output(tmp_path / "local").drop_columns(["scored_at"])
    on_ray = read_output(tmp_path / "ray").drop_columns(["scored_at"])
    assert on_ray.equals(local)
    rejected = on_ray["rejected"].to_pylist()
    assert any(r is None for r in rejected) and any(rejected)  # both cases occur
