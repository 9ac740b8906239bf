"""What every served speech model must do on /v1/audio/speech, as a client sees it: streamed
audio arrives frame by frame, and a client that leaves frees the worker for the next one."""
from __future__ import annotations

import struct
import threading

import httpx


def speak(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/audio/speech", json=body, timeout=120)


def assert_streams_frame_by_frame(server, frames: int, hop: int, **body) -> None:
    """A streamed PCM answer is `frames` frames of float32 samples; a streamed WAV is a 24 kHz
    header of unknown length (0xFFFFFFFF) and then the frames as 16-bit samples."""
    body = {"input": "Stream me.", "max_frames": frames, "stream": True, **body}
    with httpx.stream("POST", server.url + "/v1/audio/speech", timeout=120,
                      json={**body, "response_format": "pcm"}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
        pcm = b"".join(r.iter_bytes())
    assert len(pcm) == frames * hop * 4
    with httpx.stream("POST", server.url + "/v1/audio/speech", timeout=120, json=body) as r:
        wav = b"".join(r.iter_bytes())
    assert struct.unpack("<4sI", wav[:8]) == (b"RIFF", 0xFFFFFFFF)
    assert struct.unpack("<I", wav[24:28]) == (24000,)
    assert len(wav) - 44 == frames * hop * 2


def assert_leaving_client_frees_the_worker(server, hop: int, **body) -> None:
    """A synthesis of 8000 frames (many minutes here) streams; while it runs the server answers
    /health and /v1/models; its client reads three frames and leaves; the next request is
    served within a minute, so the abandoned synthesis stopped (it would otherwise hold the
    worker for the whole synthesis)."""
    received = []
    with httpx.stream("POST", server.url + "/v1/audio/speech", timeout=120,
                      json={"input": "A long one.", "max_frames": 8000, "stream": True,
                            "response_format": "pcm", **body}) as r:
        assert r.status_code == 200
        chunks = r.iter_bytes()
        while sum(map(len, received)) < 3 * hop * 4:  # frames are arriving: it is running
            received.append(next(chunks))
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200
        received.append(next(chunks))  # and it is still producing
    done, result = threading.Event(), {}

    def follow_up():
        result["r"] = speak(server, input="Next please.", max_frames=2, response_format="pcm")
        done.set()

    threading.Thread(target=follow_up, daemon=True).start()
    assert done.wait(timeout=60), "the abandoned synthesis kept the worker busy"
    assert result["r"].status_code == 200 and len(result["r"].content) == 2 * hop * 4
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
