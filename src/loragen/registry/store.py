"""The registry's SQL, kept behind this one small module so another database could be plugged in.

Connections run in autocommit mode; every change goes through `transaction()`, so a crash leaves
either the whole change or none of it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# AUTOINCREMENT: ids are never reused, so a description id always names one vector in the index.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experts (
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, base_model TEXT NOT NULL,
  rank INTEGER NOT NULL, alpha REAL NOT NULL, targets TEXT NOT NULL, sha256 TEXT NOT NULL,
  created TEXT NOT NULL, metrics TEXT NOT NULL, tags TEXT NOT NULL, fidelity REAL,
  source_sha256 TEXT);
CREATE TABLE IF NOT EXISTS descriptions (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  expert_id INTEGER NOT NULL REFERENCES experts(id) ON DELETE CASCADE,
  text TEXT NOT NULL, embedding BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
  expert_id INTEGER NOT NULL REFERENCES experts(id) ON DELETE CASCADE,
  position INTEGER NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (expert_id, position));
CREATE INDEX IF NOT EXISTS descriptions_by_expert ON descriptions(expert_id);
"""

JSON_COLUMNS = ("targets", "metrics", "tags")


class Store:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """`read_only`: SQLite's own read-only mode (`mode=ro`); any write raises. The database
        must exist, and a writer has already set its schema and WAL journal."""
        if read_only:
            self.conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        else:
            self.conn = sqlite3.connect(str(path), isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA foreign_keys=ON")
        if not read_only:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # meta
    def meta(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self.conn.execute("SELECT key, value FROM meta")}

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # experts
    def insert_expert(self, row: dict[str, Any]) -> int:
        row = _encode(row)
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cur = self.conn.execute(f"INSERT INTO experts ({cols}) VALUES ({marks})", tuple(row.values()))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def update_expert(self, expert_id: int, **fields: Any) -> None:
        fields = _encode(fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(f"UPDATE experts SET {sets} WHERE id = ?", (*fields.values(), expert_id))

    def delete_expert(self, expert_id: int) -> None:
        self.conn.execute("DELETE FROM experts WHERE id = ?", (expert_id,))

    def experts(self, *, id: int | None = None, name: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM experts", ()
        if id is not None:
            query, args = query + " WHERE id = ?", (id,)
        elif name is not None:
            query, args = query + " WHERE name = ?", (name,)
        rows = [dict(r) for r in self.conn.execute(query + " ORDER BY id", args)]
        for r in rows:
            for c in JSON_COLUMNS:
                r[c] = json.loads(r[c])
        return rows

    # descriptions
    def insert_description(self, expert_id: int, text: str, embedding: np.ndarray) -> int:
        blob = np.ascontiguousarray(embedding, dtype=np.float32).tobytes()
        cur = self.conn.execute(
            "INSERT INTO descriptions (expert_id, text, embedding) VALUES (?, ?, ?)", (expert_id, text, blob)
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def description_texts(self, expert_id: int) -> list[str]:
        q = "SELECT text FROM descriptions WHERE expert_id = ? ORDER BY id"
        return [r["text"] for r in self.conn.execute(q, (expert_id,))]

    def descriptions(self) -> list[tuple[int, str]]:
        return [(r["id"], r["text"]) for r in self.conn.execute("SELECT id, text FROM descriptions ORDER BY id")]

    def describe(self, ids: Iterable[int]) -> dict[int, tuple[int, str, str]]:
        """description id -> (expert id, expert name, description text)."""
        ids = [int(i) for i in ids]
        out: dict[int, tuple[int, str, str]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            q = (
                "SELECT d.id, d.expert_id, e.name, d.text FROM descriptions d "
                f"JOIN experts e ON e.id = d.expert_id WHERE d.id IN ({marks})"
            )
            for r in self.conn.execute(q, chunk):
                out[r["id"]] = (r["expert_id"], r["name"], r["text"])
        return out

    def embeddings(self, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(description ids, expert ids, (n, dim) float32 embeddings), ordered by description id."""
        rows = self.conn.execute("SELECT id, expert_id, embedding FROM descriptions ORDER BY id").fetchall()
        ids = np.array([r["id"] for r in rows], dtype=np.int64)
        experts = np.array([r["expert_id"] for r in rows], dtype=np.int64)
        vecs = np.stack([np.frombuffer(r["embedding"], dtype=np.float32) for r in rows]) if rows else None
        return ids, experts, vecs if vecs is not None else np.zeros((0, dim), dtype=np.float32)

    def description_ids(self) -> np.ndarray:
        return np.array([r[0] for r in self.conn.execute("SELECT id FROM descriptions")], dtype=np.int64)

    def embeddings_of(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(description ids, (n, dim) float32 embeddings) of those of `ids` that exist."""
        found: list[int] = []
        vecs: list[np.ndarray] = []
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            q = f"SELECT id, embedding FROM descriptions WHERE id IN ({', '.join('?' for _ in chunk)})"
            for r in self.conn.execute(q, chunk):
                found.append(r["id"])
                vecs.append(np.frombuffer(r["embedding"], dtype=np.float32))
        return np.array(found, dtype=np.int64), np.stack(vecs) if vecs else np.zeros((0, 0), dtype=np.float32)

    def data_version(self) -> int:
        """Changes when another connection (in any process) commits to the database."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def set_embedding(self, description_id: int, embedding: np.ndarray) -> None:
        blob = np.ascontiguousarray(embedding, dtype=np.float32).tobytes()
        self.conn.execute("UPDATE descriptions SET embedding = ? WHERE id = ?", (blob, description_id))

    # checkpoints
    def set_checkpoints(self, expert_id: int, shas: list[str]) -> None:
        self.conn.execute("DELETE FROM checkpoints WHERE expert_id = ?", (expert_id,))
        self.conn.executemany(
            "INSERT INTO checkpoints (expert_id, position, sha256) VALUES (?, ?, ?)",
            [(expert_id, i, sha) for i, sha in enumerate(shas)],
        )

    def checkpoints(self, expert_id: int) -> list[str]:
        q = "SELECT sha256 FROM checkpoints WHERE expert_id = ? ORDER BY position"
        return [r["sha256"] for r in self.conn.execute(q, (expert_id,))]

    def referenced_blobs(self) -> set[str]:
        shas = {r[0] for r in self.conn.execute("SELECT sha256 FROM checkpoints")}
        shas |= {r[0] for r in self.conn.execute("SELECT source_sha256 FROM experts WHERE source_sha256 IS NOT NULL")}
        return shas


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if k in JSON_COLUMNS else v for k, v in row.items()}
