"""The data plane's seal: what crosses the wire between stages is unreadable and unforgeable
without the cluster key (transport.Sealer), on real TCP links between two processes."""
from __future__ import annotations

import datetime
import os
import socket
import struct
import threading
import time

import pytest
import torch

from conftest import two_ranks

pytest.importorskip("cryptography")

MARK = 0x5EC12E7C0DE5EC12  # a token id no tokenizer has: easy to find in a capture
SECRET = b"s" * 32


def _peer(rank: int, port: int, secret, tamper: str, out) -> None:
    """rank 0 sends three steps of token ids to rank 1, which reports what it got."""
    import torch.distributed as dist

    from cake.cluster import transport
    from cake.text.kv_cache import StepBatch

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    group = transport.Group(rank, 2, "ab" * 16, "127.0.0.1", 60, secret=secret, store=store)
    link = transport.Link(group, 8, torch.float32, "cpu")
    if rank == 0:
        sent = []
        real = group.write

        def write(dst, data):  # what a forwarding attacker could do to the bytes
            if tamper == "flip" and len(sent) == 1:
                data = bytearray(data)
                data[40] ^= 1
            if tamper == "replay" and len(sent) == 2:
                data = sent[0]
            sent.append(data)
            return real(dst, data)

        group.write = write
        tokens = torch.full((1, 4), MARK, dtype=torch.long)
        for i in range(3):
            # the last step reads through a block table, with blocks to copy first
            table = [5, 9, 2] if i == 2 else 0
            batch = StepBatch.make([list(range(4 * i, 4 * i + 4))], [table], "cpu")
            batch.copies = [(5, 7), (1, 3)] if i == 2 else []
            for w, _ in link.send(1, tokens + i, batch):
                w.wait()
        time.sleep(1)
        return
    got = []
    try:
        for _ in range(3):
            _, x, batch = link.recv(0)
            got.append((x.tolist(), batch.positions.tolist(), batch.slots.tolist(),
                        batch.copies))
    except transport.FrameRejected as e:
        got.append(f"rejected: {e}")
    out.put(got)


def exchange(secret, tamper: str = "") -> list:
    return two_ranks(_peer, secret, tamper)[0]


def test_sealed_steps_arrive_intact():
    got = exchange(SECRET)
    assert [g[0] for g in got] == [[[MARK + i] * 4] for i in range(3)]
    assert [g[1] for g in got] == [[list(range(4 * i, 4 * i + 4))] for i in range(3)]
    assert [g[2:] for g in got] == [([0], []), ([0], []), ([[5, 9, 2]], [(5, 7), (1, 3)])]


@pytest.mark.parametrize("tamper", ["flip", "replay"])
def test_an_altered_or_replayed_frame_is_rejected(tamper):
    got = exchange(SECRET, tamper)
    first = 1 if tamper == "flip" else 2  # the frames before the tampered one open
    assert [g[0] for g in got[:first]] == [[[MARK + i] * 4] for i in range(first)]
    assert got[first].startswith("rejected: a message failed authentication")
    assert len(got) == first + 1


class Capture:
    """Every byte that crosses an interface meanwhile (a raw packet socket)."""

    def __init__(self, interface: str = "lo"):
        self.interface = interface

    def __enter__(self):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
        self.sock.bind((self.interface, 0))
        self.sock.settimeout(0.2)
        self.data, self.stop = bytearray(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            try:
                self.data += self.sock.recv(1 << 16)
            except socket.timeout:
                pass

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join(5)
        self.sock.close()


def test_no_token_id_crosses_the_wire_in_the_clear():
    if os.geteuid() != 0:
        pytest.skip("a packet capture needs root")
    needle = struct.pack("<q", MARK)
    with Capture() as plain:
        exchange(None)
    assert needle in plain.data  # the capture sees plaintext when there is some
    with Capture() as sealed:
        assert exchange(SECRET)[0][0] == [[MARK] * 4]
    assert needle not in sealed.data
