"""The data plane: one step's activations from stage to stage.

Ray is too slow per token (~3 ms a call). The master is rank 0; stages form chains
master -> W1 -> ... -> Wk -> master, results included. Between CPU stages (and a CPU stage
and a CUDA one) a step travels over a TCP stream per pair of ranks (cake.cluster.streams):
one write, one read in the caller's thread, no round trip of its own. Between CUDA stages it
goes over NCCL point-to-point; gloo is kept as the CPU alternative (CAKE_CPU_LINKS=gloo).

NCCL and gloo send a message only once the receiver has posted its receive, so a receive
posted after the previous message arrived costs a round trip per message. Over them each step
travels as one frame (header, batch index, payload in one buffer) of a size both ends agreed
on in the previous frame (the biggest of the recent decode steps, which grow and shrink with
the batch and its drafts), and the receiver posts the next frame's receive as soon as a frame
arrives, before it computes: the sender then never waits for it. A step bigger than the
agreed frame (a prefill chunk) sends its rest as a second message.

Every message is sealed with AES-256-GCM under a key per direction of each link, derived
from the cluster key and a fresh salt per group (see Sealer): nobody without the key can read
the prompts' tokens or hidden states off the wire, alter them, or replay them. The group's
rendezvous goes through Ray's key-value store, which the cluster token guards, so no
unauthenticated store listens either. NCCL (CUDA stages) is not sealed: use it between GPUs
of one machine or over links you trust.

Stages wait for work as long as the master lives; the master waits while it checks the
stages' heartbeats (see Waiter), abandoning the group when a stage is lost. A stream's wait
is polled in the caller's thread; a gloo or NCCL wait on a peer that hangs cannot be
cancelled (gloo's only timeout closes every pair), so those are waited on in a helper thread.
"""
from __future__ import annotations

import collections
import datetime
import os
import queue
import struct
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from cake.cluster import keys, streams
from cake.text.kv_cache import StepBatch

# On the wire: a prefix (int64: sealed bytes, the next frame's bytes (0 on a stream);
# authenticated as the seal's associated data), then the sealed message: a header (int64: op,
# rows, tokens per row, kv_len, span slot (-1: none), span first position, payload dtype, step
# number, block table width (0: one slot per row), blocks to copy), the batch's positions and
# slots (or block tables) unless it is one span, the (src, dst) blocks to copy first, and the
# payload.
# A release (OP_RELEASE) is the header with the count of its slots in the rows field, then
# those slots.
PREFIX_BYTES = 16
HEADER = 10
HEADER_BYTES = HEADER * 8
HEAD = struct.Struct(f"<{HEADER}q")
PREFIX = struct.Struct("<2q")
TAG_BYTES = 16  # AES-GCM's authentication tag
MAX_MESSAGE = 1 << 31
OP_FORWARD, OP_STOP, OP_RELEASE = 1, 2, 3
FRAME_TAG, REST_TAG = 0, 1
MAX_FRAME = 1 << 18  # steps up to 256 KiB (decode batches) travel in one message
# Decode steps vary in size (rows come and go, drafts add rows): a frame is sized for the
# biggest of the last FRAME_MEMORY decode steps to its peer, so that a step with a draft after
# one without still travels as one message (a second one costs a round trip; padding a few
# rows costs only their bytes).
FRAME_MEMORY = 32
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.long]
FOREVER = datetime.timedelta(days=365)
CPU_LINKS_ENV = "CAKE_CPU_LINKS"  # "tcp" (default) or "gloo"


def cpu_links() -> str:
    links = os.environ.get(CPU_LINKS_ENV, "tcp")
    if links not in ("tcp", "gloo"):
        raise ValueError(f"{CPU_LINKS_ENV} must be tcp or gloo, not {links!r}")
    return links


def interface_of(ip: str) -> Optional[str]:
    """The network interface that holds an address, for gloo's device: gloo otherwise
    resolves the hostname and may pick an address the peers cannot reach."""
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for a in adapter.ips:
            if a.is_IPv4 and a.ip == ip:
                return adapter.name
    return None


class FrameRejected(RuntimeError):
    """A message that fails to open: altered, replayed, reordered, or sealed with another key."""


class Sealer:
    """AES-256-GCM for one direction of a link. The nonce is the message's number on that
    direction, never sent: the receiver opens message n with nonce n, so a replayed, dropped,
    reordered or altered message fails to open. key None: plaintext (--cluster-insecure)."""

    def __init__(self, key: Optional[bytes]):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.aead = AESGCM(key) if key else None
        self.tag = TAG_BYTES if key else 0
        self.count = 0

    def _nonce(self) -> bytes:
        self.count += 1
        return self.count.to_bytes(12, "little")

    def seal(self, data: bytes, ad: bytes) -> bytes:
        if self.aead is None:
            return data
        return self.aead.encrypt(self._nonce(), data, ad)

    def open(self, data, ad: bytes):
        """data: the sealed bytes (any buffer); the message, a writable buffer."""
        if self.aead is None:
            return data
        from cryptography.exceptions import InvalidTag

        try:
            return bytearray(self.aead.decrypt(self._nonce(), data, ad))
        except InvalidTag as e:
            raise FrameRejected("a message failed authentication (altered, replayed, or not "
                                "from this cluster)") from e


class RayStore(dist.Store):
    """The group's rendezvous in Ray's key-value store (behind the cluster token), so that no
    unauthenticated TCPStore listens. Keys live in a namespace per group."""

    def __init__(self, namespace: str, timeout_s: float):
        super().__init__()
        self.namespace, self.timeout_s = namespace, timeout_s

    def _kv(self):
        from ray.experimental import internal_kv

        return internal_kv

    @staticmethod
    def _bytes(value) -> bytes:  # values come as str, bytes or lists of ints
        return value.encode() if isinstance(value, str) else bytes(value)

    def _get(self, key: str) -> Optional[bytes]:
        return self._kv()._internal_kv_get(key.encode(), namespace=self.namespace)

    def set(self, key: str, value) -> None:
        self._kv()._internal_kv_put(key.encode(), self._bytes(value), overwrite=True,
                                    namespace=self.namespace)

    def get(self, key: str) -> bytes:
        self.wait([key])
        return self._get(key)

    def check(self, keys: list) -> bool:
        kv = self._kv()
        return all(kv._internal_kv_exists(k.encode(), namespace=self.namespace) for k in keys)

    def wait(self, keys: list, timeout=None) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.check(keys):
            if time.monotonic() > deadline:
                raise RuntimeError(f"rendezvous timed out waiting for {keys}")
            time.sleep(0.01)

    def add(self, key: str, amount: int) -> int:
        # Not atomic across ranks: gloo's rendezvous only sets, gets and waits.
        value = int(self._get(key) or 0)
        self.set(key, str(value + amount))
        return value + amount

    def compare_set(self, key: str, expected, desired) -> bytes:
        current = self._get(key)
        if current == expected or (current is None and not expected):
            self.set(key, desired)
            return self._bytes(desired)
        return current

    def delete_key(self, key: str) -> bool:
        return bool(self._kv()._internal_kv_del(key.encode(), namespace=self.namespace))

    def num_keys(self) -> int:
        return len(self._kv()._internal_kv_list(b"", namespace=self.namespace))

    def set_timeout(self, timeout) -> None:
        self.timeout_s = timeout.total_seconds()


class Group:
    """The ring's links, an object of their own rather than torch's global default group:
    when a stage is lost the master drops them (with any wait still stuck on the lost peer)
    and builds new ones. name: 32 hex digits unique per group (the rendezvous' namespace, the
    keys' salt); backend: "tcp" (streams), "gloo" or "nccl"; secret: the cluster's link
    secret, None to send plaintext; store: the rendezvous (default: Ray's key-value store)."""

    def __init__(self, rank: int, world_size: int, name: str, local_ip: str,
                 join_timeout_s: float, backend: str = "tcp", secret: Optional[bytes] = None,
                 store: Optional[dist.Store] = None):
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.secret = secret if backend != "nccl" else None  # see the module doc
        self.salt = bytes.fromhex(name)
        # Joining may take a while on a busy machine.
        self.store = store or RayStore(f"cake-ring-{name}", max(join_timeout_s, 120))
        self.pg, self.streams = None, {}
        if backend == "tcp":
            self.streams = streams.connect_all(rank, world_size, local_ip, self.store,
                                               self._key, max(join_timeout_s, 120))
            return
        iface = interface_of(local_ip)
        if backend == "nccl":
            if iface:
                os.environ["NCCL_SOCKET_IFNAME"] = iface
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = FOREVER
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size, opts)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = FOREVER
            opts._devices = [dist.ProcessGroupGloo.create_device(interface=iface) if iface
                             else dist.ProcessGroupGloo.create_default_device()]
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, opts)

    def _key(self, src: int, dst: int) -> bytes:
        return keys.link_key(self.secret, self.salt, src, dst) if self.secret else b""

    def sealer(self, src: int, dst: int) -> Sealer:
        return Sealer(self._key(src, dst) or None)

    def write(self, dst: int, data: bytes):
        """Start writing data on dst's stream; returns what to wait on."""
        return self.streams[dst].send(data)

    def isend(self, t: torch.Tensor, dst: int, tag: int):
        return self.pg.send([t], dst, tag)

    def irecv(self, t: torch.Tensor, src: int, tag: int):
        return self.pg.recv([t], src, tag)

    def message(self, src: int) -> streams.Message:
        """The receive of src's next message on its stream."""
        return streams.Message(self.streams[src], MAX_MESSAGE)

    def close(self) -> None:
        """Let go of the peers: a stage's loop waiting on this group's streams ends."""
        for s in self.streams.values():
            s.close()


class Received:
    """A frame's receive, posted ahead of time."""

    def __init__(self, group: Group, src: int, nbytes: int, wire: torch.device):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=wire)
        self.work = group.irecv(self.buf, src, FRAME_TAG)


class Link:
    """Frames between this rank and its peers. wire: the device tensors travel from (CPU for
    gloo, the stage's own CUDA device for NCCL)."""

    def __init__(self, group: Group, hidden_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.group, self.hidden_size, self.dtype = group, hidden_size, dtype
        self.device = torch.device(device)
        self.wire = self.device if group.backend == "nccl" else torch.device("cpu")
        self.stream = group.backend == "tcp"  # else frames (see the module doc)
        self.step = 0
        self.sealers: dict[tuple[int, int], Sealer] = {}
        # Both ends start from the size of a one-token step and follow each frame's
        # announcement of the next one's size.
        self.first_frame = PREFIX_BYTES + HEADER_BYTES + hidden_size * dtype.itemsize + \
            (TAG_BYTES if group.secret else 0)
        self.frame_out: dict[int, int] = {}
        self.decode_sizes: dict[int, collections.deque] = {}  # dst -> recent decode steps' sizes
        self.pending: dict[int, Received] = {}

    def _sealer(self, src: int, dst: int) -> Sealer:
        if (src, dst) not in self.sealers:
            self.sealers[src, dst] = self.group.sealer(src, dst)
        return self.sealers[src, dst]

    # sending

    def _message(self, op: int, x: Optional[torch.Tensor], batch: Optional[StepBatch]
                 ) -> bytes:
        """The message in plain bytes: header, index, payload. Built with struct and numpy,
        not torch ops: right after a forward the caches are cold, and each torch op's
        dispatch then costs tens of microseconds."""
        if x is None:
            return HEAD.pack(op, *[0] * (HEADER - 1))
        if op == OP_RELEASE:  # x: the slots
            slots = _host(x.to(torch.long))
            return HEAD.pack(op, slots.size, *[0] * (HEADER - 2)) + slots.tobytes()
        B, T = batch.positions.shape
        span = batch.span or (-1, 0)
        width = batch.slots.shape[1] if batch.slots.dim() == 2 else 0
        parts = [HEAD.pack(op, B, T, batch.kv_len, span[0], span[1], DTYPES.index(x.dtype),
                           self.step, width, len(batch.copies))]
        if batch.span is None:
            parts.append(_host(batch.positions))
            parts.append(_host(batch.slots))  # a slot per row, or block tables
        if batch.copies:
            parts.append(np.array(batch.copies, dtype=np.int64))
        parts.append(_host(x))
        return b"".join(parts)

    def send(self, dst: int, x: Optional[torch.Tensor], batch: Optional[StepBatch],
             op: int = OP_FORWARD) -> list:
        """Start sending a step (x [B, T] token ids or [B, T, D] hidden states) to dst; returns
        (work, buffer) pairs to wait on (the buffer must live until then)."""
        if op == OP_FORWARD:
            self.step += 1
        message = self._message(op, x, batch)
        sealer = self._sealer(self.group.rank, dst)
        sealed_len = len(message) + sealer.tag
        if self.stream:  # one write of prefix and message
            prefix = PREFIX.pack(sealed_len, 0)
            data = prefix + sealer.seal(message, prefix)
            return [(self.group.write(dst, data), data)]
        size = PREFIX_BYTES + sealed_len
        frame = self.frame_out.get(dst, self.first_frame)
        # the next frame is sized like this step, or for the biggest recent decode step (a
        # release leaves the steps' size as it is)
        following = size if size <= MAX_FRAME and op == OP_FORWARD else frame
        if op == OP_FORWARD and x.shape[1] == 1 and size <= MAX_FRAME:
            recent = self.decode_sizes.setdefault(dst, collections.deque(maxlen=FRAME_MEMORY))
            recent.append(size)
            following = max(recent)
        prefix = PREFIX.pack(sealed_len, following)
        data = bytearray(prefix)
        data += sealer.seal(message, prefix)
        if size < frame:
            data += bytes(frame - size)
        wire = torch.frombuffer(data, dtype=torch.uint8)
        if self.wire.type != "cpu":
            wire = wire.to(self.wire)
        self.frame_out[dst] = following
        works = [(self.group.isend(wire[:frame], dst, FRAME_TAG), wire)]
        if size > frame:
            works.append((self.group.isend(wire[frame:], dst, REST_TAG), wire))
        return works

    def send_stop(self, dst: int) -> list:
        return self.send(dst, None, None, OP_STOP)

    def send_release(self, dst: int, slots: list[int]) -> list:
        """Tell dst (and through it the stages after it) that these sequences are gone: their
        per-sequence state beside the KV cache (DeltaNet's) can be freed."""
        return self.send(dst, torch.tensor(slots, dtype=torch.long), None, OP_RELEASE)

    # receiving

    def post(self, src: int, nbytes: Optional[int] = None) -> None:
        """Post the receive of src's next frame (before it is sent: see the module doc)."""
        if src not in self.pending:
            self.pending[src] = self.group.message(src) if self.stream else \
                Received(self.group, src, nbytes or self.first_frame, self.wire)

    def frame_work(self, src: int):
        """The posted receive of src's next frame: wait on it, then call take()."""
        self.post(src)
        r = self.pending[src]
        return r if self.stream else r.work

    def take(self, src: int, wait: Callable[[list], None] = None
             ) -> tuple[int, Optional[torch.Tensor], Optional[StepBatch]]:
        """(op, payload, batch) of the frame from src, once its receive has completed; posts
        the next frame's receive before anything else. wait(works): how to wait for the rest
        of a big step (default: block). Raises FrameRejected for a message that fails to
        open or makes no sense."""
        r = self.pending.pop(src)
        if self.stream:  # the whole message is in (the stream checked its size)
            buf = memoryview(r.buf)
            size = len(buf)
        else:
            buf, size = self._frame(r, src, wait)
        message = self._sealer(src, self.group.rank).open(buf[PREFIX_BYTES:size],
                                                         bytes(buf[:PREFIX_BYTES]))
        try:
            return self._parse(message, src)
        except (ValueError, RuntimeError, struct.error) as e:  # sizes beyond the message
            raise FrameRejected(f"a message from rank {src} does not match its header") from e

    def _frame(self, r: Received, src: int, wait) -> tuple[np.ndarray, int]:
        """A frame's bytes, with the rest of a big step, and the message's size in them."""
        buf = r.buf.cpu().numpy()
        sealed_len, following = PREFIX.unpack_from(buf)
        size = PREFIX_BYTES + sealed_len
        if not (0 < sealed_len < MAX_MESSAGE and PREFIX_BYTES < following <= MAX_FRAME + 64):
            raise FrameRejected(f"a frame from rank {src} has an impossible size")
        self.post(src, following)  # unverified until the message opens, which is harmless
        if size > buf.size:  # the rest of a big step follows as a second message
            rest = torch.empty(size - buf.size, dtype=torch.uint8, device=self.wire)
            work = self.group.irecv(rest, src, REST_TAG)
            (wait or _block)([work])
            buf = np.concatenate([buf, rest.cpu().numpy()])
        return buf, size

    def _parse(self, message, src: int):
        """message: a writable buffer (tensors are made over it, not copied)."""
        length = memoryview(message).nbytes
        if length < HEADER_BYTES:
            raise FrameRejected(f"a message from rank {src} is too short")

        def array(dtype: torch.dtype, at: int, count: int) -> torch.Tensor:
            if count == 0:
                return torch.empty(0, dtype=dtype)
            return torch.frombuffer(message, dtype=dtype, count=count, offset=at)

        def here(t: torch.Tensor) -> torch.Tensor:  # no op to dispatch on a CPU stage
            return t if self.device.type == "cpu" else t.to(self.device)

        op, B, T, kv_len, span_slot, span_p0, kind, step, width, n_copies = \
            HEAD.unpack_from(message)
        if op == OP_RELEASE:
            if not 0 <= B <= (length - HEADER_BYTES) // 8:
                raise FrameRejected(f"a release from rank {src} names more slots than it holds")
            return op, array(torch.long, HEADER_BYTES, B).clone(), None
        if op != OP_FORWARD:
            return op, None, None
        if not (0 <= width < MAX_MESSAGE and 0 <= n_copies < MAX_MESSAGE and B > 0 and T > 0
                and 0 <= kind < len(DTYPES)):
            raise FrameRejected(f"a message from rank {src} does not match its header")
        self.step = step
        at = HEADER_BYTES
        if span_slot >= 0:
            positions = torch.arange(span_p0, span_p0 + T, device=self.device)[None]
            slots = torch.tensor([span_slot], device=self.device)
            batch = StepBatch(positions, slots, kv_len, (span_slot, span_p0))
        else:
            n = B * width if width else B
            index = here(array(torch.long, at, B * T + n))
            at += (B * T + n) * 8
            slots = index[B * T:].view(B, width) if width else index[B * T:]
            batch = StepBatch(index[:B * T].view(B, T), slots, kv_len, None)
        if n_copies:
            pairs = np.frombuffer(message, dtype=np.int64, count=2 * n_copies, offset=at)
            batch.copies = [tuple(p) for p in pairs.reshape(-1, 2).tolist()]
            at += n_copies * 16
        dtype = DTYPES[kind]
        shape = (B, T) if dtype == torch.long else (B, T, self.hidden_size)
        count = B * T * (1 if dtype == torch.long else self.hidden_size)
        if length != at + count * dtype.itemsize:
            raise FrameRejected(f"a message from rank {src} does not match its header")
        x = here(array(dtype, at, count).view(shape))
        return op, x, batch

    def recv(self, src: int) -> tuple[int, Optional[torch.Tensor], Optional[StepBatch]]:
        """Block until src's next frame is here (stages: as long as it takes)."""
        self.frame_work(src).wait()
        return self.take(src)


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a numpy array (numpy has no bfloat16: its bits as int16)."""
    if t.requires_grad:
        t = t.detach()
    if not (t.is_cpu and t.is_contiguous()):  # each torch op costs, cold: only if needed
        t = t.cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _block(works: list) -> None:
    for w in works:
        w.wait()


class Waiter:
    """Waits on works so that the caller can look after the peers every `interval` seconds
    meanwhile and walk away from a wait that will never end: a stream's works are polled in
    the caller's thread; gloo's and NCCL's are waited on in a helper thread. Once abandoned
    (on_slow raised during a helper's wait), it serves no more of those: its thread may be
    stuck for good."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False
        self.thread: Optional[threading.Thread] = None

    def _loop(self) -> None:
        while True:
            works, done, errors = self.jobs.get()
            try:
                for w in works:
                    w.wait()
            except Exception as e:  # a peer died: the caller raises it
                errors.append(e)
            done.set()

    def wait(self, works: list, on_slow: Callable[[float], None], interval: float = 1.0) -> None:
        """Wait for works; every `interval` seconds call on_slow(seconds waited), which raises
        to give up. Raises what a work raised."""
        if all(hasattr(w, "poll") for w in works):  # streams' works: polled right here
            waited = 0.0
            for w in works:
                while not w.poll(interval):
                    waited += interval
                    on_slow(waited)
            return
        if self.abandoned:
            raise RuntimeError("link waiter abandoned")
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="cake-link-wait", daemon=True)
            self.thread.start()
        done, errors = threading.Event(), []
        self.jobs.put((works, done, errors))
        waited = 0.0
        while not done.wait(interval):
            waited += interval
            try:
                on_slow(waited)
            except BaseException:
                self.abandoned = True
                raise
        if errors:
            raise errors[0]
