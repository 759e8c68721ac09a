"""An on-disk cache of model responses and judge scores (sqlite3, stdlib), with hit/miss counters.

Why: an UnsafeConcepts evaluation of a full-size model is thousands of generations and an API judge
costs money, so an interrupted run must resume where it stopped and a rerun must cost nothing. Every
answer is written (and committed) as soon as its batch finishes; keys are content hashes of
everything that decides the answer -- model fingerprint (+ adapter hash), prompt, image hashes,
generation settings -- so a changed model, prompt or setting can never be served a stale answer.

sqlite3 in WAL mode lets several ranks of one `torchrun` write to the same file. Nothing secret is
ever part of a key or a value (API keys stay in the judge's memory).

Why it never crashes on its own damage: a cache only saves work, so a row that cannot be read is a
miss (the answer is made again, and counted as `unreadable`), and a file that is not a database at
all is renamed aside with a warning and a fresh cache started; nothing in it is deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TABLES = ("responses", "judgements")
_SIDE_FILES = ("-wal", "-shm", "-journal")     # sqlite's companions of a database file


def content_key(*parts: Any) -> str:
    """A stable sha256 of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_FILE_LOCK = threading.Lock()


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) for the life of the process."""
    path = Path(path)
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _FILE_LOCK:
        if memo_key in _FILE_HASHES:
            return _FILE_HASHES[memo_key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _FILE_LOCK:
        _FILE_HASHES[memo_key] = value
    return value


class Cache:
    """Key -> JSON value store in one sqlite file; `hits`/`misses` count `get` calls of this object.

    `table` separates responses from judgements in the same file. Thread-safe (one connection per
    thread); process-safe through sqlite's locking. `Cache(None)` is an in-memory, per-object cache.
    """

    def __init__(self, path: str | Path | None, table: str = "responses") -> None:
        if table not in _TABLES:
            raise ValueError(f"cache table must be one of {_TABLES}, got {table!r}")
        self.path = Path(path) if path is not None else None
        self.table = table
        self.hits = 0
        self.misses = 0
        self.unreadable = 0              # rows that could not be read (served as misses)
        self.set_aside: Path | None = None
        self._memory: dict[str, Any] = {}
        self._local = threading.local()
        self._count_lock = threading.Lock()
        if self.path is not None:
            if self.path.is_dir():
                raise ValueError(f"{self.path}: the cache file is a folder")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._create()
            except sqlite3.DatabaseError as exc:
                self._set_aside(exc)
                self._create()

    def _create(self) -> None:
        conn = self._conn()
        conn.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.commit()
        conn.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()

    def _set_aside(self, exc: sqlite3.DatabaseError) -> None:
        """Rename a file that is not a usable database (and its sqlite companions) out of the way."""
        self.close()
        aside = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(self.path, aside)
        for suffix in _SIDE_FILES:
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{aside}{suffix}"))
        self.set_aside = aside
        log.warning("%s: not a usable cache database (%s); moved it to %s and started an empty cache",
                    self.path, exc, aside)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=120)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:
                pass  # e.g. a file system without shared memory: the default journal still works
            self._local.conn = conn
        return conn

    def _count(self, hit: bool) -> None:
        with self._count_lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def get(self, key: str, require: tuple[str, ...] = ()) -> Any | None:
        """The stored value, or None (counted as a miss). A row that cannot be read -- not JSON, or
        (with `require`) not an object holding those fields -- is a miss too, counted in `unreadable`."""
        if self.path is None:
            value = self._memory.get(key)
        else:
            try:
                row = self._conn().execute(f"SELECT value FROM {self.table} WHERE key = ?", (key,)).fetchone()
                value = json.loads(row[0]) if row else None
            except (sqlite3.DatabaseError, json.JSONDecodeError, TypeError) as exc:
                self._unreadable(key, exc)
                value = None
            if value is not None and require and not (isinstance(value, dict) and all(k in value for k in require)):
                self._unreadable(key, f"expected an object with {list(require)}")
                value = None
        self._count(value is not None)
        return value

    def _unreadable(self, key: str, why: object) -> None:
        with self._count_lock:
            self.unreadable += 1
        log.warning("%s: cache row %s... cannot be read (%s); treated as a miss", self.path, key[:12], why)

    def put_many(self, items: dict[str, Any]) -> None:
        """Store several values in one transaction (a finished batch)."""
        if self.path is None:
            self._memory.update(items)
            return
        conn = self._conn()
        with conn:
            conn.executemany(f"INSERT OR REPLACE INTO {self.table} (key, value) VALUES (?, ?)",
                             [(k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()])

    def put(self, key: str, value: Any) -> None:
        self.put_many({key: value})

    def __len__(self) -> int:
        if self.path is None:
            return len(self._memory)
        return int(self._conn().execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0])

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "unreadable": self.unreadable, "entries": len(self)}

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
