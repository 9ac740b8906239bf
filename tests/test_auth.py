"""--ui-auth (HTTP Basic on the UI and the topology) and --api-key / CAKE_API_KEY (Bearer on
the API), against real `cake serve` processes; /health stays open."""
from __future__ import annotations

import base64
import subprocess
import sys

import httpx
import openai
import pytest

from conftest import ROOT, Server, write_tiny_model

KEY = "sk-test-0123456789"
USER, PASSWORD = "alice", "s3cret:with:colons"


def basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


BEARER = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello!"}]


def start(tmp_path_factory, *args: str, env: dict | None = None) -> Server:
    """A server whose API is locked: readiness is read from the always-open /health."""
    tmp = tmp_path_factory.mktemp("auth")
    model = write_tiny_model(tmp / "model", "llama")
    return Server([str(model), "--temperature", "0", *args], tmp / "server.log",
                  env).wait_ready(path="/health")


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """UI password on the command line, API key from the environment."""
    server = start(tmp_path_factory, "--ui-auth", f"{USER}:{PASSWORD}",
                   env={"CAKE_API_KEY": KEY})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key_only(tmp_path_factory):
    server = start(tmp_path_factory, "--api-key", KEY)
    yield server
    server.stop()


def get(server, path, headers=None):
    return httpx.get(server.url + path, headers=headers or {}, timeout=30)


def test_health_always_open(locked, key_only):
    for server in (locked, key_only):
        r = get(server, "/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        # So are the metrics (Prometheus scrapers carry no credentials) and the API document.
        r = get(server, "/metrics")
        assert r.status_code == 200 and "vllm:num_requests_running" in r.text
        assert get(server, "/openapi.json").status_code == 200


def test_tokenize_needs_the_key(locked):
    for path in ("/tokenize", "/detokenize"):
        body = {"content": "hi"} if path == "/tokenize" else {"tokens": [1]}
        assert httpx.post(locked.url + path, json=body).status_code == 401
        assert httpx.post(locked.url + path, json=body, headers=BEARER).status_code == 200


def test_ui_needs_basic_auth(locked):
    for path in ("/", "/static/app.js"):
        r = get(locked, path)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith('Basic realm="cake"')
        assert get(locked, path, basic(USER, "wrong")).status_code == 401
        assert get(locked, path, basic("bob", PASSWORD)).status_code == 401
        assert get(locked, path, BEARER).status_code == 401  # the API key is not a UI login
    r = get(locked, "/", basic(USER, PASSWORD))
    assert r.status_code == 200 and "<title>cake</title>" in r.text


def test_topology_takes_the_ui_login_or_the_api_key(locked):
    r = get(locked, "/api/v1/topology")
    assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"]
    assert "error" in r.json()
    r = get(locked, "/api/v1/topology", basic(USER, "nope"))
    assert r.status_code == 401 and r.json() == {"error": "invalid user name or password"}
    # A wrong key gets no Basic challenge: a browser page's fetch must not pop a login box.
    r = get(locked, "/api/v1/topology", {"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json() == {"error": "invalid API key"}
    assert r.headers["www-authenticate"] == 'Bearer realm="cake"'
    for headers in (basic(USER, PASSWORD), BEARER):
        r = get(locked, "/api/v1/topology", headers)
        assert r.status_code == 200 and r.json()["num_layers"] == 2


def test_api_needs_the_key(locked):
    for path in ("/v1/models", "/api/v1/models"):
        r = get(locked, path)
        assert r.status_code == 401 and r.json()["error"].startswith("missing API key")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert get(locked, path, {"Authorization": "Bearer wrong"}).json() == {
            "error": "invalid API key"}
        assert get(locked, path, basic(USER, PASSWORD)).status_code == 401
        assert get(locked, path, BEARER).status_code == 200
    r = httpx.post(locked.url + "/api/v1/chat/completions", json={"messages": HELLO})
    assert r.status_code == 401
    r = httpx.post(locked.url + "/api/v1/chat/completions", json={"messages": HELLO,
                   "max_tokens": 3}, headers=BEARER, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_openai_client_api_key_just_works(locked):
    good = openai.OpenAI(base_url=locked.url + "/v1", api_key=KEY, max_retries=0)
    r = good.chat.completions.create(model="x", messages=HELLO, max_tokens=4)
    assert r.usage.completion_tokens == 4
    streamed = "".join(c.choices[0].delta.content or "" for c in good.chat.completions.create(
        model="x", messages=HELLO, max_tokens=4, stream=True))
    assert streamed == r.choices[0].message.content
    bad = openai.OpenAI(base_url=locked.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="x", messages=HELLO, max_tokens=4)
    assert e.value.status_code == 401 and "invalid API key" in str(e.value.body)


def test_key_only_leaves_the_page_open(key_only):
    r = get(key_only, "/")
    assert r.status_code == 200 and "<title>cake</title>" in r.text
    assert get(key_only, "/static/app.js").status_code == 200
    # The page then asks for the key: what it reads is behind it.
    for path in ("/api/v1/info", "/api/v1/topology", "/v1/models"):
        assert get(key_only, path).status_code == 401
        assert get(key_only, path, basic(USER, PASSWORD)).status_code == 401
        assert get(key_only, path, BEARER).status_code == 200
    assert get(key_only, "/api/v1/info", BEARER).json()["model_type"] == "text"


def test_bad_ui_auth_flag_fails_clearly():
    out = subprocess.run([sys.executable, "-m", "cake", "serve", "--ui-auth", "nocolon"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "USER:PASSWORD" in out.stderr


def test_health_is_503_while_loading():
    """The app before a model is in place (the server state while loading)."""
    import asyncio

    from cake.server.app import ServerState, create_app
    from cake.server.auth import Access

    app = create_app(ServerState(loading={"phase": "loading"}), Access(f"{USER}:{PASSWORD}", KEY))

    async def check():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cake") as client:
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            assert r.json()["progress"]["phase"] == "loading"
            assert (await client.get("/v1/models")).status_code == 401
            r = await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 503 and "still loading" in r.json()["error"]

    asyncio.run(check())
