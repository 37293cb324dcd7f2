"""Issue 12: with `auth: keys` the status page still works for an admin, in real headless Chromium.

The browser is asked for credentials on `/` (Basic: any user name, the admin key as password), as a
person would type them into its dialog; its polls of `/status.json` then carry them. Without them the
page shows nothing of the gateway.
"""

from __future__ import annotations

from pathlib import Path

from gateway.embedded import LlamaServer
from gateway.teams import hash_key
from tests.conftest import GatewayFactory
from tests.test_status_page import chromium_page, circuit_of, text_of

ADMIN_KEY = "sy-admin-status-page"


async def test_status_page_works_for_an_admin_with_auth_keys(llama: LlamaServer, make_gateway: GatewayFactory,
                                                             tmp_path: Path) -> None:
    gw = await make_gateway(llama.url, auth="keys", admin_keys=[hash_key(ADMIN_KEY)],
                            policy={"keys": [hash_key("sy-team-key")]})
    url = gw.client.make_url("/")
    async with chromium_page(tmp_path) as page:
        for wrong in (url, url.with_user("admin").with_password("sy-team-key")):  # none, or a team key
            await page.send("Page.navigate", url=str(wrong))
            await page.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")
            # headless Chromium cancels the auth dialog: an error page, nothing of the gateway
            assert await page.eval("document.querySelector('#backends')") is None
            assert "Switchyard" not in await page.eval("document.documentElement.outerHTML")

        authed = str(url.with_user("admin").with_password(ADMIN_KEY))
        await page.send("Page.navigate", url=authed)
        await page.wait_for(f"{circuit_of('local')} === 'closed'", timeout=15, what="local's circuit as closed")
        assert await page.eval(text_of("#updated")) not in ("", "never")
        assert not page.errors, page.errors
