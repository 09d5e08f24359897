"""The output directory of ``artrt sample``: images, ``metadata.jsonl``, ``run.json``.

Write order per image: PNG (a video: animated WebP) to a temporary file, fsync, rename to
``images/<id>.png`` (``.webp``);
only then one complete ``metadata.jsonl`` line, flushed and fsynced. A run stopped at
any point leaves at most a finished image without its record (redone on resume), a
temporary file (deleted on resume) or a torn last line (cut off on resume). Resuming
keeps a record only when its image exists with the sha256 it names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artrt.errors import InputError
from artrt.files import write_atomic

from .tasks import GENERATION_FIELDS, ImageTask

log = logging.getLogger(__name__)

IMAGES = "images"
METADATA = "metadata.jsonl"
RUN = "run.json"
LOCK = ".lock"
SUFFIXES = (".png", ".webp")  # an image, a video
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Resumed:
    """What an earlier run left: records of images that are present and intact, by id."""

    records: dict[str, dict[str, Any]]
    dropped: int  # records removed: torn, duplicate, or their image missing or changed
    foreign: int  # intact records of ids that are not images of this job (kept)
    previous: dict[str, Any] | None  # the earlier run.json


class OutputDir:
    """One job's output directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.images = self.root / IMAGES
        self.metadata = self.root / METADATA
        self.run_file = self.root / RUN
        self._log = None
        self._lock_file = None

    def prepare(self, overwrite: bool) -> None:
        """Create the folders; ``overwrite`` deletes what an earlier run wrote (nothing else)."""
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"--out {self.root} exists and is not a directory")
        if self.root.is_dir() and not self.run_file.exists() and self._foreign_entries():
            raise InputError(f"--out {self.root} holds files but no artrt sample run ({RUN}); artrt sample writes "
                             "only into a new or empty directory or one of its own runs: choose another --out")
        try:
            self.images.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create {self.images}: {exc.strerror or exc}") from None
        if not os.access(self.root, os.W_OK) or not os.access(self.images, os.W_OK):
            raise InputError(f"--out {self.root} is not writable")
        self._lock()
        for tmp in self.images.glob(".*.tmp"):
            tmp.unlink()
        if overwrite:
            for suffix in SUFFIXES:
                for image in self.images.glob(f"*{suffix}"):
                    image.unlink()
            self.metadata.unlink(missing_ok=True)
            self.run_file.unlink(missing_ok=True)

    def _foreign_entries(self) -> list[str]:
        """What a directory without ``run.json`` holds besides what a run leaves before writing it
        (its lock file and an ``images`` folder with only temporary files)."""
        entries = [p for p in self.root.iterdir() if p.name != LOCK]
        return [p.name for p in entries
                if not (p == self.images and p.is_dir() and all(f.name.endswith(".tmp") for f in p.iterdir()))]

    def _lock(self) -> None:
        """Hold an exclusive lock on ``OUT/.lock`` until :meth:`close`: one job per directory."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        self._lock_file = open(self.root / LOCK, "a")  # closed in close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise InputError(f"another artrt sample is writing {self.root}") from None

    def image_path(self, image_id: str, video: bool = False) -> Path:
        return self.images / f"{image_id}{SUFFIXES[video]}"

    def resume(self, tasks: Iterable[ImageTask]) -> Resumed:
        """Read what an earlier run left, verify every image and rewrite ``metadata.jsonl`` with the
        intact records only. A record of one of ``tasks`` with other parameters is an error."""
        wanted = {t.id: t for t in tasks}
        kept: dict[str, dict[str, Any]] = {}
        lines, dropped = self._read_records()
        for record in lines:
            image_id = record.get("id")
            valid = isinstance(image_id, str) and _SAFE_ID.fullmatch(image_id) is not None
            if not valid or image_id in kept or not self._intact(image_id, record):
                dropped += 1
                continue
            task = wanted.get(image_id)
            if task is not None:
                _check_same(task, record, self.metadata)
            kept[image_id] = record
        if dropped or not self._ends_cleanly():
            if dropped:
                log.warning("%s: dropped %d torn, duplicate or unverifiable record(s); their images are redone",
                            self.metadata, dropped)
            self._rewrite(kept.values())
        foreign = sum(1 for i in kept if i not in wanted)
        if foreign:
            log.warning("%s: %d record(s) are not images of this job; kept", self.metadata, foreign)
        return Resumed({i: r for i, r in kept.items() if i in wanted}, dropped, foreign, self.read_run())

    def _read_records(self) -> tuple[list[dict[str, Any]], int]:
        """Parsed records and the number of lines that are not records (a torn tail, mostly)."""
        if not self.metadata.exists():
            return [], 0
        records, bad = [], 0
        for raw in self.metadata.read_bytes().split(b"\n"):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
        return records, bad

    def _ends_cleanly(self) -> bool:
        if not self.metadata.exists() or self.metadata.stat().st_size == 0:
            return True
        with open(self.metadata, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _intact(self, image_id: str, record: dict[str, Any]) -> bool:
        path = self.image_path(image_id, video=record.get("num_frames", 1) != 1)
        return path.is_file() and record.get("sha256") == hashlib.sha256(path.read_bytes()).hexdigest()

    def _rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        data = b"".join(_line(r) for r in records)
        write_atomic(self.metadata, data)

    def write_image(self, image_id: str, data: bytes, video: bool = False) -> Path:
        """Write one PNG (``video``: animated WebP) atomically and durably."""
        path = self.image_path(image_id, video)
        write_atomic(path, data)
        return path

    def append(self, record: dict[str, Any]) -> None:
        """Append one complete line to ``metadata.jsonl`` and fsync it."""
        if self._log is None:
            self._log = open(self.metadata, "ab")  # closed in close()
        self._log.write(_line(record))
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        for f in (self._log, self._lock_file):
            if f is not None:
                f.close()
        self._log = self._lock_file = None

    def read_run(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.run_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_run(self, info: dict[str, Any]) -> None:
        write_atomic(self.run_file, (json.dumps(info, indent=2) + "\n").encode())


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def _check_same(task: ImageTask, record: dict[str, Any], metadata: Path) -> None:
    for name in GENERATION_FIELDS:
        old, new = record.get(name), task.parameters.get(name)
        if old != new:  # "loras" only where LoRAs are applied
            if name == "loras":
                had, asks = _loras_text(old), _loras_text(new)
                if had == asks:
                    asks += " (a LoRA file changed since)"
            else:
                had, asks = f"{name} {_value_text(old)}", _value_text(new)
            raise InputError(f"{metadata} has image {task.id} with {had}, this job asks for {asks}: "
                             "use --overwrite to redo the set, or another --out")


def _value_text(value: Any) -> str:
    return "none" if value is None else repr(value)


def _loras_text(loras: Any) -> str:
    """A record's LoRAs as ``LoRAs FILE:SCALE@EXPERT, ...`` (``no LoRAs`` without any)."""
    if not loras:
        return "no LoRAs"
    if not isinstance(loras, list) or not all(isinstance(x, dict) for x in loras):
        return f"LoRAs {loras!r}"
    return "LoRAs " + ", ".join(f"{Path(str(x.get('file'))).name}:{x.get('scale')}@{x.get('expert')}" for x in loras)
