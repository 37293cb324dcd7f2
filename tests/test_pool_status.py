"""Issue 13: the status page shows a tier's members one per row, each with its own circuit
(real llama-servers, real headless Chromium)."""

from __future__ import annotations

import signal
from pathlib import Path

from gateway.embedded import LlamaServer
from tests.conftest import GatewayFactory, chat_body
from tests.fake_hosted import FakeHosted
from tests.test_pool import tier_backends, two_llamas  # noqa: F401 - the fixture
from tests.test_status_page import chromium_page, circuit_of, text_of


async def test_status_page_shows_one_row_per_member_and_only_the_dead_one_opens(
        two_llamas: tuple[LlamaServer, LlamaServer], make_gateway: GatewayFactory, fake: FakeHosted,  # noqa: F811
        tmp_path: Path) -> None:
    a, b = two_llamas
    gw = await make_gateway(a.url, backends=tier_backends(a, b, fake))
    async with chromium_page(tmp_path) as page:
        await page.goto(str(gw.client.make_url("/")))
        for member in ("local@gpu0", "local@gpu1"):
            await page.wait_for(f"{circuit_of(member)} === 'closed'", what=f"{member}'s row")
            assert "member of local" in await page.eval(text_of(f'[data-backend="{member}"] td.name'))
        assert await page.eval("document.querySelector('[data-backend=\"local\"]')") is None  # the tier is no row

        a.kill(signal.SIGKILL)
        resp = await gw.chat(chat_body("hi", max_tokens=4))
        assert resp.headers["x-switchyard-backend"] == "local@gpu1"
        await page.wait_for(f"{circuit_of('local@gpu0')} === 'open'", timeout=5, what="gpu0's circuit as open")
        assert await page.eval(circuit_of("local@gpu1")) == "closed"
        assert not page.errors, page.errors
