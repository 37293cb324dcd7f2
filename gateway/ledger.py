"""The usage ledger: every request as one SQLite row, written in batches off the hot path.

`observe` (a recorder sink) only appends to a list; a background task flushes it in a thread
every half second. A failing disk degrades to a log warning — the ledger never slows or fails a
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from .record import Decision

log = logging.getLogger("switchyard")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT, at REAL, team TEXT, role TEXT, client TEXT, session TEXT, model TEXT, backend TEXT,
    outcome TEXT, status INTEGER, error_code TEXT, tokens_in INTEGER, tokens_out INTEGER, cost REAL,
    queue_wait_ms REAL, latency_ms REAL, first_byte_ms REAL, failover TEXT, retries INTEGER, reason TEXT
);
CREATE INDEX IF NOT EXISTS requests_team_at ON requests (team, at);
"""
_COLUMNS = ("id", "at", "team", "role", "client", "session", "model", "backend", "outcome", "status",
            "error_code", "tokens_in", "tokens_out", "cost", "queue_wait_ms", "latency_ms", "first_byte_ms",
            "failover", "retries", "reason")
_INSERT = f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
FLUSH_EVERY = 0.5


def _row(d: Decision) -> tuple[Any, ...]:
    return (d.id, d.at, d.team, d.role, d.client, d.session, d.model, d.backend, d.outcome, d.status,
            d.error_code, d.prompt_tokens or d.tokens_in, d.tokens_out, d.cost, d.queue_wait_ms, d.total_ms,
            d.first_byte_ms, "; ".join(map(str, d.failover)), d.retries, d.reason)


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=5, check_same_thread=False)
    # WAL + NORMAL: one cheap commit per batch instead of a journal rewrite and fsync per write.
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    return db


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: list[tuple[Any, ...]] = []
        self._task: asyncio.Task[None] | None = None
        self._db: sqlite3.Connection | None = None
        self.written = 0

    def observe(self, d: Decision) -> None:
        self._pending.append(_row(d))

    def spent_this_month(self, since: float) -> dict[str, float]:
        try:
            db = self._open()
            rows = db.execute("SELECT team, SUM(cost) FROM requests WHERE at >= ? GROUP BY team", (since,))
            return {team: float(total or 0.0) for team, total in rows}
        except (sqlite3.Error, OSError) as e:
            log.warning("usage ledger %s unreadable: %s", self.path, e)
            return {}

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = connect(self.path)
        return self._db

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        db = self._open()
        with db:
            db.executemany(_INSERT, rows)
        self.written += len(rows)

    async def flush(self) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            await asyncio.to_thread(self._write, rows)
        except (sqlite3.Error, OSError) as e:  # full disk, read-only dir: warn, never fail a request
            log.warning("usage ledger write failed (%d rows dropped): %s", len(rows), e)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="switchyard-ledger")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        if self._db is not None:
            self._db.close()


def ledger_path(data_dir: str, configured: str | None) -> Path:
    return Path(os.path.expanduser(configured or os.path.join(data_dir, "ledger.sqlite")))


def parse_since(text: str) -> float:
    """'7d', '12h', '30m' -> epoch seconds that long ago."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    if not text or text[-1] not in units or not text[:-1].replace(".", "", 1).isdigit():
        raise ValueError(f"--since takes a number and a unit (d, h, m, s), e.g. 7d; got {text!r}")
    return time.time() - float(text[:-1]) * units[text[-1]]


def usage_table(path: Path, since: float, team: str | None = None) -> list[dict[str, Any]]:
    db = connect(path)
    try:
        sql = ("SELECT team, COALESCE(backend, '-') AS backend, COUNT(*), SUM(outcome = 'ok'), SUM(tokens_in), "
               "SUM(tokens_out), SUM(cost), AVG(latency_ms), SUM(failover != '') FROM requests WHERE at >= ?")
        args: list[Any] = [since]
        if team:
            sql += " AND team = ?"
            args.append(team)
        sql += " GROUP BY team, backend ORDER BY team, backend"
        keys = ("team", "backend", "requests", "ok", "tokens_in", "tokens_out", "cost", "avg_latency_ms",
                "failovers")
        return [dict(zip(keys, row, strict=True)) for row in db.execute(sql, args)]
    finally:
        db.close()
