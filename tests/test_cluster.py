"""A model's layers spread over a master and two workers, each its own process, all on
127.0.0.1: the same greedy text as one machine, the topology document, concurrent requests,
prompt-lookup drafts verified on the ring, a worker SIGKILLed mid-stream, a wrong cluster
key, a manual topology with `cake split`, and a KV pool too small for two streams (one is
preempted and recomputed on the ring).

Two clusters share the module (each ~15 s to start on a small machine): the embedded default
model with automatic placement, and a tiny random model with a topology file.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from cluster_procs import FRANCE, KEY, STORY, chat, start_cluster, topology
from conftest import ROOT, free_port, hf_cache_with, write_tiny_model
from test_paged_kv import LIST, SYSTEM, health

pytest.importorskip("ray")

@pytest.fixture(scope="module")
def default_cluster(start_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    # Both worker forms: `cake worker` and Cake's `cake run --cluster-key K --name N`.
    master, workers, address = start_cluster(
        # Three groups of requests in flight (on one machine the default would be one).
        start_server, tmp, ["--max-batch", "4", "--pipeline-depth", "3"],
        [(["worker", "--name", "w1"], {}), (["run", "--name", "w2"], {})])
    yield master, workers, address
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def single_node(default_server):
    return default_server


def test_default_model_same_greedy_text_as_one_machine(default_cluster, single_node):
    master, _, _ = default_cluster
    assert chat(master, FRANCE, 30) == chat(single_node, FRANCE, 30)
    assert "Paris" in chat(master, FRANCE, 30)


def test_topology_document(default_cluster):
    master, _, _ = default_cluster
    doc = topology(master)
    assert doc["model"] == doc["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert doc["num_layers"] == 30 and doc["dtype"] == "F32"
    assert doc["master"]["status"] == "ready" and doc["master"]["backend"] == "cpu"
    assert [w["name"] for w in doc["workers"]] == ["w1", "w2"]
    ranges = [doc["master"]["layer_range"]] + [w["layer_range"] for w in doc["workers"]]
    # Equal memory on one machine: ten contiguous layers each, the master first.
    assert ranges == ["model.layers.0-9", "model.layers.10-19", "model.layers.20-29"]
    for w in doc["workers"]:
        assert w["status"] == "ready" and w["weights_from"] == "shipped"
        # Cake's shape: a list of layer names and a number for each worker too.
        assert w["layers"][0] == "model.layers." + w["layer_range"].split(".")[2].split("-")[0]
        assert isinstance(w["tflops"], float) and w["tflops"] > 0
        assert w["host"] == "127.0.0.1" and w["vram_bytes"] > 0 and w["os"]
    assert sorted(doc["layer_details"], key=lambda k: int(k.split(".")[2])) == [
        f"model.layers.{i}" for i in range(30)]
    q = next(t for t in doc["layer_details"]["model.layers.12"]["tensors"]
             if t["short_name"] == "self_attn.q_proj.weight")
    # Kept in the GGUF's 4-bit blocks on whichever node holds it: 20 bytes per 32 weights.
    assert q["shape"] == [576, 576] and q["dtype"] == "Q4_1"
    assert q["size_bytes"] == 576 * 576 // 32 * 20


def test_concurrent_requests(default_cluster, single_node):
    master, _, _ = default_cluster
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(4)]
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda m: chat(master, m, 16, stream=True), prompts))
    want = [chat(single_node, m, 16) for m in prompts]
    assert got == want


def test_embeddings_and_n_choices_as_one_machine(default_cluster, single_node):
    """The master keeps the final norm, so embeddings come from the cluster as from one
    machine; n > 1 runs its choices through the ring too."""
    master, _, _ = default_cluster
    texts = ["The capital of France is Paris.", "Bread is baked in an oven."]

    def embed(server):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        return [d.embedding for d in client.embeddings.create(model="m", input=texts).data]

    for got, want in zip(embed(master), embed(single_node)):
        assert len(got) == len(want) == 576
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    client = openai.OpenAI(base_url=master.url + "/v1", api_key="x", max_retries=0)
    out = client.chat.completions.create(model="m", messages=FRANCE, max_tokens=12, n=2,
                                         temperature=0)
    assert [c.message.content for c in out.choices] == [chat(single_node, FRANCE, 12)] * 2


def test_wrong_cluster_key_is_refused(default_cluster, tmp_path):
    _, _, address = default_cluster
    out = subprocess.run([sys.executable, "-m", "cake", "worker", "--join", address,
                          "--cluster-key", "not-the-key", "--name", "intruder"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, start_new_session=True)
    assert out.returncode != 0
    assert "wrong cluster key" in out.stderr


def prefilled(doc: dict) -> dict:
    """Positions each stage computed in prompt-sized steps, by layer range."""
    counts = dict(doc["master"]["prefilled_tokens"])
    counts.update({w["layer_range"]: w["prefilled_tokens"] for w in doc["workers"]
                   if w["status"] == "ready"})
    return counts


def test_prefix_cache_and_blocks_on_the_cluster(default_cluster, single_node):
    """Stages keep paged KV: a second request with the same long system prompt maps it from
    the cache on every stage (each computes only the rest) and answers as one machine."""
    master, _, _ = default_cluster
    client = openai.OpenAI(base_url=master.url + "/v1", api_key="x", max_retries=0, timeout=300)
    ask = [{"role": "system", "content": SYSTEM},
           {"role": "user", "content": "Where do the books of shelf 7 go?"}]
    first = client.chat.completions.create(model="x", messages=ask, max_tokens=20,
                                           temperature=0)
    before = prefilled(topology(master))
    again = client.chat.completions.create(model="x", messages=ask, max_tokens=20,
                                           temperature=0)
    after = prefilled(topology(master))
    prompt, cached = again.usage.prompt_tokens, again.usage.prompt_tokens_details.cached_tokens
    assert prompt > 400 and cached >= 0.9 * prompt
    assert again.choices[0].message.content == first.choices[0].message.content \
        == chat(single_node, ask, 20)
    assert {r: after[r] - before[r] for r in after} == {
        r: prompt - cached for r in ("model.layers.0-9", "model.layers.10-19",
                                     "model.layers.20-29")}
    engine = httpx.get(master.url + "/health", timeout=10).json()["engine"]
    assert engine["kv_block_size"] == 16 and engine["kv_blocks_total"] >= 64
    assert engine["prefix_cache_hit_tokens"] >= cached and engine["kv_blocks_cached"] > 0


def test_the_cluster_guesses_ahead_and_writes_what_one_machine_writes(default_cluster,
                                                                      single_node):
    """Prompt lookup on the ring: a copy's drafts are verified in one round trip, with
    the greedy text of one machine, alone and with company in flight."""
    master, _, _ = default_cluster
    prompts = [[{"role": "user", "content": f"Repeat this list exactly, once: {LIST}"}],
               [{"role": "user", "content": "Tell me about the sea."}]]
    want = [chat(single_node, m, 60) for m in prompts]
    before = health(master)["draft_tokens_accepted"]
    assert [chat(master, m, 60) for m in prompts] == want
    assert health(master)["draft_tokens_accepted"] > before
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(lambda m: chat(master, m, 60, stream=True), prompts)) == want


def test_worker_killed_mid_stream_the_stream_completes(default_cluster, single_node):
    """Runs last on this cluster: it loses a worker for good. The master takes the lost
    worker's layers and computes their cache again; the stage after them keeps its cache
    and computes nothing again."""
    master, workers, _ = default_cluster
    want = chat(single_node, STORY, 60)
    client = openai.OpenAI(base_url=master.url + "/v1", api_key="x", max_retries=0, timeout=300)
    before = prefilled(topology(master))
    pieces, usage = [], None
    for i, chunk in enumerate(client.chat.completions.create(
            model="x", messages=STORY, max_tokens=60, temperature=0, stream=True,
            stream_options={"include_usage": True})):
        pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        usage = chunk.usage or usage
        if i == 10:
            os.kill(workers[0].proc.pid, signal.SIGKILL)
    assert "".join(pieces) == want
    doc = topology(master)
    status = {w["name"]: w["status"] for w in doc["workers"]}
    assert status == {"w1": "lost", "w2": "ready"}
    held = [doc["master"]["layer_range"]] + [w["layer_range"] for w in doc["workers"] if w["layers"]]
    assert held == ["model.layers.0-19", "model.layers.20-29"]
    assert any(e["event"] == "recovered" and e["lost"] == ["w1"] and e["kept_caches"]
               for e in doc["events"])
    after = prefilled(doc)
    computed = usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
    assert after["model.layers.20-29"] - before["model.layers.20-29"] == computed
    # The master computed the lost layers' cache: the prompt and what was generated by then.
    assert after["model.layers.10-19"] > usage.prompt_tokens
    # And the cluster goes on serving.
    assert chat(master, FRANCE, 30) == chat(single_node, FRANCE, 30)


# --- a tiny random model, manual topology, `cake split`, the worker's own HF cache ---------

# The tiny six-layer model's KV: 2 heads of 16 at 16 bits, 16 positions a block, on the nodes
# with the most layers (two): 4 KiB a block. One story of 220 tokens takes 16 blocks.
KV_MEMORY, POOL_BLOCKS = "96KiB", 24


def test_tiny_model_manual_topology_split_and_local_weights(start_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny-cluster")
    model = write_tiny_model(tmp / "model", "llama", num_hidden_layers=6,
                             max_position_embeddings=4096)
    hf_cache_with(tmp / "hf", "tiny-org/tiny-six", model)
    hub = {"HF_HUB_CACHE": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
    topo = tmp / "topology.yml"
    topo.write_text("w1:\n  host: '127.0.0.1'\n  description: first box\n"
                    "  layers:\n    - 'model.layers.1-2'\n"
                    "w2:\n  host: '127.0.0.1'\n  layers: []\n")
    # w1 gets its layers from a `cake split` bundle; w2 finds the model in its HF cache.
    split = subprocess.run([sys.executable, "-m", "cake", "split", "--model-path",
                            "tiny-org/tiny-six", "--topology", str(topo), "--output",
                            str(tmp / "bundles")], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, **hub})
    assert split.returncode == 0, split.stderr
    assert "w1: model.layers.1-2" in split.stdout and "w2: no fixed layers" in split.stdout
    single = start_server("tiny-org/tiny-six", "--temperature", "0", env=hub)
    master, workers, _ = start_cluster(
        start_server, tmp, ["tiny-org/tiny-six", "--topology", str(topo), "--max-batch", "2",
                            "--worker-timeout", "5", "--kv-memory", KV_MEMORY],
        [(["worker", "--name", "w1"], {"CAKE_CACHE": str(tmp / "bundles" / "w1"),
                                       "HF_HUB_CACHE": str(tmp / "empty")}),
         (["worker", "--name", "w2"], {})], env=hub)
    try:
        doc = topology(master)
        got = {w["name"]: (w["layer_range"], w["weights_from"], w["description"])
               for w in doc["workers"]}
        assert got["w1"] == ("model.layers.1-2", "disk-cache", "first box")
        assert got["w2"][1] == "hf-cache" and got["w2"][0].startswith("model.layers.")
        # The master holds the rest: layer 0 before w1, and what w2 leaves after it.
        assert doc["master"]["layer_range"].startswith("model.layers.0-0")
        for stream in (False, True):
            assert chat(master, FRANCE, 40, stream) == chat(single, FRANCE, 40, stream)

        # The KV pool holds one long story, not two: the newest is preempted and recomputed
        # on the ring, and both texts are as on one machine.
        assert health(master)["kv_blocks_total"] == POOL_BLOCKS
        dragons = [[{"role": "user", "content": f"Write a long story about a dragon called {n}."}]
                   for n in ("Ash", "Blaze")]
        with cf.ThreadPoolExecutor(2) as pool:
            texts = list(pool.map(lambda m: chat(master, m, 220, True), dragons))
        assert health(master)["preemptions"] > 0
        assert texts == [chat(single, m, 220) for m in dragons]

        # Idle for longer than --worker-timeout: the stages wait for work as long as the
        # master lives, so the next request finds the ring as it was.
        time.sleep(8)
        assert chat(master, FRANCE, 40) == chat(single, FRANCE, 40)
        assert not [e for e in topology(master)["events"] if e["event"] == "recovered"]

        # A stage that stops (frozen, not dead: no connection reset) misses its heartbeat
        # and is replaced, and the stream goes on with the same text.
        frozen = next(w["stage_pid"] for w in doc["workers"] if w["name"] == "w2")
        want = chat(single, STORY, 300)
        client = openai.OpenAI(base_url=master.url + "/v1", api_key="x", max_retries=0,
                               timeout=300)
        pieces = []
        for i, chunk in enumerate(client.chat.completions.create(
                model="x", messages=STORY, max_tokens=300, temperature=0, stream=True)):
            pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            if i == 5:
                os.kill(frozen, signal.SIGSTOP)
        assert "".join(pieces) == want
        doc = topology(master)
        w2 = next(w for w in doc["workers"] if w["name"] == "w2")
        assert w2["status"] == "lost" and w2["layers"] == []
        assert {w["name"]: w["status"] for w in doc["workers"]} == {"w1": "ready", "w2": "lost"}
        recovered = [e for e in doc["events"] if e["event"] == "recovered"]
        assert [e["lost"] for e in recovered] == [["w2"]]
        assert "stopped answering" in recovered[0]["error"]
    finally:
        for w in workers:
            w.stop()
        master.stop()


def test_no_worker_by_the_timeout_serves_alone(start_server, tmp_path):
    """The key from CAKE_CLUSTER_KEY; nobody joins within --discovery-timeout."""
    model = write_tiny_model(tmp_path / "model", "llama")
    server = start_server(str(model), "--cluster-address", f"127.0.0.1:{free_port()}",
                          "--discovery-timeout", "1", "--temperature", "0",
                          env={"CAKE_CLUSTER_KEY": KEY, "CAKE_CACHE": str(tmp_path / "cache")})
    try:
        doc = topology(server)
        assert doc["workers"] == [] and doc["master"]["layer_range"] == "model.layers.0-1"
        assert "cluster master listening for workers at 127.0.0.1:" in server.output()
        assert chat(server, FRANCE, 5)
    finally:
        server.stop()
