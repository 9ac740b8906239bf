"""Soak: `cake serve` under many concurrent clients while busy processes take the cores.

    python benchmarks/soak.py --minutes 10 --clients 16 --busy 2            # one machine
    python benchmarks/soak.py --minutes 10 --clients 16 --busy 2 --cluster  # master + worker

Clients loop for the whole run: streamed and blocking chats of random lengths, and now and
then a stream dropped halfway (the server must cancel it and go on). Counted: crashes (the
server or a worker exits), errors (a non-200 answer, a stream that carries an error), lost
streams (one that ends without `[DONE]`), and the growth of the server's resident memory
from the first minute to the end (its process tree: the master's Ray processes included).
The KV pool is kept small (--kv-memory) so that it is all in use within the first minute: the
prefix cache keeps finished requests' blocks until the pool is full, so a big pool's pages
keep being mapped as its unused blocks are reached (growth by design, up to the pool's size,
which would hide a leak).
Prints one JSON line; exits 1 unless crashes, errors and lost streams are all zero.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
BUSY = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"
PROMPTS = ["What is the capital of France?", "Write a haiku about bread.",
           "Explain why the sky is blue.", "List three prime numbers.",
           "Tell me a story about a dragon who learns to bake."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cake", *args], cwd=ROOT, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_ready(url: str, procs: list, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a cake process exited while starting")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def rss_by_process(pids: list[int]) -> dict[str, int]:
    """MiB per process of the trees, keyed by pid and a short name (to see which one grows)."""
    out = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for q in [root, *root.children(recursive=True)]:
                name = " ".join(q.cmdline()[:4])[-40:] or q.name()
                out[f"{q.pid} {name}"] = q.memory_info().rss >> 20
        except psutil.NoSuchProcess:
            pass
    return out


def client(url: str, seed: int, end: float, stats: dict, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=300) as http:
        while time.monotonic() < end:
            body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                    "max_tokens": rng.randint(4, 64), "temperature": rng.choice([0, 0.8]),
                    "stream": rng.random() < 0.7}
            outcome = "ok"
            try:
                if body["stream"]:
                    drop = rng.random() < 0.15
                    with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            outcome = "error"
                        else:
                            done, n = False, 0
                            for line in r.iter_lines():
                                n += 1
                                if line.startswith('data: {"error"'):
                                    outcome = "error"
                                if line == "data: [DONE]":
                                    done = True
                                if drop and n == 6:
                                    break  # the client leaves mid-stream
                            if not drop and not done and outcome == "ok":
                                outcome = "lost"
                            if drop:
                                outcome = "dropped"
                else:
                    r = http.post("/v1/chat/completions", json=body)
                    ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
                    outcome = "ok" if ok else "error"
            except httpx.HTTPError:
                outcome = "lost"
            with lock:
                stats[outcome] = stats.get(outcome, 0) + 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--busy", type=int, default=2, help="busy processes competing for cores")
    ap.add_argument("--cluster", action="store_true", help="a master and one worker")
    ap.add_argument("--model", default=None, help="default: the embedded default model")
    ap.add_argument("--kv-memory", default="32MiB", help="the server's KV pool (see above)")
    ap.add_argument("--rss-every", type=float, default=0,
                    help="seconds between per-process RSS lines on stderr (0: none)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cake-soak-"))
    env = {**os.environ, "CAKE_CACHE": str(tmp / "cache")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["serve", *([args.model] if args.model else []), "--api", f"127.0.0.1:{port}",
             "--max-batch", "8", "--kv-memory", args.kv_memory]
    procs = []
    if args.cluster:
        address = f"127.0.0.1:{free_port()}"
        serve += ["--cluster-key", "soak", "--cluster-address", address, "--min-workers", "1",
                  "--discovery-timeout", "300"]
    procs.append(start(serve, tmp / "server.log", env))
    if args.cluster:
        time.sleep(5)
        procs.append(start(["worker", "--join", address, "--cluster-key", "soak", "--name",
                            "w1"], tmp / "worker.log", {**env, "CAKE_CACHE": str(tmp / "w1")}))
    busy = []
    try:
        wait_ready(url, procs)
        seconds = args.minutes * 60
        busy = [subprocess.Popen([sys.executable, "-c", BUSY.format(s=seconds + 60)])
                for _ in range(args.busy)]
        stats, lock = {}, threading.Lock()
        t0 = time.monotonic()
        end = t0 + seconds
        threads = [threading.Thread(target=client, args=(url, i, end, stats, lock), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        rss_first = rss_peak = 0
        crashed = []
        next_report = t0
        while time.monotonic() < end:
            time.sleep(1)
            if args.rss_every and time.monotonic() >= next_report:
                next_report += args.rss_every
                print(json.dumps({"t": round(time.monotonic() - t0),
                                  "rss_mib": rss_by_process([p.pid for p in procs])}),
                      file=sys.stderr, flush=True)
            rss = sum(tree_rss(p.pid) for p in procs)
            rss_peak = max(rss_peak, rss)
            if not rss_first and time.monotonic() - t0 >= min(60, seconds / 4):
                rss_first = rss
            crashed = [p.args[3] for p in procs if p.poll() is not None]
            if crashed:
                break
        for t in threads:
            t.join(timeout=330)
        rss_end = sum(tree_rss(p.pid) for p in procs)
        crashed = [" ".join(p.args[3:5]) for p in procs if p.poll() is not None]
        result = {"bench": "soak", "cluster": args.cluster, "minutes": args.minutes,
                  "clients": args.clients, "busy": args.busy, "kv_memory": args.kv_memory,
                  "crashes": len(crashed),
                  "errors": stats.get("error", 0), "lost_streams": stats.get("lost", 0),
                  "completed": stats.get("ok", 0), "dropped_by_client": stats.get("dropped", 0),
                  "rss_after_first_minute_mib": round(rss_first / 2**20),
                  "rss_end_mib": round(rss_end / 2**20),
                  "rss_growth_mib": round((rss_end - rss_first) / 2**20),
                  "rss_peak_mib": round(rss_peak / 2**20), "logs": str(tmp)}
        print(json.dumps(result))
        ok = not crashed and not result["errors"] and not result["lost_streams"]
        return 0 if ok and result["completed"] else 1
    finally:
        for p in busy:
            p.kill()
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGINT if p is procs[0] else signal.SIGKILL)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
