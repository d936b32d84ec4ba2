"""FileRoots: what a named path resolves to, and that nothing outside is ever one."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelplane.kernel.errors import AlreadyExists, InvalidArgument
from modelplane.services.feature.files import FileRoots, named_file, write_new_file


@pytest.fixture
def roots(tmp_path):
    for name in ("a", "b", "outside"):
        (tmp_path / name).mkdir()
    return FileRoots([tmp_path / "a", tmp_path / "b"], "source_roots")


def test_relative_paths_resolve_under_the_first_root_absolute_ones_under_any(roots, tmp_path):
    assert roots.resolve("x.parquet") == tmp_path / "a" / "x.parquet"
    (tmp_path / "b" / "y.parquet").touch()
    assert roots.resolve("y.parquet") == tmp_path / "a" / "y.parquet"
    assert (
        roots.resolve(str(tmp_path / "b" / "z" / "w.parquet")) == tmp_path / "b" / "z" / "w.parquet"
    )
    assert roots.resolve(".") == tmp_path / "a"


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "../outside/x", "d/../../outside/x", "a\x00b", "x" * 5000]
)
def test_paths_that_are_not_inside_resolve_to_nothing(roots, path):
    assert roots.resolve(path) is None


def test_symlinks_that_leave_a_root_resolve_to_nothing(roots, tmp_path):
    (tmp_path / "a" / "out").symlink_to(tmp_path / "outside")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a" / "loop")
    (tmp_path / "a" / "in").symlink_to(tmp_path / "b")
    assert roots.resolve("out/x.parquet") is None
    assert roots.resolve(str(tmp_path / "a" / "out" / "x.parquet")) is None
    assert roots.resolve("loop") is None
    assert roots.resolve("in/x.parquet") == tmp_path / "b" / "x.parquet"  # still inside


def test_named_files_name_the_field_and_the_setting(roots):
    with pytest.raises(InvalidArgument, match=r"output_path.*source_roots") as error:
        named_file(roots, "/etc/passwd", "output_path")
    assert "passwd" not in str(error.value)


def test_a_new_file_never_replaces_an_existing_one(tmp_path):
    target = tmp_path / "out" / "t.parquet"
    table = pa.table({"x": [1]})
    write_new_file(target, lambda p: pq.write_table(table, p), "output_path")
    before = target.read_bytes()
    with pytest.raises(AlreadyExists, match="output_path"):
        write_new_file(target, lambda p: pq.write_table(pa.table({"y": [2]}), p), "output_path")
    assert target.read_bytes() == before
    with pytest.raises(InvalidArgument, match="folder"):
        write_new_file(tmp_path / "out", lambda p: p.touch(), "output_path")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.parquet"]
