"""Cluster overheads on one machine, measured in the same run as their anchors.

    python benchmarks/bench_cluster.py            # both parts
    python benchmarks/bench_cluster.py --hops-only
    python benchmarks/bench_cluster.py --one-core --delay-ms 0.5 --delay-ms 2   # (root)

1. Per-hop cost of a decode step: the step message (header + a 1 x hidden fp32 tensor)
   bounced between two processes over the CPU links stages use (TCP streams; gloo with
   CAKE_CPU_LINKS=gloo, which the servers below follow too); per hop = round trip/2.
2. Single-stream decode tok/s of the embedded default model: one `cake serve` alone, and a
   2-stage cluster (a master and one `cake worker`, layers split in two) on 127.0.0.1, or
   with the worker in another network namespace behind a delayed link (--delay-ms),
   alternated, median of --repeats. Both are real processes driven over HTTP.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. per hop --------------------------------------------------------------------------

def _bouncer(rank: int, port: int, hidden: int, steps: int, secure: bool, out) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from cake.cluster import transport
    from cake.text.kv_cache import StepBatch

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    group = transport.Group(rank, 2, "00" * 16, "127.0.0.1", 60, transport.cpu_links(),
                            secret=b"k" * 32 if secure else None, store=store)
    link = transport.Link(group, hidden, torch.float32, "cpu")
    waiter = transport.Waiter()
    x = torch.randn(1, 1, hidden)
    batch = StepBatch.make([[100]], [0], "cpu")
    times = []
    for i in range(steps):
        if rank == 0:  # as the master sends a step and waits for its result
            t = time.perf_counter()
            result = link.frame_work(1)
            works = link.send(1, x, batch)
            waiter.wait([w for w, _ in works] + [result], lambda waited: None)
            x = link.take(1)[1]
            times.append(time.perf_counter() - t)
        else:  # as a stage does
            _, y, b = link.recv(0)
            for w, _ in link.send(0, y, b):
                w.wait()
    if rank == 0:
        out.put(times[steps // 10:])


def bench_hops(hidden: int = 576, steps: int = 2000, secure: bool = True) -> dict:
    ctx = mp.get_context("spawn")
    port, q = free_port(), ctx.Queue()
    procs = [ctx.Process(target=_bouncer, args=(r, port, hidden, steps, secure, q))
             for r in (0, 1)]
    for p in procs:
        p.start()
    times = q.get(timeout=300)
    for p in procs:
        p.join(60)
    per_hop = [t / 2 * 1000 for t in times]
    return {"bench": "hop", "sealed": secure, "hidden": hidden, "steps": len(times),
            "per_hop_ms_median": round(statistics.median(per_hop), 4),
            "per_hop_ms_p90": round(sorted(per_hop)[int(0.9 * len(per_hop))], 4)}


# --- 2. 2-stage cluster vs one machine ---------------------------------------------------

class Proc:
    def __init__(self, args, log, env=None, new_group=False, wrap=()):
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([*wrap, sys.executable, "-m", "cake", *args], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=new_group)
        self.new_group = new_group

    def stop(self):
        if self.new_group:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def wait_ready(url: str, proc: Proc, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"server exited; see {proc.log.name}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def decode_rate(url: str, tokens: int) -> float:
    """tok/s between the first and the last streamed token of one greedy request."""
    import httpx

    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first = last = None
    n = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return (n - 1) / (last - first) if n > 1 and last > first else float("nan")


def concurrent_rate(url: str, tokens: int, streams: int) -> float:
    """Total generated tok/s of several greedy requests at once (wall clock)."""
    import concurrent.futures as cf

    import httpx

    def one(i):
        body = {"messages": [{"role": "user", "content": f"Tell story number {i} about a dragon."}],
                "max_tokens": tokens, "temperature": 0}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        return r.json()["usage"]["completion_tokens"]

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(streams) as pool:
        n = sum(pool.map(one, range(streams)))
    return n / (time.perf_counter() - t)


@contextlib.contextmanager
def single_and_cluster(serve_args: list[str], depth: int = 0, delay_ms: Optional[float] = None,
                       one_core: bool = False, insecure: bool = False,
                       forwarder_core: Optional[int] = None):
    """One `cake serve` alone and a master with one `cake worker`, both ready; yields
    (single URL, master URL, the link's measured one-way delay in ms or None). delay_ms: the
    worker in another network namespace behind a link with this one-way delay, as measured
    (benchmarks/netdelay.py); one_core: the single node and the
    master on core 0, the worker on core 1, one thread each; insecure: the data plane
    unsealed."""
    from netdelay import calibrated

    tmp = Path(tempfile.mkdtemp(prefix="cake-bench-"))
    single_url = f"http://127.0.0.1:{free_port()}"
    master_url = f"http://127.0.0.1:{free_port()}"
    remote = calibrated("cake-bench", delay_ms, forwarder_core) if delay_ms is not None \
        else None
    address = f"{remote.here if remote else '127.0.0.1'}:{free_port()}"
    pin = (lambda core: ["taskset", "-c", str(core)]) if one_core else (lambda core: [])
    threads = {"OMP_NUM_THREADS": "1"} if one_core else {}
    procs = []
    with contextlib.ExitStack() as stack:
        if remote:
            stack.enter_context(remote)
        stack.callback(lambda: [p.stop() for p in reversed(procs)])
        single = Proc(["serve", "--api", single_url[7:], *serve_args], tmp / "single.log",
                      env=threads, wrap=pin(0))
        procs.append(single)
        wait_ready(single_url, single)
        master = Proc(["serve", "--api", master_url[7:], *serve_args,
                       "--cluster-key", "bench", "--cluster-address", address,
                       "--min-workers", "1", "--discovery-timeout", "120",
                       "--pipeline-depth", str(depth),
                       *(["--cluster-insecure"] if insecure else [])],
                      tmp / "master.log", env={"CAKE_CACHE": str(tmp / "m"), **threads},
                      wrap=pin(0))
        procs.append(master)
        time.sleep(3)
        procs.append(Proc(["worker", "--join", address, "--cluster-key", "bench", "--name",
                           "w1"], tmp / "worker.log",
                          env={"CAKE_CACHE": str(tmp / "w"), **threads}, new_group=True,
                          wrap=(remote.wrap if remote else []) + pin(1)))
        wait_ready(master_url, master)
        yield single_url, master_url, round(remote.one_way_ms(), 3) if remote else None


def bench_cluster(tokens: int, repeats: int, streams: int = 4, depth: int = 0,
                  delay_ms: Optional[float] = None, one_core: bool = False,
                  insecure: bool = False, model: list[str] = (),
                  forwarder_core: Optional[int] = None) -> dict:
    """Decode tok/s, one stream and `streams` at once, alone and on a 2-node cluster (see
    single_and_cluster for the rest); model: serve arguments naming another model."""
    with single_and_cluster([*model, "--max-batch", str(streams)], depth, delay_ms, one_core,
                            insecure, forwarder_core) as (single_url, master_url, one_way):
        decode_rate(single_url, 8), decode_rate(master_url, 8)  # warm-up
        rates = {"single": [], "cluster": []}
        for _ in range(repeats):
            rates["single"].append(decode_rate(single_url, tokens))
            rates["cluster"].append(decode_rate(master_url, tokens))
        many = {"single": [], "cluster": []}
        for _ in range(repeats):
            many["single"].append(concurrent_rate(single_url, tokens, streams))
            many["cluster"].append(concurrent_rate(master_url, tokens, streams))
    s, c = (statistics.median(rates[k]) for k in ("single", "cluster"))
    ms, mc = (statistics.median(many[k]) for k in ("single", "cluster"))
    link = f"{delay_ms} ms one-way" if delay_ms is not None else "loopback"
    return {"bench": f"2-stage, {link}", "model": " ".join(model) or "default",
            "measured_one_way_ms": one_way,
            "one_core_each": one_core, "sealed": not insecure,
            "tokens": tokens, "repeats": repeats, "pipeline_depth": depth or "auto",
            "single_tok_s": round(s, 2), "cluster_tok_s": round(c, 2),
            "ratio": round(c / s, 3),
            f"{streams}_streams_single_tok_s": round(ms, 2),
            f"{streams}_streams_cluster_tok_s": round(mc, 2),
            "runs": {k: [round(v, 2) for v in r] for k, r in rates.items()}}


def bench_stopped_worker(tokens: int = 120) -> dict:
    """The pause a stream sees when its worker stops silently (SIGSTOP: no connection reset)
    mid-stream, and whether the text is what one machine writes."""
    import httpx

    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": tokens, "temperature": 0, "stream": True}
    with single_and_cluster([]) as (single_url, master_url, _):
        want = httpx.post(single_url + "/v1/chat/completions", timeout=600,
                          json={**body, "stream": False}).json()["choices"][0]["message"]
        doc = httpx.get(master_url + "/api/v1/topology", timeout=30).json()
        stage = doc["workers"][0]["stage_pid"]
        pieces, times = [], []
        with httpx.stream("POST", master_url + "/v1/chat/completions", json=body,
                          timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    pieces.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
                    times.append(time.perf_counter())
                    if len(pieces) == 10:
                        os.kill(stage, signal.SIGSTOP)
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"bench": "worker stopped mid-stream", "pause_s": round(max(gaps), 2),
            "same_text": "".join(pieces) == want["content"]}


def first_token_s(url: str) -> float:
    """Seconds from sending a short greedy request to its first streamed token."""
    import httpx

    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
            "temperature": 0, "stream": True}
    t = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                return time.perf_counter() - t
    return float("nan")


def bench_idle(seconds: float) -> dict:
    """Time to first token on a warm cluster, then after `seconds` with no requests, and
    whether the master logged a recovery in between (a stage that gave up while idle)."""
    import httpx

    with single_and_cluster([]) as (_, master_url, _):
        warm = statistics.median(first_token_s(master_url) for _ in range(5))
        time.sleep(seconds)
        after = first_token_s(master_url)
        events = httpx.get(master_url + "/api/v1/topology", timeout=30).json().get("events", [])
    return {"bench": f"idle {seconds:.0f} s", "warm_ttft_s": round(warm, 3),
            "after_idle_ttft_s": round(after, 3),
            "recoveries": sum(e["event"] == "recovered" for e in events)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hops-only", action="store_true")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pipeline-depth", type=int, default=0, help="0: the cluster's default")
    ap.add_argument("--streams", type=int, default=4, help="concurrent requests of the batch run")
    ap.add_argument("--delay-ms", type=float, action="append",
                    help="worker behind a link with this one-way delay (repeatable; needs root)")
    ap.add_argument("--stopped-worker", action="store_true",
                    help="only: the pause when a worker is SIGSTOPped mid-stream")
    ap.add_argument("--seal-cost", action="store_true",
                    help="each cluster run twice, sealed and --cluster-insecure: their ratio")
    ap.add_argument("--one-core", action="store_true",
                    help="each node on one core with one thread (master and single node: 0)")
    ap.add_argument("--model", default=None,
                    help="serve this model (path or repo) instead of the embedded default")
    ap.add_argument("--no-lookup", action="store_true",
                    help="--draft-tokens 0: a random model's greedy text loops, which "
                         "prompt lookup copies, unlike real text")
    ap.add_argument("--forwarder-core", type=int, default=None,
                    help="pin the delayed link's forwarder (--delay-ms) to this core")
    ap.add_argument("--idle", type=float, default=None, metavar="S",
                    help="only: time to first token warm and after S seconds idle")
    args = ap.parse_args()
    if args.idle is not None:
        print(json.dumps(bench_idle(args.idle)), flush=True)
        return
    if args.stopped_worker:
        print(json.dumps(bench_stopped_worker()), flush=True)
        return
    model = ([args.model] if args.model else []) + (["--draft-tokens", "0"] if args.no_lookup
                                                     else [])
    for secure in (False, True):
        print(json.dumps(bench_hops(secure=secure)), flush=True)
    if not args.hops_only:
        for delay in args.delay_ms or [None]:
            runs = {}
            for insecure in ((False, True) if args.seal_cost else (False,)):
                runs[insecure] = bench_cluster(args.tokens, args.repeats, args.streams,
                                               depth=args.pipeline_depth, delay_ms=delay,
                                               one_core=args.one_core, insecure=insecure,
                                               model=model,
                                               forwarder_core=args.forwarder_core)
                print(json.dumps(runs[insecure]), flush=True)
            if args.seal_cost:
                print(json.dumps({"bench": "seal cost", "delay_ms": delay,
                                  "sealed_vs_insecure": round(runs[False]["cluster_tok_s"] /
                                                              runs[True]["cluster_tok_s"], 3)}))


if __name__ == "__main__":
    main()
