"""Finished cells on disk: one JSON file per cell, named by the cell's key, written atomically.

A file exists only once its cell has finished (the write is a rename), so an
interrupted run leaves nothing half-written to trip over on resume.
"""

from __future__ import annotations

import json
from pathlib import Path

from massquant.reporting.results import write_json_atomic


class CellCache:
    def __init__(self, run_directory: Path):
        self.directory = Path(run_directory) / "cells"

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> dict | None:
        """The finished cell's record, or None when absent or not one of ours (it is then recomputed)."""
        try:
            record = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def store(self, record: dict) -> Path:
        return write_json_atomic(self.path(record["key"]), record)

    def by_slot(self) -> dict[str, dict]:
        """Every cached record by its slot (its settings without the inputs' fingerprints), to say why a cell
        whose inputs changed is computed again."""
        found: dict[str, dict] = {}
        for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            record = self.load(path.stem)
            if record is not None and isinstance(record.get("slot"), str):
                found[record["slot"]] = record
        return found
