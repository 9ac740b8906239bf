"""Real cluster processes for tests: `cake worker` processes in their own process groups,
and a master `cake serve` that they join at an explicit address; what tests ask of them."""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai

from conftest import ROOT, free_port

KEY = "test-cluster-key"
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake."}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def chat(server, messages, max_tokens, stream=False) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                           timeout=300)
    if not stream:
        r = client.chat.completions.create(model="x", messages=messages, max_tokens=max_tokens,
                                           temperature=0)
        return r.choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="x", messages=messages, max_tokens=max_tokens, temperature=0, stream=True))


def topology(server) -> dict:
    return httpx.get(server.url + "/api/v1/topology", timeout=30).json()


class Worker:
    """`cake worker` (or Cake's `cake run` worker form) in its own process group, so that
    everything it starts (Ray's processes) is stopped by that group's id."""

    def __init__(self, log_path, *args: str, env: dict | None = None, wrap: list[str] = ()):
        """wrap: a command to run the worker under (another network namespace's `ip netns
        exec NS`)."""
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([*wrap, sys.executable, "-m", "cake", *args], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def start_cluster(start_server, tmp, model_args: list[str], workers: list[tuple[list, dict]],
                  env: dict | None = None, host: str = "127.0.0.1", wrap: list[str] = ()):
    """A master plus workers joining it at an explicit address (host: one of this machine's;
    wrap: what to run the workers under)."""
    address = f"{host}:{free_port()}"
    procs = []
    master_env = {"CAKE_CACHE": str(tmp / "master-cache"), **(env or {})}

    def launch():  # once the master listens for workers
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, int(address.rsplit(":", 1)[1])), 1).close()
                break
            except OSError:
                time.sleep(0.3)
        # One at a time: Ray gives a joining node a fixed 30 s to register, which raylets
        # starting together on a loaded 2-core machine can miss (the worker then retries).
        for i, (args, wenv) in enumerate(workers):
            worker = Worker(tmp / f"worker{i}.log", *args, "--join", address,
                            "--cluster-key", KEY,
                            env={"CAKE_CACHE": str(tmp / f"cache{i}"), **(env or {}), **wenv},
                            wrap=wrap)
            procs.append(worker)
            joined_by = time.monotonic() + 150
            while "joined the cluster" not in worker.output() and time.monotonic() < joined_by:
                if worker.proc.poll() is not None:
                    break
                time.sleep(0.3)

    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(launch)
        try:
            master = start_server(*model_args, "--cluster-key", KEY, "--cluster-address",
                                  address, "--min-workers", str(len(workers)),
                                  "--discovery-timeout", "300", "--temperature", "0",
                                  env=master_env, timeout=420)
        except Exception:
            pending.result()
            for w in procs:
                print(w.output())
                w.stop()
            raise
        pending.result()
    return master, procs, address
