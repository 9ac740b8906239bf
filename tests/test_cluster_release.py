"""Release messages on the ring: a finished sequence's slots reach the worker stages (which
free what they keep beside the KV cache, Qwen3.5's DeltaNet state) between steps, over a
real sealed TCP link between two processes, without upsetting the steps that follow."""
from __future__ import annotations

import datetime

import torch

from conftest import two_ranks

SECRET = b"r" * 32


def _peer(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from cake.cluster import transport
    from cake.text.kv_cache import StepBatch

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    group = transport.Group(rank, 2, "cd" * 16, "127.0.0.1", 60, secret=SECRET, store=store)
    link = transport.Link(group, 8, torch.float32, "cpu")
    if rank == 0:
        hidden = torch.arange(16, dtype=torch.float32).view(1, 2, 8)
        sends = [lambda: link.send(1, hidden, StepBatch.make([[0, 1]], [4], "cpu")),
                 lambda: link.send_release(1, [3, 5]),
                 lambda: link.send(1, hidden[:, :1] + 1, StepBatch.make([[2]], [4], "cpu")),
                 lambda: link.send_release(1, list(range(40))),  # bigger than a frame
                 lambda: link.send_stop(1)]
        for send in sends:
            for w, _ in send():
                w.wait()
        out.put(link.recv(1)[0])  # rank 1's acknowledgement: everything was read
        return
    got = []
    while True:
        op, x, batch = link.recv(0)
        got.append((op, None if x is None else x.tolist(),
                    None if batch is None else batch.positions.tolist()))
        if op == transport.OP_STOP:
            break
    out.put(got)
    for w, _ in link.send_stop(0):
        w.wait()


def test_release_reaches_the_stage_between_steps():
    from cake.cluster import transport

    first, second = two_ranks(_peer, answers=2)
    got = first if isinstance(first, list) else second
    hidden = torch.arange(16, dtype=torch.float32).view(1, 2, 8)
    assert got == [(transport.OP_FORWARD, hidden.tolist(), [[0, 1]]),
                   (transport.OP_RELEASE, [3, 5], None),
                   (transport.OP_FORWARD, (hidden[:, :1] + 1).tolist(), [[2]]),
                   (transport.OP_RELEASE, list(range(40)), None),
                   (transport.OP_STOP, None, None)]
