"""The web UI's Image tab in a real browser against `cake serve --model-type image-model`
with a tiny random Stable Diffusion pipeline: prompt in, picture out, downloadable."""
from __future__ import annotations

import pytest

from test_ui import browser, ui_page  # noqa: F401  (the module's one browser)

tiny = pytest.importorskip("cake.testing.tiny_images", reason="image models are not installed")


@pytest.fixture(scope="module")
def image_server(start_server, tmp_path_factory):
    folder = tiny.write_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd", "sd")
    return start_server(str(folder), "--model-type", "image-model")


@pytest.fixture
def page(browser, image_server, request):  # noqa: F811
    with ui_page(browser, image_server, f"ui-image-{request.node.name}", 1000, 700,
                 timeout_ms=120_000) as p:
        yield p


def test_image_tab_draws_and_offers_download(page):
    page.wait_for_selector("#tab-image:visible")  # chosen by default for an image model
    assert page.locator("#tabs [data-tab]:visible").all_inner_texts() == ["Image", "Cluster"]
    page.fill("#image-prompt", "a rusty robot on a beach")
    page.click("#image-generate")
    page.wait_for_selector("#image-result:visible")
    size = page.evaluate("(() => { const i = document.querySelector('#image-output');"
                         " return [i.complete, i.naturalWidth, i.naturalHeight]; })()")
    assert size[0] and size[1] > 0 and size[2] > 0  # the browser decoded a real picture
    src = page.get_attribute("#image-output", "src")
    assert src.startswith("data:image/png;base64,iVBORw0KGgo")  # PNG signature
    assert page.get_attribute("#image-download", "href") == src
    assert page.locator("#image-error").is_hidden()

