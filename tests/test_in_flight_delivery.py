"""On a cluster's ring the master hands a step's text to its clients only once the next step
is out (waking the server's event loop then costs nothing: the master waits anyway). Every
text still arrives whole and in order, and a request's end is never held back when nothing
else runs.

In process, on a tiny random model, with the engine's in-flight path (as on a ring)."""
from __future__ import annotations

import threading

from conftest import write_tiny_model

from cake.text.sampling import SamplingParams
from cake.text.serving import load_text_model


def generate(engine, prompts, events, **params):
    texts, done = [[] for _ in prompts], [threading.Event() for _ in prompts]

    def on_output(i):
        def take(out):
            events.append(("out", i, out.finished))
            texts[i].append(out.text)
            if out.finished:
                done[i].set()
        return take

    with engine._wake:  # all queued before the engine looks: they start together
        for i, prompt in enumerate(prompts):
            engine.submit(prompt, SamplingParams(temperature=0, **params), on_output(i))
    assert all(d.wait(120) for d in done), "a request's end was held back"
    return ["".join(t) for t in texts]


def test_text_is_delivered_while_the_next_step_is_out(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny", "llama")
    model = load_text_model(folder, "tiny", device="cpu", max_batch=4, context_length=256,
                            draft_tokens=0)
    engine, pipeline = model.engine, model.engine.pipeline
    try:
        prompts = [[1000 + 37 * i + j for j in range(12)] for i in range(3)]
        lengths = dict(max_tokens=40, ignore_eos=True)
        alone = [generate(engine, [p], [], **lengths)[0] for p in prompts]

        events = []
        submit, collect, forward = pipeline.submit, pipeline.collect, pipeline.forward

        def submitted(*args):
            events.append(("submit",))
            return submit(*args)

        def collected(handle):
            events.append(("collect",))
            return collect(handle)

        def prefilled(*args):  # a prompt's first token comes straight from its prefill
            events.append(("forward",))
            return forward(*args)

        pipeline.depth = 2  # the in-flight path a ring takes
        pipeline.submit, pipeline.collect, pipeline.forward = submitted, collected, prefilled
        one = generate(engine, prompts[:1], events, **lengths)
        together = generate(engine, prompts, events, **lengths)
        assert one == alone[:1] and together == alone

        # a text that does not end the request comes after a step went out, not right after
        # the collect that produced it
        last, early = None, 0
        for event in events:
            if event[0] == "out" and not event[2] and last == "collect":
                early += 1
            elif event[0] != "out":
                last = event[0]
        assert early == 0
        assert sum(e[0] == "out" and not e[2] for e in events) > 100

        # a stop string ends a request held on this path too, with the text before it
        stop = alone[0][5:9]
        stopped = generate(engine, prompts[:1], [], max_tokens=40, stop=[stop])[0]
        assert stopped == alone[0][:alone[0].index(stop)]
    finally:
        engine.shutdown()
