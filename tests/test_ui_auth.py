"""The web UI behind --ui-auth and --api-key, in a real browser: the browser's login for the
page, the page's own API-key dialog for the API."""
from __future__ import annotations

import pytest

from test_auth import KEY, PASSWORD, USER, start
from test_ui import ARTIFACTS, browser  # noqa: F401  (the module's one browser)


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    server = start(tmp_path_factory, "--ui-auth", f"{USER}:{PASSWORD}", "--api-key", KEY)
    yield server
    server.stop()


def test_login_then_api_key_dialog(browser, locked):  # noqa: F811
    denied = browser.new_context()
    assert denied.request.get(locked.url + "/").status == 401
    denied.close()

    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(locked.url + "/")
    # Logged in to the page, but the API wants its key: the page asks for it.
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    page.fill("#key-input", "wrong")
    page.click("#key-save")
    dialog.wait_for(state="visible")  # refused again: asked again
    assert "invalid API key" in page.inner_text("#banner")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_selector("#tab-chat:visible")
    assert page.inner_text("#model-name") == "model"
    page.fill("#max-tokens", "4")
    page.fill("#prompt", "Hello!")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant .stats:has-text('4 tokens')")
    page.click("[data-tab=cluster]")
    page.wait_for_selector(".node .layer-range:has-text('0–1 (2 layers)')")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-auth.png"))
    context.close()
