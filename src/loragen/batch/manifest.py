"""`manifest.jsonl`: one record per (item, method) attempt, appended a chunk at a time.

Each append is one write followed by flush and fsync, so an interrupted run leaves every finished
chunk on disk. A torn last line (a kill in the middle of a write) is ignored when read, and the
next append starts on a fresh line. When a pair has several records (a retried failure), the last
one wins, and `compact()` rewrites the file atomically with that one record per pair.

Records: `id`, `method` (None for a line that could not be read), `status` (`ok` | `error`),
`path` (the adapter directory, relative to the manifest's folder), `neighbours`, `ood`,
`clipped`, `ambiguous`, what the generator made of examples (`examples_used`,
`examples_from_description`, `examples_fit`, `examples_ood`), `timings` (seconds), `line`, and
`error` for a failure.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..adapters import atomic

log = logging.getLogger(__name__)
NAME = "manifest.jsonl"
Key = tuple[str, str | None]


class Manifest:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.latest: dict[Key, dict[str, Any]] = {}
        self._needs_newline = False
        self._stale_lines = 0  # superseded records and torn lines that compact() drops
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        self._needs_newline = bool(data) and not data.endswith(b"\n")
        torn = 0
        for raw in data.splitlines():
            try:
                record = json.loads(raw)
                key = (str(record["id"]), record.get("method"))
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            self._stale_lines += key in self.latest
            self.latest[key] = record
        self._stale_lines += torn
        if torn:
            log.warning("%s: ignored %d unreadable line(s) (an interrupted write)", self.path, torn)

    def record(self, item_id: str, method: str | None) -> dict[str, Any] | None:
        return self.latest.get((item_id, method))

    def is_done(self, item_id: str, method: str) -> bool:
        """An `ok` record whose adapter directory is still complete on disk."""
        rec = self.latest.get((item_id, method))
        if rec is None or rec.get("status") != "ok":
            return False
        adapter = self.path.parent / rec["path"]
        return (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        if not records:
            return
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
        if self._needs_newline:
            text = "\n" + text
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self._needs_newline = False
        for r in records:
            key = (str(r["id"]), r.get("method"))
            self._stale_lines += key in self.latest
            self.latest[key] = r

    def compact(self) -> bool:
        """Rewrite the file with one record per (id, method), the latest, in first-seen order, when
        it holds superseded records or torn lines; returns whether it did. The new file replaces
        the old in one rename, so a kill leaves one or the other, never a mix."""
        if not self._stale_lines:
            return False
        text = "".join(json.dumps(r, default=str) + "\n" for r in self.latest.values())
        atomic.write_bytes(self.path, text.encode("utf-8"))
        self._stale_lines, self._needs_newline = 0, False
        return True
