"""Frames on the ring: decode steps whose rows come and go (a draft adds rows to a step, the
next has none) travel as one message each once the link has seen the bigger size, so a
guessed step costs no extra round trip; over a real sealed gloo link between two processes
(gloo's and NCCL's links want frames; CPU stages use TCP streams, which need none).
And every payload type and batch form reads back as it was sent."""
from __future__ import annotations

import datetime

import pytest
import torch

from conftest import two_ranks

ROWS = [1, 4, 1, 4, 2, 1, 4, 1]  # rows of each decode step: a plain step, one with a draft...


def _peer(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from cake.cluster import transport
    from cake.text.kv_cache import StepBatch

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    group = transport.Group(rank, 2, "ef" * 16, "127.0.0.1", 60, backend="gloo",
                            secret=b"f" * 32, store=store)
    link = transport.Link(group, 64, torch.float32, "cpu")
    if rank == 0:
        messages = []  # per step
        for i, rows in enumerate(ROWS):
            hidden = torch.full((rows, 1, 64), float(i))
            batch = StepBatch.make([[10 + i + j] for j in range(rows)], [[3, 7]] * rows, "cpu")
            works = link.send(1, hidden, batch)
            messages.append(len(works))
            for w, _ in works:
                w.wait()
        out.put(messages)
        return
    got = []
    for _ in ROWS:
        _, x, batch = link.recv(0)
        got.append((x.shape[0], float(x[0, 0, 0]), batch.positions[:, 0].tolist()))
    out.put(got)


def test_a_step_with_a_draft_after_one_without_is_one_message():
    first, second = two_ranks(_peer, answers=2)
    messages, got = (first, second) if isinstance(first[0], int) else (second, first)
    assert got == [(rows, float(i), list(range(10 + i, 10 + i + rows)))
                   for i, rows in enumerate(ROWS)]
    # Two steps outgrow the frame agreed before them, their rest a second message: the first
    # (the link opens with a frame for one row without a block table) and the first 4-row one.
    assert messages == [2, 2] + [1] * (len(ROWS) - 2)


class _Plain:
    """What a Link asks of its group to build and read messages (no network: the framing
    alone, in plaintext; the sealed path runs over gloo above and in test_cluster_security)."""
    rank, backend, secret = 0, "gloo", None

    def sealer(self, src, dst):
        from cake.cluster import transport

        return transport.Sealer(None)


def test_every_payload_and_batch_form_reads_back_as_sent():
    from cake.cluster import transport
    from cake.text.kv_cache import StepBatch

    link = transport.Link(_Plain(), 8, torch.float32, "cpu")
    batches = [lambda: StepBatch.make([[5, 6, 7]], [3], "cpu"),  # one span
               lambda: StepBatch.make([[5], [9]], [1, 4], "cpu"),  # a slot per row
               lambda: StepBatch.make([[5], [9]], [[1, 2], [3, 4, 6]], "cpu")]  # block tables
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.long):
        for make in batches:
            batch = make()
            batch.copies = [(1, 2), (3, 4)]
            B, T = batch.positions.shape
            x = torch.arange(B * T).view(B, T) if dtype == torch.long \
                else torch.randn(B, T, 8).to(dtype)
            message = bytearray(link._message(transport.OP_FORWARD, x, batch))
            op, got, back = link._parse(message, 0)
            assert op == transport.OP_FORWARD and got.dtype == dtype and torch.equal(got, x)
            assert torch.equal(back.positions, batch.positions)
            assert torch.equal(back.slots, batch.slots)
            assert (back.kv_len, back.span, back.copies) == (batch.kv_len, batch.span,
                                                            batch.copies)
    message = bytearray(link._message(transport.OP_RELEASE, torch.tensor([3, 5]), None))
    op, slots, _ = link._parse(message, 0)
    assert op == transport.OP_RELEASE and slots.tolist() == [3, 5]
    with pytest.raises(transport.FrameRejected):  # a payload shorter than its header says
        link._parse(bytearray(link._message(transport.OP_FORWARD, torch.randn(1, 1, 8),
                                            batches[0]()))[:-4], 0)
