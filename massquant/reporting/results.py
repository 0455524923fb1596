"""Results as JSON: written atomically, with what is needed to reproduce them."""

from __future__ import annotations

import json
import math
import os
import platform
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
    """Checked before any work starts, so a bad --out costs nothing."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-", delete=True)
        probe.close()
    except OSError as error:
        raise UserError(f"output directory '{directory}' is not writable ({error.strerror})") from None
    return path


def write_json_atomic(path: str | os.PathLike, payload) -> Path:
    """Write to a temporary file beside the target, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_json(payload)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def environment() -> dict:
    """Package versions, Python, platform, and what decides torch's CPU kernels (instruction set, threads):
    another machine's kernels round differently, which moves quantized numbers (see the README's noise floor)."""
    versions = {}
    for package in ("massquant", "torch", "transformers", "lm-eval", "gguf", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
    }
