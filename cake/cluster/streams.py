"""The ring's CPU links: one TCP connection per pair of ranks, read and written by the thread
that needs the data.

gloo's TCP transport, which these replace, sends a message only once the receiver has posted
its receive (a "ready" notice back over the wire), and does its I/O in a thread of its own:
on a stage with one core, that thread competes with the model for the core between kernels,
and every step pays the notices and two thread hand-offs per message. A stream has neither:
a send is a write into the kernel's buffer, a receive a read in the caller's thread.

A write that does not fit the kernel's buffer (a prefill chunk of some MBs) is finished by a
helper thread, so that two peers sending each other big steps at once never both block:
each goes on to read. Closing a stream wakes any thread blocked on it with an error, so an
abandoned ring lets go of its peers at once.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import select
import socket
import struct
import threading
import time
from typing import Callable, Optional

PREFIX = struct.Struct("<2q")  # a message's prefix: (bytes that follow, 0)
HELLO = struct.Struct("<q32s")  # the connecting rank and its proof of the link key
HELLO_TIMEOUT_S = 5.0


def hello_mac(key: bytes, src: int, dst: int) -> bytes:
    return hmac.new(key, f"cake/hello/{src}->{dst}".encode(), hashlib.sha256).digest()


class Sent:
    """A write still in progress (finished by the stream's helper thread)."""

    def __init__(self):
        self.done = threading.Event()
        self.error: Optional[BaseException] = None

    def poll(self, timeout: float) -> bool:
        if not self.done.wait(timeout):
            return False
        if self.error is not None:
            raise self.error
        return True

    def wait(self) -> None:
        while not self.poll(3600):
            pass


class Written:
    """A write the kernel took at once."""

    def poll(self, timeout: float) -> bool:
        return True

    def wait(self) -> None:
        pass


WRITTEN = Written()


class Message:
    """The receive of a peer's next message: a prefix, then as many bytes as it says. Reads
    happen when waited on; wait() blocks, poll(timeout) gives up after timeout seconds (and
    takes up where it left off next time). buf: the whole message, prefix included."""

    def __init__(self, stream: "Stream", max_bytes: int):
        self.stream, self.max_bytes = stream, max_bytes
        self.buf = bytearray(PREFIX.size)
        self.got = 0
        self.complete = False

    def _read(self, block: bool) -> bool:
        sock = self.stream.sock
        flags = 0 if block else socket.MSG_DONTWAIT
        while not self.complete:
            view = memoryview(self.buf)[self.got:]
            try:
                n = sock.recv_into(view, len(view), flags)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                raise ConnectionError(f"the link to rank {self.stream.peer} broke: {e}") from e
            if n == 0:
                raise ConnectionError(f"rank {self.stream.peer} closed the link")
            self.got += n
            if self.got == len(self.buf):
                if len(self.buf) == PREFIX.size:
                    size, _ = PREFIX.unpack(self.buf)
                    if not 0 < size <= self.max_bytes:
                        raise ValueError(f"a message from rank {self.stream.peer} claims "
                                         f"{size} bytes")
                    whole = bytearray(PREFIX.size + size)  # new: views hold the old
                    whole[:PREFIX.size] = self.buf
                    self.buf = whole
                else:
                    self.complete = True
        return True

    def poll(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._read(block=False):
            left = deadline - time.monotonic()
            try:
                ready = left > 0 and select.select([self.stream.sock], [], [], left)[0]
            except (OSError, ValueError) as e:  # closed meanwhile
                raise ConnectionError(f"the link to rank {self.stream.peer} closed") from e
            if not ready:
                return False
        return True

    def wait(self) -> None:
        self._read(block=True)


class Stream:
    """The connection to one peer rank."""

    def __init__(self, sock: socket.socket, peer: int):
        self.sock, self.peer = sock, peer
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # an idle ring is fine for ever; a peer machine that vanished without a reset is
        # noticed in about 90 s (a stage loop then ends instead of waiting for good)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        self.lock = threading.Condition()
        self.backlog: collections.deque = collections.deque()  # (bytes left, Sent)
        self.helper: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.closed = False

    def send(self, data) -> object:
        """Write data (bytes) after what was sent before; returns what to wait on."""
        with self.lock:
            if self.error is not None:
                raise self.error
            if not self.backlog:
                try:
                    n = self.sock.send(data, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as e:
                    raise ConnectionError(f"the link to rank {self.peer} broke: {e}") from e
                if n == len(data):
                    return WRITTEN
                data = memoryview(data)[n:]
            sent = Sent()
            self.backlog.append((data, sent))
            if self.helper is None:
                self.helper = threading.Thread(target=self._drain, daemon=True,
                                               name=f"cake-stream-{self.peer}")
                self.helper.start()
            self.lock.notify()
            return sent

    def _drain(self) -> None:
        while True:
            with self.lock:
                while not self.backlog and not self.closed:
                    self.lock.wait()
                if self.closed and not self.backlog:
                    return
                data, sent = self.backlog[0]  # stays queued while written: order is kept
            try:
                self.sock.sendall(data)
            except OSError as e:
                with self.lock:
                    self.error = ConnectionError(f"the link to rank {self.peer} broke: {e}")
                    for _, s in self.backlog:
                        s.error = self.error
                        s.done.set()
                    self.backlog.clear()
                return
            with self.lock:
                self.backlog.popleft()
            sent.done.set()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed during the hello")
        data += chunk
    return data


def connect_all(rank: int, world: int, local_ip: str, store, key_of: Callable[[int, int], bytes],
                timeout_s: float) -> dict[int, Stream]:
    """A stream to every other rank: each rank listens on local_ip, publishes its address in
    the store, connects to every lower rank and accepts every higher one. A connection proves
    it comes from a holder of the link key (key_of(src, dst): that direction's key) before it
    counts; others are dropped, so nobody can take a rank's place."""
    listener = socket.create_server((local_ip, 0))
    listener.settimeout(timeout_s)
    store.set(f"cake-stream-{rank}", f"{local_ip}:{listener.getsockname()[1]}")
    streams: dict[int, Stream] = {}
    try:
        for peer in range(rank):
            host, port = store.get(f"cake-stream-{peer}").decode().rsplit(":", 1)
            sock = socket.create_connection((host, int(port)), timeout=timeout_s)
            sock.sendall(HELLO.pack(rank, hello_mac(key_of(rank, peer), rank, peer)))
            streams[peer] = Stream(sock, peer)
        deadline = time.monotonic() + timeout_s
        while len(streams) < world - 1:
            listener.settimeout(max(0.1, deadline - time.monotonic()))
            sock, _ = listener.accept()
            sock.settimeout(HELLO_TIMEOUT_S)  # one that says nothing holds up no one for long
            try:
                peer, mac = HELLO.unpack(_read_exactly(sock, HELLO.size))
                ok = rank < peer < world and peer not in streams and hmac.compare_digest(
                    mac, hello_mac(key_of(peer, rank), peer, rank))
            except (OSError, ConnectionError):
                ok = False
            if not ok:
                sock.close()
                continue
            streams[peer] = Stream(sock, peer)
    except BaseException:
        for s in streams.values():
            s.close()
        raise
    finally:
        listener.close()
    return streams
