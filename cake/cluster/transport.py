"""The data plane: one step's activations from stage to stage over torch.distributed.

Ray is too slow per token (~3 ms a call); point-to-point send/recv over gloo (CPU) or NCCL
(between CUDA devices) is ~0.1 ms a hop. The master is rank 0; stages form chains
master -> W1 -> ... -> Wk -> master, results included.

One message per hop. gloo's TCP transport sends a message only once the receiver has posted
its receive, so a receive posted after the previous message arrived costs a round trip per
message. Here each step travels as one frame (header, batch index, payload in one buffer) of
a size both ends agreed on in the previous frame, and the receiver posts the next frame's
receive as soon as a frame arrives, before it computes: the sender then never waits for it.
A step bigger than the agreed frame (a prefill chunk) sends its rest as a second message.

A wait on a peer that hangs cannot be cancelled (gloo's only timeout closes every pair), so
the group's timeout is effectively infinite: stages wait for work as long as the master
lives, and the master waits in a helper thread while it checks the stages' heartbeats (see
Waiter), abandoning the group when a stage is lost.
"""
from __future__ import annotations

import datetime
import os
import queue
import threading
from typing import Callable, Optional

import torch
import torch.distributed as dist

from cake.text.kv_cache import StepBatch

# header (int64): op, rows, tokens per row, kv_len, span slot (-1: none), span first position,
# payload dtype, step number, message bytes, next frame's bytes
HEADER = 10
HEADER_BYTES = HEADER * 8
OP_FORWARD, OP_STOP = 1, 2
FRAME_TAG, REST_TAG = 0, 1
MAX_FRAME = 1 << 18  # steps up to 256 KiB (decode batches) travel in one message
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.long]
FOREVER = datetime.timedelta(days=365)


def interface_of(ip: str) -> Optional[str]:
    """The network interface that holds an address, for gloo's device: gloo otherwise
    resolves the hostname and may pick an address the peers cannot reach."""
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for a in adapter.ips:
            if a.is_IPv4 and a.ip == ip:
                return adapter.name
    return None


class Group:
    """The ring's process group, an object of its own rather than torch's global default
    group: when a stage is lost the master drops it (with any wait still stuck on the lost
    peer) and builds a new one."""

    def __init__(self, rank: int, world_size: int, master_addr: str, port: int, local_ip: str,
                 join_timeout_s: float, backend: str = "gloo"):
        self.rank, self.world_size, self.backend = rank, world_size, backend
        iface = interface_of(local_ip)
        # Joining may take a while on a busy machine.
        self.store = dist.TCPStore(master_addr, port, world_size, is_master=rank == 0,
                                   timeout=datetime.timedelta(seconds=max(join_timeout_s, 120)))
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

    def isend(self, t: torch.Tensor, dst: int, tag: int):
        return self.pg.send([t], dst, tag)

    def irecv(self, t: torch.Tensor, src: int, tag: int):
        return self.pg.recv([t], src, tag)


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
        self.step = 0
        # Both ends start from the size of a one-token step and follow each frame's
        # announcement of the next one's size.
        self.first_frame = HEADER_BYTES + hidden_size * dtype.itemsize
        self.frame_out: dict[int, int] = {}
        self.pending: dict[int, Received] = {}

    # sending

    def _message(self, op: int, x: Optional[torch.Tensor], batch: Optional[StepBatch]
                 ) -> tuple[list[int], list[torch.Tensor]]:
        if x is None:
            return [op] + [0] * 7, []
        B, T = batch.positions.shape
        span = batch.span or (-1, 0)
        parts = []
        if batch.span is None:
            parts.append(torch.cat([batch.positions.flatten(), batch.slots]).to(self.wire))
        parts.append(x.to(self.wire).contiguous())
        return [op, B, T, batch.kv_len, span[0], span[1], DTYPES.index(x.dtype), self.step], parts

    def send(self, dst: int, x: Optional[torch.Tensor], batch: Optional[StepBatch],
             op: int = OP_FORWARD) -> list:
        """Start sending a step (x [B, T] token ids or [B, T, D] hidden states) to dst; returns
        the works to wait on (each holds its buffer alive until then)."""
        if op == OP_FORWARD:
            self.step += 1
        head, parts = self._message(op, x, batch)
        body = [p.reshape(-1).view(torch.uint8) for p in parts]
        size = HEADER_BYTES + sum(b.numel() for b in body)
        frame = self.frame_out.get(dst, self.first_frame)
        following = size if size <= MAX_FRAME else frame
        header = torch.tensor(head + [size, following], dtype=torch.long, device=self.wire)
        data = torch.cat([header.view(torch.uint8), *body])
        if size < frame:
            data = torch.cat([data, data.new_zeros(frame - size)])
        self.frame_out[dst] = following
        works = [(self.group.isend(data[:frame], dst, FRAME_TAG), data)]
        if size > frame:
            works.append((self.group.isend(data[frame:], dst, REST_TAG), data))
        return works

    def send_stop(self, dst: int) -> list:
        return self.send(dst, None, None, OP_STOP)

    # receiving

    def post(self, src: int, nbytes: Optional[int] = None) -> None:
        """Post the receive of src's next frame (before it is sent: see the module doc)."""
        if src not in self.pending:
            self.pending[src] = Received(self.group, src, nbytes or self.first_frame, self.wire)

    def frame_work(self, src: int):
        """The posted receive of src's next frame: wait on it, then call take()."""
        self.post(src)
        return self.pending[src].work

    def take(self, src: int, wait: Callable[[list], None] = None
             ) -> tuple[int, Optional[torch.Tensor], Optional[StepBatch]]:
        """(op, payload, batch) of the frame from src, once its receive has completed; posts
        the next frame's receive before anything else. wait(works): how to wait for the rest
        of a big step (default: block)."""
        r = self.pending.pop(src)
        h = r.buf[:HEADER_BYTES].view(torch.long).tolist()
        op, B, T, kv_len, span_slot, span_p0, kind, step, size, following = h
        if op == OP_FORWARD:
            self.post(src, following)
        if op != OP_FORWARD:
            return op, None, None
        self.step = step
        data = r.buf
        if size > r.buf.numel():  # the rest of a big step follows as a second message
            rest = torch.empty(size - r.buf.numel(), dtype=torch.uint8, device=self.wire)
            work = self.group.irecv(rest, src, REST_TAG)
            (wait or _block)([work])
            data = torch.cat([r.buf, rest])
        at = HEADER_BYTES
        if span_slot >= 0:
            positions = torch.arange(span_p0, span_p0 + T, device=self.device)[None]
            slots = torch.tensor([span_slot], device=self.device)
            batch = StepBatch(positions, slots, kv_len, (span_slot, span_p0))
        else:
            index = data[at:at + (B * T + B) * 8].view(torch.long).to(self.device)
            at += (B * T + B) * 8
            batch = StepBatch(index[:B * T].view(B, T), index[B * T:], kv_len, None)
        dtype = DTYPES[kind]
        shape = (B, T) if dtype == torch.long else (B, T, self.hidden_size)
        n = B * T * (1 if dtype == torch.long else self.hidden_size) * dtype.itemsize
        x = data[at:at + n].view(dtype).view(shape).to(self.device)
        return op, x, batch

    def recv(self, src: int) -> tuple[int, Optional[torch.Tensor], Optional[StepBatch]]:
        """Block until src's next frame is here (stages: as long as it takes)."""
        self.frame_work(src).wait()
        return self.take(src)


def _block(works: list) -> None:
    for w in works:
        w.wait()


class Waiter:
    """Waits on works in a helper thread, so that the caller can look after the peers every
    `interval` seconds meanwhile and walk away from a wait that will never end. Once
    abandoned (on_slow raised), it serves no more waits: its thread may be stuck for good."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False
        threading.Thread(target=self._loop, name="cake-link-wait", daemon=True).start()

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
        if self.abandoned:
            raise RuntimeError("link waiter abandoned")
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
