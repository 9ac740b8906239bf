"""Where our CPU kernels cannot be had (no compiler, not x86; CAKE_NO_KERNELS=1 stands in for
both): quantized weights stay at 8 bits or fewer in torch's int4/int8 layouts (quant_torch),
checked against the gguf package's dequantize, and the default model still answers."""
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from cake.text.quant_torch import TorchQuantLinear
from tests.conftest import default_gguf


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0], ids=lambda q: q.name)
def test_products_match_dequantized_blocks(qtype):
    """int4 (Q4_0, Q4_1: the blocks' own integers) or int8 (others, requantized per row). A
    weight moves by its scale's and zero point's rounding to bfloat16 (2^-9 relative each, at
    most 2^-7 of its row's largest magnitude together) plus, for int8, half a step of
    amax(row) / 127; activations are rounded to bfloat16 (2^-9 relative)."""
    rng = np.random.default_rng(0)
    N, K = 48, 256
    blocks = quantize(rng.standard_normal((N, K), dtype=np.float32), qtype)
    w = torch.from_numpy(dequantize(blocks, qtype).reshape(N, K)).double()
    bias = torch.randn(N)
    layer = TorchQuantLinear(blocks, qtype, K, bias)
    assert layer.int4 == (qtype in (Q.Q4_0, Q.Q4_1))
    assert layer.nbytes() * 8 <= 8.5 * N * K + 64 * N  # 8 bits a weight or fewer, not 32
    x = torch.randn(5, K).double()
    got = layer(x.float()).double() - bias.double()
    amax = w.abs().amax(1)
    step = torch.zeros(N, dtype=torch.float64) if layer.int4 else amax / 254
    per_weight = 2 ** -7 * amax + step  # [N]
    bound = x.abs().sum(1, keepdim=True) * per_weight + 2 ** -8 * (x.abs() @ w.abs().T)
    assert ((got - x @ w.T).abs() <= bound).all()
    if not layer.int4:  # an embedding's rows
        ids = torch.tensor([0, 7, 47])
        assert ((layer.rows(ids).double() - w[ids]).abs() <= per_weight[ids, None]).all()


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_default_model_answers_without_kernels(start_server):
    """`cake serve` with no kernels: one warning line says so, the default model's greedy
    answer is Paris, and the process never held a float copy of the weights (135M values:
    540 MB in float32, against ~90 MB of 4- and 8-bit ones)."""
    from openai import OpenAI

    server = start_server("--max-batch", "2", env={"CAKE_NO_KERNELS": "1"}, timeout=300)
    client = OpenAI(base_url=server.url + "/v1", api_key="x")
    reply = client.chat.completions.create(
        model="default", temperature=0, max_tokens=12,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].message.content.startswith("The capital of France is Paris.")
    warnings = [line for line in server.output().splitlines() if "CPU kernels unavailable" in line]
    assert len(warnings) == 1 and "int4/int8" in warnings[0], warnings
    assert vm_hwm_mib(server.proc.pid) < 900, vm_hwm_mib(server.proc.pid)
    assert default_gguf().stat().st_size < 100e6  # the bound above assumes this model


def test_default_model_weights_stay_small(monkeypatch):
    """In process: every matrix of the default model in torch's int4/int8 layouts, holding
    about what the GGUF holds."""
    from cake.text import kernels, loader
    from cake.text.gguf_weights import GGUFCheckpoint

    monkeypatch.setattr(kernels, "_ops", None)
    monkeypatch.setattr(kernels, "_tried", True)
    monkeypatch.setattr(kernels, "_error", "disabled for this test")
    model = loader.load_stage(GGUFCheckpoint(default_gguf()), quant_mode="auto")
    mats = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, TorchQuantLinear))]
    assert mats and all(isinstance(m, TorchQuantLinear) for m in mats)
    assert any(m.int4 for m in mats)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert held <= 1.1 * default_gguf().stat().st_size
