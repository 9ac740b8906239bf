"""VibeVoice with its language model's layers split between a master and a worker (real
processes on 127.0.0.1): the same audio as one machine, the placement in the topology
document, and speech that goes on when the worker is killed."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from cluster_procs import start_cluster

pytest.importorskip("ray")

REQUEST = {"model": "x", "input": "Hello world, this is a test of speech.",
           "response_format": "pcm", "max_frames": 6, "cfg_scale": 1.5, "diffusion_steps": 3,
           "seed": 7}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cake.testing.tiny_vibevoice import write_tiny

    folder = tmp_path_factory.mktemp("vibevoice-tiny")
    write_tiny(folder)
    return folder


@pytest.fixture(scope="module")
def single(start_server, tiny):
    return start_server(str(tiny), "--model-type", "audio-model")


@pytest.fixture(scope="module")
def cluster(start_server, tiny, tmp_path_factory):
    master, workers, _ = start_cluster(
        start_server, tmp_path_factory.mktemp("speech-cluster"),
        [str(tiny), "--model-type", "audio-model", "--worker-timeout", "10"],
        [(["worker", "--name", "w1"], {})])
    yield master, workers
    for w in workers:
        w.stop()


def speech(server, **overrides) -> np.ndarray:
    r = httpx.post(server.url + "/v1/audio/speech", json={**REQUEST, **overrides}, timeout=300)
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, dtype="<f4")


def assert_same_audio(ours: np.ndarray, reference: np.ndarray) -> None:
    # The worker's decode path takes other (equally exact) kernels: equal up to rounding.
    assert ours.shape == reference.shape and len(reference) > 0
    scale = np.abs(reference).max()
    assert scale > 1e-3
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * scale)


def test_layers_are_split_and_the_audio_is_one_machines(cluster, single):
    master, _ = cluster
    doc = httpx.get(master.url + "/api/v1/topology", timeout=30).json()
    assert doc["num_layers"] == 2
    assert doc["master"]["layer_range"] == "model.layers.0-0"
    assert [(w["name"], w["layer_range"], w["status"]) for w in doc["workers"]] == [
        ("w1", "model.layers.1-1", "ready")]
    assert sorted(doc["layer_details"]) == ["model.layers.0", "model.layers.1"]
    assert_same_audio(speech(master), speech(single))
    # Guidance off: one branch, one cache slot, the same ring.
    assert_same_audio(speech(master, cfg_scale=1.0), speech(single, cfg_scale=1.0))


def test_streamed_speech_through_the_ring(cluster, single):
    master, _ = cluster
    with httpx.stream("POST", master.url + "/v1/audio/speech",
                      json={**REQUEST, "stream": True}, timeout=300) as r:
        assert r.status_code == 200
        body = b"".join(r.iter_bytes())
    assert_same_audio(np.frombuffer(body, dtype="<f4"), speech(single))


def test_worker_killed_speech_goes_on(cluster, single):
    master, workers = cluster
    reference = speech(single, max_frames=8)
    assert_same_audio(speech(master, max_frames=8), reference)
    workers[0].stop()
    # The master finds the worker gone, takes its layers back, and synthesizes all the same.
    assert_same_audio(speech(master, max_frames=8), reference)
    doc = httpx.get(master.url + "/api/v1/topology", timeout=30).json()
    assert doc["master"]["layer_range"] == "model.layers.0-1"
    assert [(w["name"], w["status"]) for w in doc["workers"]] == [("w1", "lost")]
    assert any(e["event"] == "recovered" for e in doc["events"])
