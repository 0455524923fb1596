"""Results as JSON: written atomically, with what is needed to reproduce them."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from massquant.errors import UserError


def _jsonable(value):
    """NaN and inf are not JSON; they are written as null so every file stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def to_json(payload) -> str:
    return json.dumps(_jsonable(payload), indent=2, allow_nan=False)


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Checked before any work starts, so a bad --out costs nothing. Folders created for the check are
    removed again: a command that fails later leaves nothing behind; writers create them when they write."""
    path = Path(directory)
    created = [folder for folder in (path, *path.parents) if not folder.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-", delete=True)
        probe.close()
    except OSError as error:
        raise UserError(f"output directory '{directory}' is not writable ({error.strerror})") from None
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
    return path


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Around a write of ``path`` (a plot, a table): its folder is created, and a failed write is one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
    except OSError as error:
        raise UserError(f"cannot write '{path}' ({error.strerror or error})") from None


def write_atomic(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write to a temporary file beside the target, then rename: readers never see half a file, and a write
    that fails (a full or read-only disk) leaves the previous file as it was."""
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    handle = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException as error:
        if handle is not None:
            Path(handle.name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UserError(f"cannot write '{path}' ({error.strerror or error}); the previous file, if any, is unchanged") from None
        raise
    return path


def write_json_atomic(path: str | os.PathLike, payload) -> Path:
    return write_atomic(path, to_json(payload) + "\n")


_COMMAND_LINE: list[str] = []  # set by the CLI's main(); stays empty when massquant is used as a library


def record_command_line(arguments: list[str]) -> None:
    """The CLI's arguments, so that results say how they were made (``environment()["command_line"]``)."""
    _COMMAND_LINE[:] = ["massquant", *arguments]


def environment() -> dict:
    """Package versions, Python, platform, and what decides torch's CPU kernels (instruction set, threads):
    another machine's kernels round differently, which moves quantized numbers (see the README's noise floor)."""
    versions = {}
    for package in ("massquant", "torch", "transformers", "lm-eval", "gguf", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    recorded = {"command_line": shlex.join(_COMMAND_LINE)} if _COMMAND_LINE else {}
    return {
        "versions": versions, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(), **recorded,
    }
