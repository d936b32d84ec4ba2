"""The folders the feature service may read and write, and nothing outside them.

A caller names server-side files (a view's `source.path`, a training set's
`entity_path` and `output_path`); left unchecked, `ApplyDefinitions` plus
`Materialize` read any file of the host and serve its values, and an error that
says "not found" or quotes a size tells an outsider what exists. So every such
path is resolved inside configured roots: relative to a root (or absolute but
inside one), without `..`, and after resolving symlinks still inside (resolve,
then `is_relative_to`). A path that is not inside gets one answer whatever the
filesystem holds there, so errors reveal nothing about the rest of the machine.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath

from modelplane.kernel.errors import AlreadyExists, InvalidArgument
from modelplane.services.feature.domain import Definition, FeatureView

# Longer paths are refused before touching the filesystem (PATH_MAX on Linux).
MAX_PATH_LENGTH = 4096


class FileRoots:
    """Folders under which named paths must lie. A relative path is taken from the
    first; an absolute one may lie in any."""

    def __init__(self, roots: Sequence[Path], setting: str) -> None:
        if not roots:
            raise ValueError(f"{setting}: at least one folder is required")
        self.setting = setting
        self.roots = [Path(os.path.abspath(r)).resolve() for r in roots]

    def resolve(self, path: str) -> Path | None:
        """The real path inside a root, or None when `path` is not one (absolute outside
        every root, with `..`, through a symlink that leaves, or not a usable path).
        Never reveals why: callers answer every None the same way."""
        if not path or len(path) > MAX_PATH_LENGTH or "\x00" in path:
            return None
        given = PurePath(path)
        if ".." in given.parts:
            return None
        candidate = Path(given) if given.is_absolute() else self.roots[0] / given
        try:
            real = candidate.resolve()
        except (OSError, RuntimeError, ValueError):
            return None  # a symlink loop or an unusable name: not inside
        if any(real.is_relative_to(root) for root in self.roots):
            return real
        return None

    def contains(self, path: str | Path) -> bool:
        return self.resolve(str(path)) is not None


def confine_sources(definitions: Sequence[Definition], roots: FileRoots) -> None:
    """ApplyDefinitions' check: each view's source lies inside the source roots. The
    file need not exist yet (a pipeline may write it later); Materialize checks again,
    as a symlink may have changed since."""
    for definition in definitions:
        source = definition.source if isinstance(definition, FeatureView) else None
        if source is not None and roots.resolve(source.path) is None:
            raise InvalidArgument(
                f"feature view {definition.name!r}: source.path must be a path "
                f"relative to the service's source folders (setting {roots.setting}), "
                "or an absolute path inside one, without '..'"
            )


def named_file(roots: FileRoots, path: str, field: str) -> Path:
    """A request's server-side path inside the roots, or InvalidArgument naming the field."""
    resolved = roots.resolve(path)
    if resolved is None:
        raise InvalidArgument(
            f"{field} must be a path relative to the service's files folder "
            f"(setting {roots.setting}), without '..'"
        )
    return resolved


def write_new_file(
    target: Path, write: Callable[[Path], None], field: str, overwrite: bool = False
) -> None:
    """Writes a file that must not exist yet: `write` fills a temporary file beside it,
    which is then linked into place (atomic, and failing if the name was taken meanwhile),
    so an existing file is never overwritten and a reader never sees half a file. With
    `overwrite`, an existing file is replaced (renamed over, just as atomically); a
    symlink there is refused either way, since it may point outside."""
    if target.is_dir():
        raise InvalidArgument(f"{field} names a folder, not a file")
    if target.is_symlink():
        raise InvalidArgument(f"{field} names a link; write to a plain file name")
    if target.exists() and not overwrite:
        raise AlreadyExists(f"{field} already exists; choose another name or remove it first")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        raise InvalidArgument(f"{field}: its folder cannot be created") from None
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        try:
            if overwrite:
                os.replace(temporary, target)
            else:
                os.link(temporary, target)
        except FileExistsError:
            raise AlreadyExists(
                f"{field} already exists; choose another name or remove it first"
            ) from None
        except IsADirectoryError:
            raise InvalidArgument(f"{field} names a folder, not a file") from None
    finally:
        temporary.unlink(missing_ok=True)
