"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

A write that fails for the environment's sake (disk full, read-only filesystem, no permission) raises
StorageError naming the path and the fix; the old file is untouched and the temporary one removed. A kill -9
mid-write can leave a temporary beside its target: `prune_partial` removes those when a role starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flora.errors import StorageError

# What the writers here (and flora.modeling.adapter.save_adapter_dir) leave when killed mid-write:
# mkstemp/mkdtemp names `.{target}.XXXXXXXX`, atomic_path's `.{target}.partial`, a swap's `.{target}.old`.
PARTIAL_NAME = re.compile(r"^\.(?P<target>.+)\.(partial|old|[a-z0-9_]{8})$")

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
ENVIRONMENT_ERRNOS = frozenset(_FULL + _DENIED)


def os_error_of(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, its cause, or one a library only described (safetensors' Rust writer
    raises SafetensorError "... Os { code: 28, ... }" for a full disk)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        code = re.search(r"\bos error (\d+)|Os \{ code: (\d+)", str(seen))
        if code:
            number = int(code.group(1) or code.group(2))
            return OSError(number, os.strerror(number))
        seen = seen.__cause__ or seen.__context__
    return None


def storage_error(path: str | Path, exc: OSError, *, what: str = "write") -> StorageError:
    """One line naming `path`, what the OS said, and what to do about it."""
    path = Path(path)
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL:
        fix = f"free space on the filesystem of {path.parent} (see `df -h {path.parent}`), then rerun"
    elif exc.errno in _DENIED:
        fix = f"make {path.parent} writable by this user, or set the setting that names it to a writable directory"
    else:
        fix = "check the disk and the path, then rerun"
    return StorageError(f"cannot {what} {path}: {reason}; {fix} (files already written are intact)")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """For writers that take a file name (ONNX, safetensors): yields a hidden name beside `path` to write to,
    renamed to `path` when the block succeeds and removed when it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):  # nothing to remove (the directory may not even exist)
            tmp.unlink(missing_ok=True)


def check_writable(directory: str | Path, setting: str) -> None:
    """Create `directory` if needed and write a probe file in it: a role checks its output directories when it
    starts, not when its first result is due (after waiting for a fleet). Raises StorageError naming `setting`."""
    directory = Path(directory)
    probe = directory / ".flora-write-probe"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"probe\n" * 512)  # a few KB, so a full disk shows here rather than at the first checkpoint
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        error = storage_error(probe, exc)
        raise StorageError(f"{setting} is not writable: {error}") from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def prune_partial(directory: str | Path) -> list[Path]:
    """Remove what an interrupted atomic write left in `directory` (not recursive); returns what was removed."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = PARTIAL_NAME.match(entry.name)
        if match is None or entry.name == ".flora-write-probe":
            continue
        if entry.name.endswith(".old") and not (directory / match["target"]).exists():
            continue  # killed mid-swap: the old copy is the only one left, so it stays
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
