"""Content fingerprints of input files: bytes hashed once, remembered by path, size and modification time.

A recipe cell is identified by what it measured (the model's files, the texts'
bytes), not by their names; hashing a 100 MB model on every run would cost
more than the check it enables, so each file's digest is kept in a small JSON
cache and recomputed only when its size or mtime changes (a rewrite in place
changes the mtime). The cache is best effort: unreadable or unwritable, it is
ignored and files are hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from massquant.errors import UserError

CACHE_FILE = Path(os.environ.get("MASSQUANT_CACHE_DIR", Path.home() / ".cache" / "massquant")) / "fingerprints.json"
PREFIX = "sha256:"
_memory: dict[str, dict] = {}  # this process's view of the cache, read once


def _cache() -> dict:
    if not _memory:
        try:
            loaded = json.loads(CACHE_FILE.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            loaded = {}
        _memory.update(loaded if isinstance(loaded, dict) else {})
    return _memory


def _save() -> None:
    from massquant.reporting.results import write_json_atomic

    try:
        write_json_atomic(CACHE_FILE, _memory)
    except (OSError, UserError):
        pass  # a read-only or full cache directory only costs hashing again next time


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes; cached by (real path, size, mtime)."""
    path = Path(path)
    try:
        status = path.stat()
        real = str(path.resolve())
    except OSError as error:
        raise UserError(f"cannot read '{path}': {error.strerror}") from None
    stamp = [status.st_size, status.st_mtime_ns]
    entry = _cache().get(real)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except OSError as error:
        raise UserError(f"cannot read '{path}': {error.strerror}") from None
    _memory[real] = {"stamp": stamp, "sha256": digest.hexdigest()}
    _save()
    return _memory[real]["sha256"]


def files_fingerprint(paths: list[Path], root: Path | None = None) -> str:
    """One fingerprint of several files: their names (relative to ``root``) and contents, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        name = str(path.relative_to(root)) if root else path.name
        digest.update(f"{name}\0{file_digest(path)}\n".encode())
    return PREFIX + digest.hexdigest()[:16]
