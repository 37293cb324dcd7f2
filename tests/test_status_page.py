"""Issue 5: the live status page (`GET /`), driven in real headless Chromium over the DevTools protocol.

Chromium is part of the spec and is never skipped: `make test` installs it (scripts/ensure-chromium.sh);
when it is missing the test fails with the reason. With SWITCHYARD_SCREENSHOT=1 the test also sends a
few more requests and saves docs/status-page.png (1280x800) for the README.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.embedded import LlamaServer
from tests.conftest import Gateway, GatewayFactory, chat_body

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "status-page.png"
WIDTH, HEIGHT = 1280, 800
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_binary() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):  # never skip: the browser is part of the spec
        pytest.fail(f"headless Chromium not found at {path}: run `bash scripts/ensure-chromium.sh` "
                    "(installs the Debian packages chromium and chromium-driver)", pytrace=False)
    return path


class Page:
    """One Chromium tab over the DevTools protocol (a websocket), just enough for this test."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = iter(range(1, 1 << 30))
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.errors: list[str] = []  # uncaught exceptions and console errors from the page
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and (fut := self._pending.pop(data["id"], None)) and not fut.done():
                fut.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.errors.append(data["params"]["exceptionDetails"].get("exception", {}).get("description", "?"))
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in data["params"]["args"]))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
                            what=f"{url} to load")

    async def wait_for(self, expression: str, timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while True:
            if await self.eval(f"!!({expression})"):
                return
            if time.monotonic() > deadline:
                body = await self.eval("document.body ? document.body.innerText : ''")
                raise AssertionError(f"page never showed {what or expression} within {timeout}s; page text:\n{body}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def chromium_page(tmp_path: Path) -> AsyncIterator[Page]:
    """Headless Chromium on a free DevTools port (read back from DevToolsActivePort), one blank tab."""
    binary = chromium_binary()
    profile = tmp_path / "chromium-profile"
    log_path = tmp_path / "chromium.log"
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
            f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars", "about:blank",
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"headless Chromium did not start (exit {proc.returncode}):\n"
                            f"{log_path.read_text(errors='replace')[-3000:]}", pytrace=False)
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 10
            while True:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    pages = [t for t in await r.json() if t["type"] == "page"]
                if pages or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert pages, "Chromium opened no tab"
            ws = await http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
            page = Page(ws)
            try:
                await page.send("Page.enable")
                await page.send("Runtime.enable")
                await page.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                                deviceScaleFactor=1, mobile=False)
                yield page
            finally:
                await page.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started: browser, zygote, renderers
                await proc.wait()


def circuit_of(backend: str) -> str:
    return f"document.querySelector('[data-backend=\"{backend}\"] [data-circuit]')?.dataset.circuit"


def text_of(selector: str) -> str:
    return f"document.querySelector('{selector}')?.innerText ?? ''"


async def extra_traffic(gw: Gateway) -> None:
    """A few varied requests so the screenshot shows a realistic page (SWITCHYARD_SCREENSHOT=1 only)."""
    sends = [
        (chat_body("Say hi.", max_tokens=8), {"User-Agent": "opencode/0.15.3", "x-opencode-agent": "build"}),
        (chat_body("Name three rivers.", max_tokens=8), {"X-OpenWebUI-Task": "", "X-OpenWebUI-Chat-Id": "c1"}),
        (chat_body("### Task: Generate a concise title.", max_tokens=8), {"X-OpenWebUI-Task": "title_generation"}),
        (chat_body("hi", model="hosted", max_tokens=8),
         {"User-Agent": "opencode/0.15.3", "x-opencode-agent": "general"}),
        (chat_body("Summarise: " + "the river town " * 40, max_tokens=8),
         {"User-Agent": "opencode/0.15.3", "x-opencode-agent": "compaction"}),
    ]
    for body, headers in sends:
        resp = await gw.chat(body, headers)
        assert resp.status == 200, await resp.text()
        await resp.read()


async def test_status_page_shows_the_circuit_opening_live(own_llama: LlamaServer, make_gateway: GatewayFactory,
                                                          tmp_path: Path) -> None:
    screenshot = os.environ.get("SWITCHYARD_SCREENSHOT") == "1"
    gw = await make_gateway(own_llama.url)
    async with chromium_page(tmp_path) as page:
        await page.goto(str(gw.client.make_url("/")))
        await page.wait_for(f"{circuit_of('local')} === 'closed'", what="local's circuit as closed")
        assert await page.eval(circuit_of("hosted")) == "closed"
        assert await page.eval(text_of("#updated")) not in ("", "never")
        assert "no requests yet" in await page.eval(text_of("#decisions"))
        await page.eval("window.__same_document = true")  # a reload would lose this

        if screenshot:
            await extra_traffic(gw)
        own_llama.kill(signal.SIGSEGV)
        resp = await gw.chat(chat_body("Say hello."))
        assert resp.status == 200
        assert resp.headers["x-switchyard-backend"] == "hosted"
        assert "local crash" in resp.headers["x-switchyard-failover"]
        assert gw.runtime.breakers["local"].state == "open"
        failed_over = gw.last.id

        # no reload: the next poll (every 2 s) redraws the row
        await page.wait_for(f"{circuit_of('local')} === 'open'", timeout=5, what="local's circuit as open")
        detail = await page.eval(text_of('[data-backend="local"] [data-circuit]'))
        assert re.search(r"local circuit open since \d\d:\d\d:\d\d \(.+\)", detail), detail
        badge = "document.querySelector('[data-backend=\"local\"] [data-circuit] .badge')"
        colour = await page.eval(f"getComputedStyle({badge}).backgroundColor")
        assert colour == "rgb(192, 38, 45)"  # open is red
        assert await page.eval(circuit_of("hosted")) == "closed"

        row = f'[data-decision="{failed_over}"]'
        await page.wait_for(f"document.querySelector('{row}')", what="the failed-over decision row")
        cells = await page.eval(f"[...document.querySelectorAll('{row} td')].map(td => td.innerText.trim())")
        assert cells[1] == "default" and cells[2] == "main"  # team, role
        assert cells[5] == "hosted" and cells[6] == "ok" and "local crash" in cells[8]
        assert await page.eval("document.querySelector('#decisions tbody tr')?.dataset.decision") == failed_over

        assert await page.eval("window.__same_document === true"), "the page reloaded instead of updating"
        stamp = await page.eval("document.getElementById('updated').dataset.ts")
        await page.wait_for(f"document.getElementById('updated').dataset.ts !== '{stamp}'", timeout=5,
                            what="#updated move on (polling every 2 s)")
        usage = await page.eval(text_of('#usage [data-team="default"]'))
        assert usage.split()[:2] == ["default", str(len(gw.runtime.recorder.recent))]
        assert await page.eval("document.querySelectorAll('#chart rect[data-series=\"hosted\"]').length") >= 1
        assert not page.errors, page.errors

        if screenshot:
            await asyncio.sleep(2.5)  # one more poll, so the page is settled
            await page.screenshot(SCREENSHOT)
            assert SCREENSHOT.stat().st_size > 10_000

        # the gateway going away is shown, not swallowed
        await gw.client.server.close()
        await page.wait_for(f"{text_of('#error')}.includes('gateway unreachable')", timeout=6,
                            what="'gateway unreachable'")
