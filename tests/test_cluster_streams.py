"""The ring's TCP streams (cake.cluster.streams) on real sockets: two ranks that send each
other steps bigger than the kernel's buffers at once both get through (neither blocks the
other); closing a ring wakes a receive blocked on it; a connection without the link key
cannot take a rank's place; a receive polled with a timeout picks up where it left off."""
from __future__ import annotations

import datetime
import socket
import threading
import time

import pytest

from cake.cluster import streams

KEY = b"k" * 32


def memory_store():
    """The rendezvous in memory (its get waits for the key), as separate processes share one."""
    import torch.distributed as dist

    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=30))
    return store


def ring(world: int = 2, store=None, key=lambda src, dst: KEY) -> list[dict]:
    """Every rank's streams, joined in threads as separate processes would."""
    store = store or memory_store()
    out: list = [None] * world

    def join(rank):
        out[rank] = streams.connect_all(rank, world, "127.0.0.1", store, key, 30)

    threads = [threading.Thread(target=join, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(out), "the ring did not form"
    return out


def message(n: int, fill: int) -> bytes:
    return streams.PREFIX.pack(n, 0) + bytes([fill]) * n


def test_two_ranks_sending_each_other_big_steps_at_once_both_get_through():
    a, b = ring()
    big = 32 << 20  # far beyond a socket's buffers
    sent_a = a[1].send(message(big, 1))
    sent_b = b[0].send(message(big, 2))  # both sides write before either reads
    assert not isinstance(sent_a, streams.Written)  # a helper thread finishes it
    got_b, got_a = streams.Message(b[0], 1 << 31), streams.Message(a[1], 1 << 31)
    got_b.wait()
    got_a.wait()
    sent_a.wait()
    sent_b.wait()
    assert got_b.buf == message(big, 1) and got_a.buf == message(big, 2)
    # small steps after big ones keep their order
    for i in range(5):
        a[1].send(message(100 + i, i))
    for i in range(5):
        m = streams.Message(b[0], 1 << 31)
        m.wait()
        assert m.buf == message(100 + i, i)


def test_a_poll_with_a_timeout_takes_up_where_it_left_off():
    a, b = ring()
    m = streams.Message(b[0], 1 << 20)
    assert not m.poll(0.05)  # nothing sent yet
    whole = message(1000, 7)
    a[1].sock.sendall(whole[:500])  # half a message
    assert not m.poll(0.2)
    a[1].sock.sendall(whole[500:])
    assert m.poll(5) and m.buf == whole


def test_closing_the_ring_wakes_a_blocked_receive():
    a, b = ring()
    errors = []

    def receive():
        try:
            streams.Message(b[0], 1 << 20).wait()
        except ConnectionError as e:
            errors.append(e)

    t = threading.Thread(target=receive)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # waiting for work
    a[1].close()  # the master drops the ring
    t.join(5)
    assert not t.is_alive() and errors
    with pytest.raises(ConnectionError):  # writes fail once the peer's reset is in
        for _ in range(20):
            b[0].send(message(10, 1)).wait()
            time.sleep(0.05)


def test_a_message_claiming_too_many_bytes_is_refused():
    a, b = ring()
    a[1].send(message(100, 1))
    with pytest.raises(ValueError):
        streams.Message(b[0], 50).wait()


def test_a_connection_without_the_link_key_cannot_take_a_ranks_place():
    store = memory_store()
    result: list = []

    def master():
        result.append(streams.connect_all(0, 2, "127.0.0.1", store, lambda s, d: KEY, 30))

    t = threading.Thread(target=master)
    t.start()
    host, port = store.get("cake-stream-0").decode().rsplit(":", 1)
    intruder = socket.create_connection((host, int(port)))
    intruder.sendall(streams.HELLO.pack(1, streams.hello_mac(b"x" * 32, 1, 0)))
    time.sleep(0.3)
    assert t.is_alive()  # still waiting for the real rank 1
    real = streams.connect_all(1, 2, "127.0.0.1", store, lambda s, d: KEY, 30)
    t.join(30)
    assert intruder.recv(16) == b""  # dropped
    real[0].send(message(10, 3))
    m = streams.Message(result[0][1], 1 << 20)
    m.wait()
    assert m.buf == message(10, 3)
