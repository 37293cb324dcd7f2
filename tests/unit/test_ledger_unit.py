"""The usage ledger never silently stops and never grows without bound (issue 12, finding 2).

Fast tests against a real SQLite file in tmp_path; the SIGKILL durability test against a real
`switchyard serve` process is tests/test_ledger_durability.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from gateway import ledger as ledger_mod
from gateway.ledger import Ledger
from gateway.record import Decision


def decision(n: int, **over: object) -> Decision:
    d = Decision(id=f"r{n}", team="t", role="main", model="auto", backend="local", outcome="ok", status=200)
    for k, v in over.items():
        setattr(d, k, v)
    return d


def rows(path: Path) -> list[tuple[str, str, str | None]]:
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT id, model, session FROM requests ORDER BY rowid").fetchall()
    except sqlite3.OperationalError:  # the writer has not created the table yet
        return []
    finally:
        db.close()


async def wait_for(pred: object, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_rows_sqlite_cannot_encode_are_stored_sanitised_and_the_writer_keeps_going(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.sqlite")
    led.start()
    led.observe(decision(1))
    led.observe(decision(2, model="\ud800"))  # "model": "\ud800" in the request body
    led.observe(decision(3, session="\udcff"))  # `x-session-id: \xff` as aiohttp decodes it
    await wait_for(lambda: len(rows(led.path)) == 3)
    led.observe(decision(4))  # the writer is still alive
    await wait_for(lambda: len(rows(led.path)) == 4)
    assert rows(led.path)[1:3] == [("r2", "?", None), ("r3", "auto", "?")]
    assert led.alive()
    await led.stop()


async def test_values_sqlite_would_not_bind_are_stored(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.sqlite")
    led.observe(decision(1, tokens_out=2**70, model=["a", "list"]))  # type: ignore[arg-type]
    assert await led.flush()
    db = sqlite3.connect(led.path)
    assert db.execute("SELECT model, tokens_out FROM requests").fetchone() == ("['a', 'list']", float(2**70))
    db.close()


async def test_a_failing_disk_is_logged_once_rows_are_kept_and_written_when_it_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_mod, "RETRY_EVERY", 0.01)
    blocker = tmp_path / "data"
    blocker.write_text("a file where the ledger's directory should be")
    led = Ledger(blocker / "ledger.sqlite")
    led.start()
    for n in range(20):
        led.observe(decision(n))
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    failures = [r for r in caplog.records if "usage ledger write failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]  # once per kind, not once per flush
    assert failures[0].levelno == logging.ERROR
    assert len(led._pending) == 20 and led.dropped == 0  # kept for the next try
    blocker.unlink()  # the operator fixes the disk
    led.observe(decision(20))
    await wait_for(lambda: len(rows(led.path)) == 21)
    await led.stop()
    assert "work again" in caplog.text


async def test_the_buffer_is_bounded_and_overflow_is_counted_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")
    led = Ledger(blocker / "ledger.sqlite", max_pending=5)
    for n in range(8):
        led.observe(decision(n))
    assert len(led._pending) == 5 and led.dropped == 3
    assert not await led.flush()  # the disk fails: rows go back, still bounded
    led.observe(decision(9))
    assert len(led._pending) == 5 and led.dropped == 4
    assert len([r for r in caplog.records if "dropping rows" in r.getMessage()]) == 1


async def test_stop_never_raises_and_flushes_what_it_has(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    led = Ledger(tmp_path / "ledger.sqlite")
    led.start()
    for n in range(3):
        led.observe(decision(n, model="\ud800" if n == 1 else "auto"))
    await led.stop()
    assert [r[0] for r in rows(led.path)] == ["r0", "r1", "r2"]

    blocker = tmp_path / "f"
    blocker.write_text("x")
    broken = Ledger(blocker / "ledger.sqlite")
    broken.start()
    broken.observe(decision(1))
    await broken.stop()  # must not raise: shutdown goes on
    assert "could not be written at shutdown" in caplog.text


async def test_stop_without_start_flushes(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.sqlite")
    led.observe(decision(1))
    await led.stop()
    assert len(rows(led.path)) == 1


async def test_a_recorded_request_is_committed_within_the_durability_bound(tmp_path: Path) -> None:
    """Committed (visible to another connection) within DURABILITY_BOUND, not at the next half-second tick."""
    led = Ledger(tmp_path / "ledger.sqlite")
    led.start()
    led.observe(decision(0))
    await wait_for(lambda: len(rows(led.path)) == 1)
    for n in range(1, 6):
        led.observe(decision(n))
        await asyncio.sleep(ledger_mod.DURABILITY_BOUND)
        assert len(rows(led.path)) == n + 1
    await led.stop()


async def test_a_stalled_event_loop_does_not_delay_a_commit(tmp_path: Path) -> None:
    """The writer is a thread of its own: a loop blocked in a handler (or slow to wake a helper
    thread, as uvloop was under load, decision 56) still gets its rows committed within the bound."""
    led = Ledger(tmp_path / "ledger.sqlite")
    led.start()
    led.observe(decision(1))
    time.sleep(ledger_mod.DURABILITY_BOUND * 2)  # the loop is blocked: nothing async can run
    assert len(rows(led.path)) == 1
    await led.stop()


async def test_requests_finishing_within_the_batch_window_share_a_commit(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One commit per request had cost 10 % of the local path's CPU: rows arriving within the batch
    window go in one transaction."""
    led = Ledger(tmp_path / "ledger.sqlite")
    batches: list[int] = []
    write = led._write
    monkeypatch.setattr(led, "_write", lambda rows: (batches.append(len(rows)), write(rows))[1])
    led.start()
    for n in range(100):  # a request finishing every 2 ms for 0.2 s
        led.observe(decision(n))
        await asyncio.sleep(0.002)
    await wait_for(lambda: len(rows(led.path)) == 100)
    assert len(batches) <= 0.2 / ledger_mod.BATCH_WINDOW + 2, batches
    await led.stop()
