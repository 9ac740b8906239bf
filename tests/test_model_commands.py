"""`cake run`, `cake pull`, `cake list`, `cake rm` as real processes, against a Hugging Face
cache laid out on disk (offline) and cake's own cache in a temporary folder."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request  # module level: the fake hub's annotations resolve here
from fastapi.responses import JSONResponse, Response

from conftest import ROOT, free_port, write_tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cake(*args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cake", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def hf_cache_repo(cache: Path, repo_id: str, files: dict[str, bytes],
                  unfinished: dict[str, bytes] | None = None) -> Path:
    """A repo as huggingface_hub caches it: content-addressed blobs, a snapshot of links to
    them, a ref; `unfinished` files are blobs still downloading (*.incomplete)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / digest)
    for name, data in (unfinished or {}).items():
        (blobs / (hashlib.sha256(name.encode()).hexdigest() + ".incomplete")).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", "llama")
    return {f.name: f.read_bytes() for f in folder.iterdir()}


@pytest.fixture
def caches(tmp_path, tiny_files):
    """Two complete repos, one partial one, a model in cake's cache; env pointing at them."""
    hf = tmp_path / "hf"
    hf_cache_repo(hf, "tiny-org/tiny-llama", tiny_files)
    hf_cache_repo(hf, "other-org/tiny-llama", tiny_files)
    hf_cache_repo(hf, "tiny-org/half-done", {"config.json": tiny_files["config.json"]},
                  unfinished={"model.safetensors": b"\0" * 1000})
    own = tmp_path / "cake" / "models" / "converted-smol"
    own.mkdir(parents=True)
    (own / "config.json").write_bytes(tiny_files["config.json"])
    (own / "model.safetensors").write_bytes(tiny_files["model.safetensors"])
    env = {"HF_HUB_CACHE": str(hf), "HF_HUB_OFFLINE": "1", "CAKE_CACHE": str(tmp_path / "cake")}
    return hf, own, env


def test_run_streams_the_answer_to_stdout():
    out = cake("run", "What is the capital of France?", "--temperature", "0", "-n", "20")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The capital of France is Paris."


def test_run_a_model_from_the_hf_cache(caches):
    _, _, env = caches
    out = cake("run", "tiny-org/tiny-llama", "Hello", "--temperature", "0", "-n", "6", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # random weights: some text, six tokens of it
    missing = cake("run", "nobody/nothing", "Hello", env=env)
    assert missing.returncode == 1 and "nobody/nothing" in missing.stderr


def test_pull_from_the_local_cache_offline(caches):
    hf, _, env = caches
    out = cake("pull", "tiny-org/tiny-llama", env=env)
    assert out.returncode == 0, out.stderr
    snapshot = hf / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    assert out.stdout.strip().endswith(f"complete, at {snapshot}")
    assert out.stdout.startswith("tiny-org/tiny-llama: ")
    missing = cake("pull", "nobody/nothing", env=env)
    assert missing.returncode == 1 and "cannot get nobody/nothing" in missing.stderr
    not_a_repo = cake("pull", "./some/folder", env=env)
    assert not_a_repo.returncode != 0 and "not a Hugging Face repo id" in not_a_repo.stderr


def test_list_shows_every_cache(caches):
    hf, own, env = caches
    out = cake("list", env=env)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {"tiny-org/tiny-llama", "other-org/tiny-llama", "tiny-org/half-done",
                         "converted-smol", "HuggingFaceTB/SmolLM2-135M-Instruct"}
    name, size, unit, state, source, path = rows["tiny-org/tiny-llama"]
    assert (state, source, path) == ("complete", "hf-cache", str(hf / "models--tiny-org--tiny-llama"))
    assert unit == "MB" and float(size) > 1  # the tiny model's 49152-token embedding
    assert rows["tiny-org/half-done"][3:5] == ["partial", "hf-cache"]
    assert rows["converted-smol"][3:6] == ["complete", "cake-cache", str(own)]
    assert rows["HuggingFaceTB/SmolLM2-135M-Instruct"][3:5] == ["complete", "embedded"]


def test_rm_asks_then_deletes(caches):
    hf, _, env = caches
    repo = hf / "models--tiny-org--half-done"
    out = cake("rm", "half-done", env=env, stdin="n\n")  # short name; answer no
    assert out.returncode == 0 and "will delete tiny-org/half-done" in out.stdout
    assert str(repo) in out.stdout and "kept" in out.stdout and repo.exists()
    out = cake("rm", "half-done", env=env, stdin="y\n")
    assert out.returncode == 0 and "deleted tiny-org/half-done" in out.stdout
    assert not repo.exists()
    assert (hf / "models--tiny-org--tiny-llama").exists()  # nothing else went


def test_rm_full_name_short_name_and_path(caches):
    hf, own, env = caches
    ambiguous = cake("rm", "tiny-llama", "--yes", env=env)
    assert ambiguous.returncode == 1 and "matches several models" in ambiguous.stderr
    assert "tiny-org/tiny-llama" in ambiguous.stderr and "other-org/tiny-llama" in ambiguous.stderr
    out = cake("rm", "other-org/tiny-llama", "--yes", env=env)
    assert out.returncode == 0 and not (hf / "models--other-org--tiny-llama").exists()
    out = cake("rm", str(own), "--yes", env=env)  # a path inside cake's cache
    assert out.returncode == 0 and not own.exists()
    out = cake("rm", "tiny-llama", env=env, stdin="yes\n")  # unique now
    assert out.returncode == 0 and not (hf / "models--tiny-org--tiny-llama").exists()
    assert "no local model named 'tiny-llama'" in cake("rm", "tiny-llama", env=env).stderr


def test_rm_refuses_outside_the_caches(caches, tmp_path):
    hf, _, env = caches
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    out = cake("rm", str(outside), "--yes", env=env)
    assert out.returncode == 1 and "outside the model caches" in out.stderr
    assert outside.exists()
    # A link inside a cache that points out of it: never followed.
    (hf / "models--evil--link").symlink_to(outside, target_is_directory=True)
    out = cake("rm", str(hf), "--yes", env=env)  # the cache root itself
    assert out.returncode == 1 and hf.exists()
    out = cake("rm", "evil/link", "--yes", env=env)
    assert out.returncode == 0 and not (hf / "models--evil--link").exists()
    embedded = cake("rm", "SmolLM2-135M-Instruct", "--yes", env=env)
    assert embedded.returncode == 1 and "embedded default model" in embedded.stderr
    assert (outside / "config.json").exists()


@pytest.fixture(scope="module")
def fake_hub(tiny_files):
    """The three Hub routes snapshot_download uses (repo info, file tree, file download),
    serving the tiny model plus a PyTorch .bin copy, on 127.0.0.1."""
    files = {**tiny_files, "pytorch_model.bin": b"\0" * 5000, "docs/notes.txt": b"hello"}
    app = FastAPI()

    @app.get("/api/models/{owner}/{name}/revision/{revision}")
    def info(owner: str, name: str, revision: str):
        return {"id": f"{owner}/{name}", "sha": COMMIT,
                "siblings": [{"rfilename": f} for f in files]}

    @app.get("/api/models/{owner}/{name}/tree/{revision}")
    def tree(owner: str, name: str, revision: str):
        return [{"type": "file", "path": f, "size": len(data),
                 "oid": hashlib.sha1(data).hexdigest()} for f, data in files.items()]

    @app.api_route("/{owner}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve(owner: str, name: str, revision: str, path: str, request: Request):
        if owner != "tiny-org" or path not in files:
            return JSONResponse({"error": "not found"}, status_code=404)
        data = files[path]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Length": str(len(data))}
        return Response(b"" if request.method == "HEAD" else data, headers=headers)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_pull_downloads_with_progress(fake_hub, tmp_path, tiny_files):
    env = {"HF_ENDPOINT": fake_hub, "HF_HUB_CACHE": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = cake("pull", "tiny-org/fresh", env=env)
    assert out.returncode == 0, out.stderr
    assert "Fetching" in out.stderr and "100%" in out.stderr  # huggingface_hub's progress
    snapshot = tmp_path / "hf" / "models--tiny-org--fresh" / "snapshots" / COMMIT
    assert out.stdout.strip().endswith(f"complete, at {snapshot}")
    fetched = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    assert fetched == sorted([*tiny_files, "docs/notes.txt"])  # no PyTorch .bin copy
    assert (snapshot / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    listed = cake("list", env=env).stdout
    assert any(line.startswith("tiny-org/fresh ") and " complete " in line
               for line in listed.splitlines())
    # --include picks files (a GGUF quant, say); the rest stays on the server.
    out = cake("pull", "tiny-org/picky", "--include", "*.json", env=env)
    picky = tmp_path / "hf" / "models--tiny-org--picky" / "snapshots" / COMMIT
    assert out.returncode == 0 and sorted(p.name for p in picky.iterdir()) == sorted(
        f for f in tiny_files if f.endswith(".json"))
    missing = cake("pull", "nobody/nothing", env=env)
    assert missing.returncode == 1 and "cannot get nobody/nothing" in missing.stderr
