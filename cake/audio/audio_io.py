"""Audio in and out: reading a voice sample of any rate and channel count, and writing
16-bit PCM WAV or raw float32 little-endian samples."""
from __future__ import annotations

import io
import struct
import wave

import numpy as np


class AudioError(ValueError):
    pass


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Any file libsndfile reads (WAV of any sample format, FLAC, OGG, ...) -> mono float32
    samples and their rate."""
    import soundfile

    if not data:
        raise AudioError("the audio is empty")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's reason follows the file's repr: keep the reason
        reason = str(e).rpartition(": ")[2].rstrip(".") or type(e).__name__
        raise AudioError(f"not a readable audio file ({reason})") from None
    if samples.shape[0] == 0:
        raise AudioError("the audio has no samples")
    return samples.mean(axis=1), int(rate)


API_RATE = 24000  # SPEC-API: every voice's WAV and PCM at 24 kHz


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return samples
    import soxr

    return soxr.resample(samples, rate, target).astype(np.float32)


def to_int16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def to_f32le(samples: np.ndarray) -> bytes:
    return np.asarray(samples, dtype="<f4").tobytes()


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """A complete mono 16-bit PCM WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(to_int16(samples))
    return out.getvalue()


def streaming_wav_header(rate: int) -> bytes:
    """The header of a mono 16-bit WAV whose length is not known yet: the sizes are set to
    0xFFFFFFFF, as ffmpeg and OpenAI do for streamed WAV."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


def resampled(chunks, rate: int, target: int = API_RATE):
    """A stream of float32 chunks at rate, as chunks at target: one resampler over the whole
    stream, so chunk edges leave no seams. Clipped to [-1, 1]: a sentence normalised to full
    scale (as Piper makes them) overshoots it once resampled."""
    if rate == target:
        yield from chunks
        return
    import soxr

    stream = soxr.ResampleStream(rate, target, 1, dtype="float32")
    for chunk in chunks:
        out = stream.resample_chunk(np.asarray(chunk, dtype=np.float32))
        if len(out):
            yield np.clip(out, -1.0, 1.0)
    tail = stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
    if len(tail):
        yield np.clip(tail, -1.0, 1.0)
