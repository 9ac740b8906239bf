"""`cake serve --model-type image-model` with tiny random SD, SDXL Turbo, FLUX.1 and
FLUX.2-klein pipelines (built offline): both image endpoints through real HTTP and the openai
client, PNGs decoded with Pillow, seeds, every 400, queueing, cancellation on disconnect."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from conftest import hf_cache_with

tiny = pytest.importorskip("cake.testing.tiny_images", reason="image models are not installed")

# family -> (how the server is started, its default (width, height), its default steps)
SERVERS = {
    "sd": (["--n-steps", "4", "--sd-width", "64", "--sd-height", "32"], (64, 32), 4),
    # served by repo id from an offline HF cache; "turbo" in the id picks SDXL Turbo's
    # defaults: one step, no guidance, at the model's natural size
    "sdxl-turbo": ([], (64, 64), 1),
    "flux1": (["--n-steps", "3", "--flux-width", "32", "--flux-height", "48"], (32, 48), 3),
    "flux2": (["--image-model-arch", "flux2", "--flux-width", "48", "--flux-height", "32"],
              (48, 32), 4),  # FLUX.2-klein is step-distilled: 4 steps by default
}
TURBO_REPO = "tiny-org/tiny-sdxl-turbo"
# Tiny models gain nothing from a second thread, and on a busy machine lose a lot to it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def tiny_pipeline(tmp_path_factory, arch: str) -> Path:
    """One tiny pipeline folder per architecture for the whole session."""
    folder = tmp_path_factory.getbasetemp() / "tiny-image-pipelines" / arch
    if not (folder / "model_index.json").exists():
        tiny.write_tiny_pipeline(folder, arch)
    return folder


@pytest.fixture(scope="module")
def image_server(start_server, tmp_path_factory):
    """family -> its server, started on first use and shared by the module's tests."""
    servers = {}

    def get(family: str):
        if family not in servers:
            args = SERVERS[family][0]
            if family == "sdxl-turbo":
                cache = tmp_path_factory.mktemp("hf-cache")
                hf_cache_with(cache, TURBO_REPO, tiny_pipeline(tmp_path_factory, "sdxl"))
                servers[family] = start_server(
                    TURBO_REPO, "--model-type", "image-model", *args,
                    env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **ONE_THREAD})
            else:
                servers[family] = start_server(str(tiny_pipeline(tmp_path_factory, family)),
                                               "--model-type", "image-model", *args,
                                               env=ONE_THREAD)
        return servers[family]

    return get


@pytest.fixture(scope="module", params=list(SERVERS))
def family(request):
    return request.param


@pytest.fixture
def server(image_server, family):
    return image_server(family)


@pytest.fixture
def flux_server(image_server):
    return image_server("flux1")


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server, path: str, body, timeout: float = 120) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, timeout=timeout)
    return httpx.post(server.url + path, content=body, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def png_image(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def image_stats(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()["images"]


def steps_taken(server, request) -> int:
    """Denoising steps the server ran for one request (from its /health counters)."""
    before = image_stats(server)["steps"]
    request()
    return image_stats(server)["steps"] - before


def test_openai_client_b64_json(server, family):
    c = client(server)
    model_id = TURBO_REPO if family == "sdxl-turbo" else family
    assert [m.id for m in c.models.list().data] == [model_id]
    r = c.images.generate(prompt="a rusty robot on a beach", n=2, size="32x16",
                          response_format="b64_json", extra_body={"seed": 7})
    assert r.created > 0 and len(r.data) == 2
    images = [png_image(base64.b64decode(d.b64_json)) for d in r.data]
    assert [im.size for im in images] == [(32, 16), (32, 16)]
    assert images[0].mode == "RGB"
    assert images[0].tobytes() != images[1].tobytes()  # image i has seed 7 + i


def test_png_by_default_at_the_server_size(server, family):
    r = post(server, "/v1/images/generations", {"prompt": "a cat"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert png_image(r.content).size == SERVERS[family][1]


def test_same_seed_same_png_bytes(server):
    body = {"prompt": "a lighthouse in a storm", "seed": 42}
    first = post(server, "/v1/images/generations", body).content
    assert post(server, "/v1/images/generations", body).content == first
    assert post(server, "/v1/images/generations", {**body, "seed": 43}).content != first
    assert post(server, "/v1/images/generations", {**body, "prompt": "a meadow"}).content != first
    # the legacy endpoint renders the same image for the same seed and settings
    legacy = post(server, "/api/v1/image", {"image_args": {"prompt": body["prompt"],
                                                           "image-seed": 42},
                                            "response_format": "png"})
    assert legacy.content == first


def test_default_and_requested_steps(server, family):
    assert steps_taken(server, lambda: post(server, "/v1/images/generations",
                                            {"prompt": "x"})) == SERVERS[family][2]
    body = {"image_args": {"prompt": "x", "n-steps": 2, "sd-num-samples": 2, "sd-bsize": 1}}
    assert steps_taken(server, lambda: post(server, "/api/v1/image", body)) == 4
    body["image_args"].update({"sd-num-samples": 1, "sd-bsize": 2})  # one batch of two
    assert steps_taken(server, lambda: post(server, "/api/v1/image", body)) == 2


def test_legacy_endpoint(server, family):
    body = {"image_args": {"prompt": "An old man sitting on a chair at the seaside",
                           "sd-num-samples": 2, "sd-bsize": 2, "image-seed": 2439383,
                           "guidance-scale": 2.5, "n-steps": 2}}
    r = post(server, "/api/v1/image", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    images = [png_image(base64.b64decode(b)) for b in r.json()["images"]]
    assert len(images) == 4
    assert {im.size for im in images} == {SERVERS[family][1]}
    assert len({im.tobytes() for im in images}) == 4
    one = post(server, "/api/v1/image", {"image_args": {"prompt": "x"}, "response_format": "png"})
    assert one.headers["content-type"] == "image/png"
    assert png_image(one.content).size == SERVERS[family][1]


def noise_png(width: int, height: int) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_img2img(server, family):
    init = base64.b64encode(noise_png(80, 64)).decode()
    args = {"prompt": "a watercolor", "image-seed": 1, "n-steps": 4}
    plain = post(server, "/api/v1/image", {"image_args": args, "response_format": "png"})
    body = {"image_args": {**args, "sd-img2img": init, "sd-img2img-strength": 0.5},
            "response_format": "png"}
    holder = {}
    steps = steps_taken(server, lambda: holder.update(r=post(server, "/api/v1/image", body)))
    r = holder["r"]
    assert r.status_code == 200, r.text[:200]
    assert png_image(r.content).size == SERVERS[family][1]  # the input is resized to it
    assert r.content != plain.content
    # strength 0.5 of 4 steps denoises from halfway; FLUX.2 takes the image as a reference
    assert steps == (4 if family == "flux2" else 2)
    # a data: URL works too, and gives the same image
    body["image_args"]["sd-img2img"] = "data:image/png;base64," + init
    assert post(server, "/api/v1/image", body).content == r.content
    if family == "flux2":  # a reference image must be at least 64 pixels a side
        body["image_args"]["sd-img2img"] = base64.b64encode(noise_png(40, 24)).decode()
        r = post(server, "/api/v1/image", body)
        assert r.status_code == 400 and "too small" in r.json()["error"]


@pytest.mark.parametrize("sd_family", ["sd", "sdxl-turbo"])
def test_negative_prompt_steers_stable_diffusion(image_server, sd_family):
    server = image_server(sd_family)  # FLUX takes none: a 400, among the bad requests below
    args = {"prompt": "a cat", "image-seed": 3, "guidance-scale": 7.5}
    plain = post(server, "/api/v1/image", {"image_args": args, "response_format": "png"})
    steered = post(server, "/api/v1/image", {
        "image_args": {**args, "sd-uncond-prompt": "blurry, dark"}, "response_format": "png"})
    assert steered.status_code == 200 and steered.content != plain.content


GOOD = {"prompt": "a cat"}
BAD_REQUESTS = [
    ("/v1/images/generations", {}, "prompt"),
    ("/v1/images/generations", {"prompt": ""}, "prompt must not be empty"),
    ("/v1/images/generations", {"prompt": "   "}, "prompt must not be empty"),
    ("/v1/images/generations", {"prompt": 5}, "prompt"),
    ("/v1/images/generations", {**GOOD, "n": 0}, "from 1 to 10"),
    ("/v1/images/generations", {**GOOD, "n": 11, "response_format": "b64_json"}, "from 1 to 10"),
    ("/v1/images/generations", {**GOOD, "n": "2"}, "n"),
    ("/v1/images/generations", {**GOOD, "n": 2}, "b64_json"),
    ("/v1/images/generations", {**GOOD, "size": "big"}, "WIDTHxHEIGHT"),
    ("/v1/images/generations", {**GOOD, "size": "33x48"}, "multiples of 2"),
    ("/v1/images/generations", {**GOOD, "size": "0x48"}, "width 0"),
    ("/v1/images/generations", {**GOOD, "size": "32x4096"}, "height 4096"),
    ("/v1/images/generations", {**GOOD, "response_format": "url"}, "response_format"),
    ("/v1/images/generations", {**GOOD, "seed": -1}, "seed"),
    ("/v1/images/generations", b'{"prompt": "a cat"', "malformed JSON"),
    ("/v1/images/generations", [1, 2], "invalid request"),
    ("/api/v1/image", {}, "image_args"),
    ("/api/v1/image", {"image_args": {}}, "prompt"),
    ("/api/v1/image", {"image_args": {"prompt": ""}}, "prompt must not be empty"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-num-samples": 0}}, "at least 1"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-bsize": 0}}, "at least 1"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-num-samples": 6, "sd-bsize": 2}},
     "from 1 to 10"),
    ("/api/v1/image", {"image_args": {**GOOD, "n-steps": 0}}, "steps"),
    ("/api/v1/image", {"image_args": {**GOOD, "n-steps": 1001}}, "steps"),
    ("/api/v1/image", {"image_args": {**GOOD, "guidance-scale": -1}}, "guidance"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-uncond-prompt": "ugly"}}, "negative prompt"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-img2img": "not base64!"}}, "base64"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-img2img": "/etc/hostname"}}, "base64"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-img2img": base64.b64encode(b"hello").decode()}},
     "not an image"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-img2img": base64.b64encode(
        noise_png(8, 8)).decode(), "sd-img2img-strength": 0}}, "strength"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-img2img": base64.b64encode(
        noise_png(8, 8)).decode(), "sd-img2img-strength": 1.5}}, "strength"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-img2img": base64.b64encode(
        noise_png(8, 8)).decode(), "sd-img2img-strength": 0.1}}, "at least one"),
    ("/api/v1/image", {"image_args": {**GOOD, "sd-num-samples": 2}, "response_format": "png"},
     "b64_json"),
    ("/api/v1/image", {"image_args": GOOD, "response_format": "jpeg"}, "response_format"),
]


@pytest.mark.parametrize("path,body,fragment", BAD_REQUESTS)
def test_bad_requests_are_400_json(flux_server, path, body, fragment):
    r = post(flux_server, path, body)
    assert r.status_code == 400, r.text[:200]
    assert fragment in r.json()["error"]


def test_serves_on_after_errors(flux_server):
    for path, body, _ in BAD_REQUESTS[:5]:
        post(flux_server, path, body)
    assert post(flux_server, "/v1/images/generations", GOOD).status_code == 200


def test_chat_and_speech_are_404_while_an_image_model_is_loaded(flux_server):
    with pytest.raises(openai.NotFoundError) as e:
        client(flux_server).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Hello!"}])
    assert e.value.status_code == 404
    assert e.value.response.json() == {"error": "No text model loaded"}
    r = post(flux_server, "/v1/audio/speech", {"input": "Hello world"})
    assert r.status_code == 404 and r.json() == {"error": "No audio model loaded"}


def test_topology_lists_the_pipeline_components(flux_server):
    topo = httpx.get(flux_server.url + "/api/v1/topology", timeout=10).json()
    assert set(topo["layer_details"]) == {"text_encoder", "text_encoder_2", "transformer", "vae"}
    assert topo["master"]["layers"] == list(topo["layer_details"])
    assert topo["memory_bytes"] == sum(d["total_bytes"] for d in topo["layer_details"].values())


def test_concurrent_requests_queue(flux_server):
    seeds = [11, 12, 13, 14]
    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(lambda s: post(flux_server, "/v1/images/generations",
                                                {**GOOD, "seed": s}), seeds))
    assert [r.status_code for r in together] == [200] * len(seeds)
    alone = [post(flux_server, "/v1/images/generations", {**GOOD, "seed": s}) for s in seeds]
    assert [r.content for r in together] == [r.content for r in alone]


LONG = {"image_args": {**GOOD, "n-steps": 1000, "sd-num-samples": 10}}  # minutes of work


def send_raw(server, path: str, body: dict) -> socket.socket:
    """An HTTP request on a socket we can drop mid-render, the way a client goes away."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_stats(server, ok, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = image_stats(server)
        if ok(stats):
            return stats
        time.sleep(0.05)
    raise AssertionError(f"image stats never matched: {image_stats(server)}")


def test_disconnect_cancels_between_steps_and_the_server_stays_responsive(flux_server):
    before = image_stats(flux_server)
    running = send_raw(flux_server, "/api/v1/image", LONG)
    wait_stats(flux_server, lambda s: s["running"] == 1 and s["steps"] > before["steps"])
    queued = send_raw(flux_server, "/api/v1/image", LONG)
    wait_stats(flux_server, lambda s: s["queued"] == 1)
    # the event loop answers while an image renders
    models = httpx.get(flux_server.url + "/v1/models", timeout=10)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "flux1"
    assert image_stats(flux_server)["running"] == 1
    queued.close()  # leaves while waiting: its job is dropped when its turn comes
    running.close()  # leaves mid-render: its job stops at the next step
    after = wait_stats(flux_server, lambda s: s["cancelled"] == before["cancelled"] + 2)
    assert after["running"] == 0 and after["queued"] == 0
    assert after["completed"] == before["completed"]
    assert after["steps"] - before["steps"] < 10 * 1000
    assert post(flux_server, "/v1/images/generations", GOOD).status_code == 200


def test_cake_run_writes_the_same_png_as_the_server(image_server, tmp_path_factory, tmp_path):
    import subprocess
    import sys

    server = image_server("flux2")
    out = tmp_path / "out.png"
    run = subprocess.run(
        [sys.executable, "-m", "cake", "run", str(tiny_pipeline(tmp_path_factory, "flux2")),
         "--model-type", "image-model", "a red bicycle", "--image-output", str(out),
         "--flux-width", "32", "--flux-height", "48", "--image-seed", "9"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"wrote {out}" in run.stderr
    assert png_image(out.read_bytes()).size == (32, 48)
    served = post(server, "/v1/images/generations",
                  {"prompt": "a red bicycle", "size": "32x48", "seed": 9})
    assert served.content == out.read_bytes()  # same seed, same machine: the same bytes
