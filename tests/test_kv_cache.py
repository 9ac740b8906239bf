"""The KV cache grows with the sequences it holds and keeps what it held."""
import pytest
import torch

from cake.text.kv_cache import KVCache, StepBatch


def test_growth_keeps_contents_and_stops_at_context():
    cache = KVCache(range(1), num_slots=2, max_len=20, n_kv_heads=1, head_dim=2,
                    dtype=torch.float32, device="cpu", initial_len=4)
    written = torch.arange(2 * 13, dtype=torch.float32).view(1, 13, 1, 2)
    cache.update(0, StepBatch.make([list(range(3))], [1], "cpu"), written[:, :3], written[:, :3])
    assert cache.k[0].shape[1] == 4
    # A batched step past the capacity doubles it (at least to what the step needs).
    k, _ = cache.update(0, StepBatch.make([list(range(3, 13)), list(range(10))], [1, 0], "cpu"),
                        torch.cat([written[:, 3:], written[:, :10]]),
                        torch.cat([written[:, 3:], written[:, :10]]))
    assert cache.k[0].shape[1] == 13
    assert torch.equal(k[0], written[0])  # slot 1 holds positions 0..12 in order
    cache.update(0, StepBatch.make([[13]], [1], "cpu"), written[:, :1], written[:, :1])
    assert cache.k[0].shape[1] == 20  # doubling is capped by the context
    with pytest.raises(ValueError, match="context"):
        cache.update(0, StepBatch.make([[20]], [1], "cpu"), written[:, :1], written[:, :1])
