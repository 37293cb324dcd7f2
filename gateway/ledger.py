"""The usage ledger: every request as one SQLite row, written in batches by a thread of its own.

`observe` (a recorder sink) only appends the finished decision to a deque and, when the deque was
empty, wakes the writer thread; the writer lets `BATCH_WINDOW` of rows gather, turns them into rows
and commits them in one transaction. Under load a commit carries hundreds of rows instead of a few
(one commit per request had cost 10 % of the local path's CPU), and the writer never waits for the
event loop: a loop that is stalled or busy does not delay a commit. One multi-row INSERT per chunk
keeps the writer's GIL hand-overs few (decision 96: one per row starved it on uvloop). A row is committed within
`DURABILITY_BOUND` (100 ms) of its request being recorded: a SIGKILL loses at most that. Nothing
here can fail or slow a request, and nothing stops the writer: a failing disk is logged once per
kind of failure and retried (rows are kept, up to `MAX_PENDING`); text SQLite cannot encode (a lone
surrogate in a model name or header) is stored with the offending characters replaced; a full
buffer drops new rows and counts them in `dropped`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import sqlite3
import threading
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
_ROW_MARKS = f"({', '.join('?' * len(_COLUMNS))})"
# Rows per INSERT statement. The sqlite3 module releases the GIL around every statement step, and a
# thread that wants it back waits for the event loop's thread to yield it (up to the 5 ms switch
# interval when that thread is busy, as it is under load on uvloop): an `executemany` of one step
# per row fell seconds behind there (decision 56). One multi-row statement is one step per chunk.
_CHUNK = 500 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999 // len(_COLUMNS)  # bound variables cap
DURABILITY_BOUND = 0.1  # seconds: a recorded request is committed within this (stated in README)
BATCH_WINDOW = 0.02  # seconds the writer lets rows gather before a commit (well inside the bound)
MAX_PENDING = 100_000  # rows held in memory while the disk is failing; past it new rows are dropped
RETRY_EVERY = 1.0  # seconds between write attempts while the disk is failing
_INT64 = (-(2**63), 2**63 - 1)


@functools.lru_cache(maxsize=64)
def _insert(n: int) -> str:
    return f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES {', '.join([_ROW_MARKS] * n)}"


def _cell(v: Any) -> Any:
    """A value SQLite will always bind: text that encodes as UTF-8, integers that fit 64 bits."""
    if v is None or isinstance(v, float):
        return v
    if isinstance(v, int):  # bool included
        return int(v) if _INT64[0] <= v <= _INT64[1] else float(v)
    text = v if isinstance(v, str) else str(v)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: store it replaced, never drop the row
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _row(d: Decision) -> tuple[Any, ...]:
    return tuple(_cell(v) for v in (
        d.id, d.at, d.team, d.role, d.client, d.session, d.model, d.backend, d.outcome, d.status,
        d.error_code, d.prompt_tokens or d.tokens_in, d.tokens_out, d.cost, d.queue_wait_ms, d.total_ms,
        d.first_byte_ms, "; ".join(str(f) for f in d.failover), d.retries, d.reason))


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=5, check_same_thread=False)
    # WAL + NORMAL: one cheap commit per batch instead of a journal rewrite and fsync per write. A
    # committed WAL frame survives the process being killed (only a power loss can lose it).
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    return db


def _environmental(e: BaseException) -> bool:
    """A failure of the disk or the database file (full, read-only, locked, corrupt), not of a row."""
    return isinstance(e, OSError) or type(e) in (sqlite3.OperationalError, sqlite3.DatabaseError)


class Ledger:
    def __init__(self, path: Path, max_pending: int = MAX_PENDING) -> None:
        self.path = path
        self.max_pending = max_pending
        self.dropped = 0  # rows lost to a full buffer or rejected by SQLite (for /metrics)
        # Finished decisions not yet committed. deque.append/popleft are atomic, so the loop's thread
        # appends and the writer takes without a lock; a failed batch goes back at the left.
        self._pending: collections.deque[Decision | tuple[Any, ...]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one flush at a time (the writer's, or flush()/stop()'s)
        self._closing = False
        self._reported: set[str] = set()  # failure kinds already logged since the last good write

    def observe(self, d: Decision) -> None:
        pending = self._pending
        if len(pending) >= self.max_pending:
            self._drop(1, "buffer full")
            return
        pending.append(d)  # turned into a row by the writer: the decision is final once recorded
        if len(pending) == 1:
            self._wake.set()

    def spent_this_month(self, since: float) -> dict[str, float]:
        try:
            with self._lock:
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
        try:
            db = self._open()
            with db:
                for at in range(0, len(rows), _CHUNK):
                    chunk = rows[at:at + _CHUNK]
                    db.execute(_insert(len(chunk)), [v for row in chunk for v in row])
        except BaseException as e:
            if _environmental(e) and self._db is not None:  # reconnect next time (the dir may come back)
                self._db.close()
                self._db = None
            raise

    def _write_each(self, rows: list[tuple[Any, ...]]) -> list[Exception]:
        """Fallback after a batch failed on a row: keep every row SQLite takes; return the rejections."""
        rejected: list[Exception] = []
        for row in rows:
            try:
                self._write([row])
            except Exception as e:
                if _environmental(e):
                    raise
                rejected.append(e)
        return rejected

    def _report(self, kind: str, message: str, *args: Any) -> None:
        """Log a failure once per kind until writes succeed again (a broken disk must not log per flush)."""
        if kind not in self._reported:
            self._reported.add(kind)
            log.error(message, *args)

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        self._report(f"drop:{why}", "usage ledger dropping rows (%s): %d dropped so far; see ledger.dropped",
                     why, self.dropped)

    def _flush(self) -> bool:
        """Write what is pending (in the calling thread); False when the disk failed (rows kept)."""
        with self._lock:
            pending = self._pending
            taken = [pending.popleft() for _ in range(len(pending))]
            if not taken:
                return True
            rows: list[tuple[Any, ...]] = []
            for r in taken:
                try:
                    rows.append(r if isinstance(r, tuple) else _row(r))
                except Exception as e:  # a value even _cell cannot render: count it, keep the rest
                    self._report(f"row:{type(e).__name__}", "usage ledger could not render a row: %s: %s",
                                 type(e).__name__, e)
                    self._drop(1, "unrenderable")
            try:
                try:
                    self._write(rows)
                except Exception as e:
                    if _environmental(e):
                        raise
                    for err in self._write_each(rows):
                        self._report(f"row:{type(err).__name__}", "usage ledger rejected a row: %s: %s",
                                     type(err).__name__, err)
                        self._drop(1, "rejected by SQLite")
            except Exception as e:  # full disk, read-only dir, locked or corrupt file: keep the rows, retry
                pending.extendleft(reversed(rows))
                excess = len(pending) - self.max_pending
                for _ in range(max(0, excess)):  # the newest go: the oldest rows are kept
                    pending.pop()
                if excess > 0:
                    self._drop(excess, "buffer full")
                self._report(f"write:{type(e).__name__}:{e}",
                             "usage ledger write failed (%d rows kept, retrying every %gs): %s: %s",
                             len(rows), RETRY_EVERY, type(e).__name__, e)
                return False
            if self._reported:
                log.warning("usage ledger writes to %s work again", self.path)
                self._reported.clear()
            return True

    async def flush(self) -> bool:
        """Write what is pending now; False when the disk failed (the rows are kept for the next try)."""
        return await asyncio.to_thread(self._flush)

    def _run(self) -> None:
        while not self._closing:
            try:
                self._wake.wait()
                if self._closing:
                    return  # stop() writes what is left
                time.sleep(BATCH_WINDOW)  # let a batch gather: one commit for many requests
                self._wake.clear()
                if not self._flush():
                    time.sleep(RETRY_EVERY)  # a failing disk: don't spin on it
                    if self._pending:
                        self._wake.set()
            except Exception:  # never let the writer die: a dead writer is a silent, unbounded ledger
                log.exception("usage ledger writer error (continuing)")
                time.sleep(RETRY_EVERY)
                self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="switchyard-ledger", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def stop(self) -> None:
        """Flush what is pending and close; never raises (shutdown must go on)."""
        self._closing = True
        self._wake.set()
        try:
            thread = self._thread
            if thread is not None:  # let a write in progress finish (its batch is not cut short)
                await asyncio.to_thread(thread.join, 5 + RETRY_EVERY)
            if not await self.flush():
                log.error("usage ledger: %d rows could not be written at shutdown", len(self._pending))
        except Exception:
            log.exception("usage ledger: error while stopping")
        finally:
            with self._lock:
                if self._db is not None:
                    try:
                        self._db.close()
                    except Exception:
                        pass
                    self._db = None


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
