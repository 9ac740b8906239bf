"""/health's loading fraction: the loader announces the bytes it will read and ticks each
tensor off, so the fraction rises from 0 to 1 while a stage loads."""
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
            seen.append(loading.progress()["fraction"])
            return super().get(name)

        def raw(self, name):
            found = super().raw(name)
            if found is not None:
                seen.append(loading.progress()["fraction"])
            return found

    return Watched(*args), seen


def check(ckpt, seen, **kw):
    load_stage(ckpt, **kw)
    done = loading.progress()
    assert done["fraction"] == 1.0 and done["bytes_loaded"] == done["bytes_total"] > 0
    assert seen[0] == 0.0 and seen == sorted(seen) and 0 < seen[len(seen) // 2] < 1


def test_safetensors_load_reports_bytes(tmp_path):
    folder = write_tiny_model(tmp_path / "m", "llama", vocab_size=256)
    ckpt, seen = watched(SafetensorsCheckpoint, folder)
    check(ckpt, seen)
    info = ckpt.tensor_info()
    assert loading.progress()["bytes_total"] == sum(i.n_bytes for i in info.values())


def test_gguf_quantized_load_reports_bytes(monkeypatch):
    monkeypatch.setenv("CAKE_NO_REPACK_CACHE", "1")  # read the blocks, not a cache
    ckpt, seen = watched(GGUFCheckpoint, default_gguf())
    check(ckpt, seen, start=0, end=2, quant_mode="auto")
