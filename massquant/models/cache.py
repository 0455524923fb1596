"""On-disk cache of de-quantized GGUF weights, so only the first load of a GGUF model pays for de-quantization.

A GGUF model is de-quantized by transformers on every load (about 25 s for
SmolLM2-135M, 90 s for Gemma 3 270M on 2 cores). After the first load the
de-quantized model and its tokenizer are saved as an ordinary Hugging Face
directory (safetensors) under ``cache_root()/weights/KEY``, where KEY names the
GGUF file's content hash, the dtype and the transformers version that
de-quantized it; later loads read that directory in seconds.

Entries are written into a temporary directory and renamed into place, so a
reader never sees a half-written one; each carries a manifest with the size and
sha256 of every file, checked before use, so a truncated or altered entry is
removed and rebuilt from the GGUF file.

Where: ``$MASSQUANT_CACHE_DIR`` if set (``off`` disables the cache), else
``$XDG_CACHE_HOME/massquant``, else ``~/.cache/massquant``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

CACHE_ENV = "MASSQUANT_CACHE_DIR"
DISABLED = ("off", "none", "0", "")
MANIFEST = "massquant-cache.json"
FORMAT = 1  # bump when what an entry holds changes; old entries are then never read


def cache_home() -> Path:
    """massquant's cache directory: ``$MASSQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/massquant``, else ``~/.cache/massquant``."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value and value.lower() not in DISABLED:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "massquant"


def cache_root() -> Path | None:
    """Where GGUF files are rebuilt and de-quantized weights kept: ``cache_home()``, or None when
    ``$MASSQUANT_CACHE_DIR`` is ``off``."""
    value = os.environ.get(CACHE_ENV)
    return None if value is not None and value.strip().lower() in DISABLED else cache_home()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's content; computed once per process for an unchanged file (size and mtime)."""
    status = os.stat(path)
    return _sha256(str(Path(path).resolve()), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_key(source_sha256: str, dtype: str) -> str:
    """The directory name of the entry for a GGUF file's content hash and a dtype."""
    import transformers

    return f"{source_sha256[:32]}-{dtype}-transformers{transformers.__version__}-v{FORMAT}"


def _warn(message: str) -> None:
    print(f"massquant: {message}", file=sys.stderr)


def _manifest(directory: Path, source_sha256: str, dtype: str) -> dict:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    return {
        "format": FORMAT,
        "source_sha256": source_sha256,
        "dtype": dtype,
        "files": {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files},
    }


def _is_intact(directory: Path, source_sha256: str, dtype: str) -> bool:
    """Whether an entry is complete and unaltered: its manifest matches, every listed file has its size and hash."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if (manifest.get("format"), manifest.get("source_sha256"), manifest.get("dtype")) != (FORMAT, source_sha256, dtype):
            return False
        listed = manifest["files"]
        present = {p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST}
        if set(listed) != present or "config.json" not in present:
            return False
        for name, expected in listed.items():
            path = directory / name
            # sizes first: a truncated file is found without reading a byte
            if path.stat().st_size != expected["size"]:
                return False
        return all(file_sha256(directory / name) == expected["sha256"] for name, expected in listed.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def lookup(source_sha256: str, dtype: str) -> Path | None:
    """The intact cached directory for this GGUF content and dtype, or None (a damaged entry is removed)."""
    root = cache_root()
    if root is None:
        return None
    directory = root / "weights" / entry_key(source_sha256, dtype)
    if not directory.exists():
        return None
    if _is_intact(directory, source_sha256, dtype):
        return directory
    _warn(f"cached weights in {directory} are incomplete or damaged; rebuilding them from the GGUF file")
    shutil.rmtree(directory, ignore_errors=True)
    return None


def store(model, tokenizer, source_sha256: str, dtype: str) -> Path | None:
    """Save a de-quantized GGUF model and its tokenizer as a cache entry (atomically); None when not written.

    The model must already be free of its GGUF markers (``save_pretrained``
    refuses a GGUF-quantized model). A failure to write (read-only or full
    disk) is a warning, never an error: the model is already loaded.
    """
    root = cache_root()
    if root is None:
        return None
    final = root / "weights" / entry_key(source_sha256, dtype)
    temporary = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / MANIFEST).write_text(json.dumps(_manifest(temporary, source_sha256, dtype), indent=1))
        os.rename(temporary, final)  # atomic; fails when another process finished the same entry first
        return final
    except OSError as error:
        if not final.exists():
            _warn(f"could not cache de-quantized weights in {final.parent} ({error}); the next load de-quantizes again")
        return final if final.exists() else None
    finally:
        if temporary is not None and temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def config_file(gguf_path: Path) -> Path:
    """Where a GGUF model's config is kept once read, so later runs check configurations before loading."""
    from massquant.fingerprints import CACHE_FILE, file_digest

    return CACHE_FILE.parent / "configs" / f"{file_digest(gguf_path)}.json"


def remember_config(gguf_path: Path, hf_config) -> None:
    """Keep a GGUF model's config (read while loading it) for ``config_file``. Best effort."""
    from massquant.errors import UserError
    from massquant.reporting.results import write_json_atomic

    try:
        write_json_atomic(config_file(gguf_path), hf_config.to_dict())
    except (OSError, UserError, TypeError, ValueError):
        pass
