"""/health's loading fraction: the loader announces the bytes it will read and ticks each
tensor off, so the fraction rises from 0 towards 1 while a stage loads, and is gone after."""
from cake import loading
from cake.text.gguf_weights import GGUFCheckpoint
from cake.text.loader import load_stage
from cake.text.weights import SafetensorsCheckpoint
from conftest import default_gguf, write_tiny_model


def watched(cls, *args):
    """The real checkpoint class, noting the progress each time a tensor is read."""
    seen = []

    class Watched(cls):
        def get(self, name):
            seen.append(loading.progress())
            return super().get(name)

        def raw(self, name):
            found = super().raw(name)
            if found is not None and loading.progress():
                seen.append(loading.progress())
            return found

    return Watched(*args), seen


def check(ckpt, seen, **kw) -> dict:
    model = load_stage(ckpt, **kw)
    fractions = [p["fraction"] for p in seen]
    assert fractions[0] == 0.0 and fractions == sorted(fractions) and fractions[-1] > 0.5
    assert all(p["phase"] == "loading weights" for p in seen)
    assert loading.progress() == {}  # done: no stale figures for the next reader
    info = ckpt.tensor_info()
    needed = set(model.tensor_names())
    assert seen[-1]["bytes_total"] == sum(info[n].n_bytes for n in needed)
    return info


def test_safetensors_load_reports_bytes(tmp_path):
    folder = write_tiny_model(tmp_path / "m", "llama", vocab_size=256)
    ckpt, seen = watched(SafetensorsCheckpoint, folder)
    check(ckpt, seen)


def test_gguf_quantized_load_reports_bytes(monkeypatch):
    monkeypatch.setenv("CAKE_NO_REPACK_CACHE", "1")  # read the blocks, not a cache
    ckpt, seen = watched(GGUFCheckpoint, default_gguf())
    check(ckpt, seen, start=0, end=2, quant_mode="auto")
