"""The web UI's Audio tab in a real browser against `cake serve --model-type audio-model`
(the bundled Piper voice): text in, playable WAV out, errors shown."""
from __future__ import annotations

import io
import math
import struct
import wave

import pytest

from test_ui import browser, ui_page  # noqa: F401  (the module's one browser)


@pytest.fixture(scope="module")
def audio_server(start_server):
    return start_server("--model-type", "audio-model")


@pytest.fixture
def page(browser, audio_server, request):  # noqa: F811
    with ui_page(browser, audio_server, f"ui-audio-{request.node.name}", 1000, 700) as p:
        yield p


def test_speech_tab_plays_what_the_server_says(page):
    page.wait_for_selector("#tab-audio:visible")  # chosen by default for a speech model
    assert page.locator("#tabs [data-tab]:visible").all_inner_texts() == ["Audio", "Cluster"]
    page.fill("#audio-text", "Hello from the cake web page.")
    page.click("#audio-generate")
    page.wait_for_selector("#audio-result:visible")
    # The player holds a real WAV the browser can decode, and the download link is the same.
    page.wait_for_function("document.querySelector('#audio-output').duration > 0.5")
    header = page.evaluate("""async () => {
        const bytes = new Uint8Array(await (await fetch(
            document.querySelector('#audio-output').src)).arrayBuffer());
        return String.fromCharCode(...bytes.slice(0, 4)) + String.fromCharCode(...bytes.slice(8, 12));
    }""")
    assert header == "RIFFWAVE"
    assert page.get_attribute("#audio-download", "href") == page.get_attribute("#audio-output", "src")
    assert page.locator("#audio-error").is_hidden()


def test_voice_upload_error_is_shown(page, tmp_path):
    """Piper cannot clone a voice: the server says so and the page shows it."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(i / 8)))
                               for i in range(16000)))
    voice = tmp_path / "voice.wav"
    voice.write_bytes(buffer.getvalue())
    page.fill("#audio-text", "Clone me.")
    page.set_input_files("#audio-voice", str(voice))
    page.click("#audio-generate")
    error = page.locator("#audio-error")
    error.wait_for(state="visible")
    assert error.inner_text().startswith("Error 400:") and "clone" in error.inner_text()
    assert page.locator("#audio-generate").is_enabled()


def test_cluster_tab_of_a_whole_model(page, audio_server):
    page.click("[data-tab=cluster]")
    summary = page.locator("#cluster-summary")
    summary.wait_for()
    page.wait_for_selector("#cluster-summary:has-text('no layers to place')")
    assert "en_US-joe-medium" in summary.inner_text()
    assert page.locator(".node").count() == 0
