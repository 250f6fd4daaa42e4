"""Atomic file writes: a file labkit writes is either the complete new file or the old one, never half of either.

Written by hand because the standard library has the parts (``tempfile.mkstemp``, ``os.fsync``, ``os.replace``) but no
helper that puts them together with checked targets and one error type.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labkit.core.errors import InvalidArgument, SaveError


def check_target(path: Any, name: str = "path") -> Path:
    """``path`` as a Path a file can be written to: InvalidArgument (naming ``name``) for a value that is not a path,
    an existing folder, or a parent that is a regular file. Nothing is created."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise InvalidArgument(f"{name} must be a file path (str or pathlib.Path); got {path!r}")
    target = Path(path).expanduser()
    if target.is_dir():
        raise InvalidArgument(f"{name} {str(target)!r} is a folder; give a file path inside it")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidArgument(f"{name} {str(target)!r} is under {str(parent)!r}, which is a file, not a folder")
            break
    return target


@contextlib.contextmanager
def atomic_path(path: Any, name: str = "path") -> Iterator[Path]:
    """Yield a temporary path in the target's folder to write to; on success it is fsynced and renamed onto
    ``path`` (atomic on POSIX and Windows), on any failure it is removed and the old file stays as it was. OSError
    becomes SaveError naming the path."""
    target = check_target(path, name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise SaveError(f"cannot write {str(target)!r}: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        raise SaveError(f"cannot write {str(target)!r} (the previous file, if any, is untouched): "
                        f"{e.strerror or e}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
