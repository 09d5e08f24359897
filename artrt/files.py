"""Atomic file writes: the one helper every writer of artrt uses (packages, engines, images,
sampling records), so a crash or a full disk never leaves a half-written file under a final name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from artrt.errors import OutputError


def write_atomic(path: str | Path, data: bytes | bytearray | memoryview | Callable[[Path], None]) -> Path:
    """Write ``data`` to ``path``: into a temporary file beside it, fsync, rename over ``path``,
    then fsync the directory. ``data`` is the bytes, or a function that writes a given path
    (e.g. ``lambda p: torch.save(state, p)``). Raises :class:`OutputError` with one line when the
    file cannot be written; the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_directory(path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
