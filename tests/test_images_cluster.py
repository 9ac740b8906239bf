"""An image pipeline's components on cluster workers, each its own process, all on 127.0.0.1:
tiny Stable Diffusion with the UNet on one worker and CLIP + VAE on another (one worker takes
the model from its own HF cache, the other gets the files shipped), tiny FLUX.1 with the
transformer and T5 on a worker. Same seed, same PNG bytes as one node; the topology shows who
holds what; a bad topology is a clear startup error; a worker SIGKILLed mid-render costs the
client nothing but time.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import pickle
import subprocess
import sys
import time

import httpx
import pytest

from cake.cluster import keys
from cluster_procs import KEY, start_cluster
from conftest import ROOT, free_port, hf_cache_with
from test_images import image_stats, send_raw, wait_stats

SECRET = keys.link_secret("in-process test cluster")

pytest.importorskip("ray")
tiny = pytest.importorskip("cake.testing.tiny_images", reason="image models are not installed")

SD_REPO = "tiny-org/tiny-sd"
SD_ARGS = ["--model-type", "image-model", "--n-steps", "4", "--sd-width", "64",
           "--sd-height", "32"]
FLUX_ARGS = ["--model-type", "image-model", "--n-steps", "3", "--flux-width", "32",
             "--flux-height", "48"]
# One thread everywhere: the same kernels split the same way, so the same bytes come out.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def render(server, body: dict, path: str = "/v1/images/generations") -> bytes:
    r = httpx.post(server.url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"] == "image/png"
    return r.content


def topology(server) -> dict:
    return httpx.get(server.url + "/api/v1/topology", timeout=30).json()


def pipeline_folder(tmp_path_factory, arch: str):
    folder = tmp_path_factory.getbasetemp() / "tiny-image-pipelines" / arch
    if not (folder / "model_index.json").exists():
        tiny.write_tiny_pipeline(folder, arch)
    return folder


def topology_file(tmp, text: str):
    path = tmp / "topology.yml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return pipeline_folder(tmp_path_factory, "sd")


@pytest.fixture(scope="module")
def sd_cluster(start_server, tmp_path_factory, sd_folder):
    """The master serves the repo from its HF cache; w1 has the same snapshot in its own,
    w2 has nothing and is sent the files."""
    tmp = tmp_path_factory.mktemp("sd-cluster")
    caches = {name: tmp / f"hf-{name}" for name in ("master", "w1", "w2")}
    for name in ("master", "w1"):
        hf_cache_with(caches[name], SD_REPO, sd_folder)
    caches["w2"].mkdir()
    topo = topology_file(tmp, "w1:\n  description: the UNet box\n  layers:\n  - unet\n"
                              "w2:\n  layers: [clip, vae]\n")
    offline = {"HF_HUB_OFFLINE": "1", **ONE_THREAD}
    master, workers, _ = start_cluster(
        start_server, tmp, [SD_REPO, *SD_ARGS, "--topology", topo],
        [(["worker", "--name", name], {"HF_HUB_CACHE": str(caches[name]), **offline})
         for name in ("w1", "w2")],
        env={"HF_HUB_CACHE": str(caches["master"]), **offline})
    yield master, dict(zip(("w1", "w2"), workers))
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def sd_single(start_server, sd_folder):
    return start_server(str(sd_folder), *SD_ARGS, env=ONE_THREAD)


def test_sd_split_renders_what_one_node_renders(sd_cluster, sd_single):
    master, _ = sd_cluster
    for body in ({"prompt": "a lighthouse in a storm", "seed": 42},
                 {"prompt": "a meadow", "seed": 7, "size": "32x32"}):
        assert render(master, body) == render(sd_single, body)
    # img2img: the VAE's encode runs on w2 as well
    init = base64.b64encode(render(sd_single, {"prompt": "x", "seed": 1})).decode()
    legacy = {"image_args": {"prompt": "a watercolor", "image-seed": 3, "n-steps": 4,
                             "sd-img2img": init, "sd-img2img-strength": 0.5},
              "response_format": "png"}
    assert render(master, legacy, "/api/v1/image") == render(sd_single, legacy, "/api/v1/image")


def test_sd_topology_shows_the_placement(sd_cluster):
    master, _ = sd_cluster
    doc = topology(master)
    workers = {w["name"]: w for w in doc["workers"]}
    assert workers["w1"]["components"] == ["unet"] and workers["w1"]["layers"] == ["unet"]
    assert workers["w1"]["description"] == "the UNet box"
    assert workers["w2"]["components"] == ["text_encoder", "vae"]
    assert {w["status"] for w in workers.values()} == {"ready"}
    # w1 had the snapshot in its own HF cache; w2 was sent the files
    assert workers["w1"]["weights_from"] == "hf-cache"
    assert workers["w2"]["weights_from"] == "shipped"
    assert doc["master"]["layers"] == [] and doc["master"]["memory_used_bytes"] == 0
    nodes = {name: entry["node"] for name, entry in doc["layer_details"].items()}
    assert nodes == {"unet": "w1", "text_encoder": "w2", "vae": "w2"}
    assert doc["layer_details"]["unet"]["total_bytes"] > 0
    assert doc["events"][0]["event"] == "placed"


def test_worker_killed_mid_render_still_gives_the_image(sd_cluster, sd_single):
    master, workers = sd_cluster
    body = {"prompt": "a long night", "seed": 5}
    legacy = {"image_args": {"prompt": "a long night", "image-seed": 5, "n-steps": 300},
              "response_format": "png"}
    steps_before = httpx.get(master.url + "/health", timeout=10).json()["images"]["steps"]
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(render, master, legacy, "/api/v1/image")
        deadline = time.monotonic() + 120
        while httpx.get(master.url + "/health", timeout=10).json()["images"]["steps"] \
                == steps_before:
            assert time.monotonic() < deadline and not pending.done()
            time.sleep(0.05)
        workers["w1"].stop()  # SIGKILL to its process group, mid-render
        png = pending.result()
    assert png == render(sd_single, legacy, "/api/v1/image")  # rendered again from step one
    assert "rendering the image again from its first step" in master.output()
    doc = topology(master)
    w1 = next(w for w in doc["workers"] if w["name"] == "w1")
    assert w1["status"] == "lost" and w1["components"] == []
    assert doc["master"]["layers"] == ["unet"]
    assert doc["layer_details"]["unet"]["node"] == "master"
    assert [e for e in doc["events"] if e["event"] == "taken back"][0]["components"] == ["unet"]
    # and the next request is served with the UNet here, the rest still on w2
    assert render(master, body) == render(sd_single, body)


def test_flux_split(start_server, tmp_path_factory):
    """FLUX.1: the transformer and T5 (Cake's name) on a worker, CLIP and the VAE here."""
    folder = pipeline_folder(tmp_path_factory, "flux1")
    tmp = tmp_path_factory.mktemp("flux-cluster")
    topo = topology_file(tmp, "fw:\n  layers: [transformer, t5]\n")
    master, workers, _ = start_cluster(start_server, tmp, [str(folder), *FLUX_ARGS,
                                                           "--topology", topo],
                                       [(["worker", "--name", "fw"], {})], env=ONE_THREAD)
    try:
        single = start_server(str(folder), *FLUX_ARGS, env=ONE_THREAD)
        body = {"prompt": "a rusty robot", "seed": 11}
        assert render(master, body) == render(single, body)
        doc = topology(master)
        assert doc["workers"][0]["components"] == ["transformer", "text_encoder_2"]
        assert sorted(doc["master"]["layers"]) == ["text_encoder", "vae"]
        # the queue and cancelling between steps work as on one node
        long = {"image_args": {"prompt": "x", "n-steps": 1000, "sd-num-samples": 10}}
        before = image_stats(master)
        running = send_raw(master, "/api/v1/image", long)
        wait_stats(master, lambda s: s["running"] == 1 and s["steps"] > before["steps"])
        queued = send_raw(master, "/api/v1/image", long)
        wait_stats(master, lambda s: s["queued"] == 1)
        queued.close()
        running.close()
        after = wait_stats(master, lambda s: s["cancelled"] == before["cancelled"] + 2)
        assert after["completed"] == before["completed"] and after["running"] == 0
        assert render(master, body) == render(single, body)
    finally:
        for w in workers:
            w.stop()


def test_a_worker_that_never_joins_leaves_its_components_here(start_server, sd_folder,
                                                               sd_single, tmp_path):
    topo = topology_file(tmp_path, "ghost:\n  layers: [unet]\n")
    master = start_server(str(sd_folder), *SD_ARGS, "--cluster-key", KEY, "--cluster-address",
                          f"127.0.0.1:{free_port()}", "--topology", topo,
                          "--discovery-timeout", "1", env=ONE_THREAD)
    body = {"prompt": "a quiet harbour", "seed": 9}
    assert render(master, body) == render(sd_single, body)
    doc = topology(master)
    assert [(w["name"], w["status"], w["components"]) for w in doc["workers"]] == [
        ("ghost", "missing", [])]
    assert doc["layer_details"]["unet"]["node"] == "master"
    assert doc["events"][0] == {**doc["events"][0], "event": "missing", "worker": "ghost",
                                "components": ["unet"]}


@pytest.mark.parametrize("layers, message", [
    ("[transformer]", "topology names 'transformer', but StableDiffusionPipeline has no "
                      "transformer"),
    ("[t5]", "topology names 't5', but StableDiffusionPipeline has no T5 encoder"),
    ("[model.layers.0-3]", "topology names 'model.layers.0-3': an image model's nodes hold "
                           "components, one of text_encoder, unet, vae"),
])
def test_bad_topology_is_a_clear_startup_error(tmp_path, sd_folder, layers, message):
    topo = topology_file(tmp_path, f"w1:\n  layers: {layers}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cake", "serve", str(sd_folder), "--model-type", "image-model",
         "--cluster-key", KEY, "--cluster-address", f"127.0.0.1:{free_port()}",
         "--topology", topo, "--api", f"127.0.0.1:{free_port()}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"cake: {message}" in proc.stderr


# --- the stand-ins and the worker's side, in this process -----------------------------------

class PickledLink:
    """ImageCluster's side of the calls, over a ComponentWorker in this process: arguments
    and results are pickled on the way, as Ray does between machines."""

    def __init__(self, worker):
        self.worker = worker

    def call(self, name, method, args, kwargs):
        from cake.image.cluster import moved

        sent = pickle.loads(pickle.dumps(moved((args, kwargs), "cpu")))
        return pickle.loads(pickle.dumps(self.worker.call(name, method, *sent)))

    def set_dtype(self, name, dtype):
        self.worker.set_dtype(name, dtype)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_stand_ins_render_what_the_components_render(tmp_path_factory, monkeypatch, arch):
    """Every family, text-to-image and image-to-image: each component shipped to a worker
    (here, in-process) and run there gives the same PNG bytes as the pipeline alone."""
    import torch
    from PIL import Image

    from cake.image import cluster
    from cake.image.arch import describe
    from cake.image.generator import ImageModel
    from cake.image.loader import load_pipeline, model_index

    monkeypatch.setenv("CAKE_CACHE", str(tmp_path_factory.mktemp("cake-cache")))
    monkeypatch.setenv(keys.LINK_SECRET_ENV, SECRET.hex())  # as a worker node's
    folder = pipeline_folder(tmp_path_factory, arch)
    index = model_index(folder)
    names = [n for n in cluster.COMPONENTS if (index.get(n) or [None])[0]]
    worker = cluster.ComponentWorker("w")
    for name in names:
        spec = cluster.component_spec(folder, index, name, None, torch.float32,
                                      torch.device("cpu"))
        assert not worker.has_weights(spec)
        sums = cluster.ship(folder / name, spec, lambda *chunk: worker.receive(spec, *chunk),
                            SECRET)
        assert worker.load(spec, sums)["weights_from"] == "shipped"
    link = PickledLink(worker)
    stand_ins = {n: cluster.stand_in(cluster.component_class(index, n), folder / n, n, link,
                                     "cpu", torch.float32) for n in names}
    init = Image.new("RGB", (64, 64), (120, 30, 200))
    pngs = []
    for components in (None, stand_ins):
        pipe = load_pipeline(folder, None, None, "cpu", torch.float32, components=components)
        model = ImageModel(pipe, describe(pipe, None, arch), arch, steps=2)
        try:
            pngs.append(model.generate(model.job("a red fox", seed=5, count=2, batch=2))
                        + model.generate(model.job("a red fox", seed=5, init_image=init,
                                                   strength=0.6, steps=4)))
        finally:
            model.close()
    assert pngs[0] == pngs[1] and len(pngs[0]) == 3
    assert worker.calls >= len(names)


def test_shipped_components_are_kept_and_checked(tmp_path_factory, monkeypatch):
    import torch

    from cake.image import cluster
    from cake.image.loader import model_index

    monkeypatch.setenv("CAKE_CACHE", str(tmp_path_factory.mktemp("cake-cache")))
    monkeypatch.setenv(keys.LINK_SECRET_ENV, SECRET.hex())
    folder = pipeline_folder(tmp_path_factory, "sd")
    spec = cluster.component_spec(folder, model_index(folder), "vae", None, torch.float32,
                                  torch.device("cpu"))
    first = cluster.ComponentWorker("w")
    first.load(spec, cluster.ship(folder / "vae", spec,
                                  lambda *chunk: first.receive(spec, *chunk), SECRET))
    again = cluster.ComponentWorker("w")  # a restarted worker: the copy on disk serves
    assert again.has_weights(spec) and again.load(spec)["weights_from"] == "disk-cache"
    kept = cluster.cache_root() / spec["fingerprint"] / "vae"
    weights = next(kept.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one byte off
    assert not cluster.ComponentWorker("w").has_weights(spec)
    # a shipment that arrives damaged is refused
    broken = cluster.ComponentWorker("w")
    sums = cluster.ship(folder / "vae", spec, lambda *chunk: broken.receive(spec, *chunk),
                        SECRET)
    with pytest.raises(RuntimeError, match="arrived corrupted"):
        broken.load(spec, {k: "0" * 64 for k in sums})
    # and one whose MAC was not made with the cluster's key
    forged = dict(spec, mac=keys.message_mac(b"not the key" * 3, cluster.manifest(sums)))
    with pytest.raises(RuntimeError, match="fail their MAC"):
        broken.load(forged, sums)
