"""The files of one checkpoint directory: the completeness marker and its manifest, and what a
failed write means.

``COMPLETE`` is the last file a save writes: JSON with the step and, for every other file of
the directory, its size and CRC-32. A directory without it is incomplete; one whose files do
not match it is corrupt. Both are skipped by resume (``verify`` says why, naming the file).
Every file is flushed to disk (``fsync``) before the marker is written, and the marker before
the directory is renamed into place, so a checkpoint that looks complete after a crash or a
power cut is complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib
from pathlib import Path

MARKER = "COMPLETE"
FORMAT = 1
_CHUNK = 1 << 24


def _crc32(path: Path, sync: bool = False) -> int:
    """The file's CRC-32 (and, with ``sync``, its data flushed to disk)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
        if sync:
            os.fsync(fh.fileno())
    return crc


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """``path`` replaced by ``obj`` as JSON, flushed to disk, in one rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


def write_marker(directory: Path, step: int) -> None:
    """Sync every file of ``directory`` and write ``COMPLETE`` (sizes and CRC-32s) last."""
    files = {}
    for p in _files(directory):
        files[p.relative_to(directory).as_posix()] = {
            "size": p.stat().st_size, "crc32": _crc32(p, sync=True)}
    for sub in sorted({p.parent for p in _files(directory)} | {directory}):
        fsync_dir(sub)
    write_json_atomic(directory / MARKER, {"format": FORMAT, "step": step, "files": files})


def is_complete(directory: Path) -> bool:
    return (Path(directory) / MARKER).is_file()


def verify(directory: Path) -> str | None:
    """None when ``directory`` is a complete checkpoint whose files match its ``COMPLETE``
    manifest; else why not, in one line naming the file."""
    directory = Path(directory)
    marker = directory / MARKER
    if not marker.is_file():
        return f"{directory.name}: incomplete (no {MARKER} marker: the save was interrupted)"
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and int(manifest["step"]) >= 0
    except Exception as exc:  # noqa: BLE001 (any damage to the marker means the same)
        return f"{marker}: unreadable {MARKER} marker ({type(exc).__name__}: {exc})"
    for rel, want in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{path}: missing (listed in {MARKER})"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{path}: {size} bytes, {MARKER} records {want.get('size')} (truncated?)"
        if _crc32(path) != want.get("crc32"):
            return f"{path}: contents do not match the CRC-32 in {MARKER} (corrupt)"
    return None


_DISK_FULL_TEXT = ("no space left on device", "unexpected pos", "file write failed",
                   "disk quota exceeded")


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, the serialisers' own words for
    it (torch's zip writer says "unexpected pos"), or no free space left at ``directory``."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    if any(t in text for t in _DISK_FULL_TEXT):
        return True
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"
