"""Steps in flight and a full KV pool: when several sequences' steps are out at once (as on a
cluster's ring) and the pool runs dry, no sequence whose step is still out gives up its blocks
(that step still writes them), and every text is what the sequence writes alone.

In process, on a tiny random model: the local pipeline computes a submitted step at once, but
the engine treats it as in flight until it collects it, exactly as it does on a ring."""
from __future__ import annotations

import threading

from conftest import write_tiny_model

from cake.text.sampling import SamplingParams
from cake.text.serving import load_text_model

NEW = 120


def generate(engine, prompts: list[list[int]]) -> list[str]:
    texts, done = [[] for _ in prompts], [threading.Event() for _ in prompts]

    def on_output(i):
        def take(out):
            texts[i].append(out.text)
            if out.finished:
                done[i].set()
        return take

    for i, prompt in enumerate(prompts):
        engine.submit(prompt, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True),
                      on_output(i))
    assert all(d.wait(300) for d in done)
    return ["".join(t) for t in texts]


def test_no_sequence_with_a_step_in_flight_is_preempted(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny", "llama")
    # 16 blocks of 16 positions (256 bytes a position: 2 layers of 2 heads of 16 in 16 bits);
    # three sequences of 20 + 120 positions need 27
    model = load_text_model(folder, "tiny", device="cpu", max_batch=3, context_length=256,
                            kv_memory=16 * 16 * 256, draft_tokens=0)
    engine = model.engine
    try:
        assert engine.pipeline.num_blocks == 16
        prompts = [[1000 + 37 * i + j for j in range(20)] for i in range(3)]
        alone = [generate(engine, [p])[0] for p in prompts]
        assert engine.stats()["preemptions"] == 0

        engine.pipeline.depth = 2  # two groups of steps in flight, as on a ring
        wrongly = []
        preempt = engine._preempt

        def checked(seq):
            if any(seq is s for group, *_ in engine._in_flight for s in group):
                wrongly.append(seq.id)
            preempt(seq)

        engine._preempt = checked
        together = generate(engine, prompts)
        assert engine.stats()["preemptions"] > 0
        assert wrongly == []
        assert together == alone
    finally:
        engine.shutdown()
