"""The data plane: one step's activations from stage to stage over torch.distributed.

Ray is too slow per token (~3 ms a call); point-to-point send/recv over gloo (CPU) or NCCL
(between CUDA devices) is ~0.1 ms a hop. The master is rank 0; stages form chains
master -> W1 -> ... -> Wk -> master. Each message is a fixed header, the batch's positions and
slots when they are not one plain span, and the payload (token ids or hidden states).
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from cake.text.kv_cache import StepBatch

# header: op, rows, tokens per row, kv_len, span slot (-1: none), span first position,
# payload kind, step number
HEADER = 8
OP_FORWARD, OP_STOP = 1, 2
HIDDEN, TOKENS = 0, 1


def interface_of(ip: str) -> Optional[str]:
    """The network interface that holds an address, for GLOO_SOCKET_IFNAME: gloo otherwise
    resolves the hostname and may pick an address the peers cannot reach."""
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for a in adapter.ips:
            if a.is_IPv4 and a.ip == ip:
                return adapter.name
    return None


def init_group(rank: int, world_size: int, master_addr: str, port: int, local_ip: str,
               timeout_s: float, backend: str = "gloo") -> None:
    """Join the stages' process group (every rank calls this at once)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    iface = interface_of(local_ip)
    if iface and backend == "gloo":
        os.environ["GLOO_SOCKET_IFNAME"] = iface
    elif iface:
        os.environ["NCCL_SOCKET_IFNAME"] = iface
    # Joining may take a while on a busy machine; a step may not (timeout_s).
    store = dist.TCPStore(master_addr, port, world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=max(timeout_s, 120)))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def close_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tidy
            pass


class Link:
    """Sends and receives steps. wire: the device tensors travel from (CPU for gloo, the
    stage's own CUDA device for NCCL)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 backend: str = "gloo"):
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, torch.device(device)
        self.wire = self.device if backend == "nccl" else torch.device("cpu")
        self.step = 0

    def _send(self, t: torch.Tensor, dst: int) -> None:
        dist.send(t.to(self.wire).contiguous(), dst)

    def _recv(self, shape, dtype, src: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.wire)
        dist.recv(t, src)
        return t.to(self.device)

    def send(self, dst: int, x: torch.Tensor, batch: StepBatch) -> None:
        B, T = batch.positions.shape
        kind = TOKENS if x.dtype == torch.long else HIDDEN
        span = batch.span or (-1, 0)
        self.step += 1
        header = torch.tensor([OP_FORWARD, B, T, batch.kv_len, span[0], span[1], kind,
                               self.step], dtype=torch.long)
        self._send(header, dst)
        if batch.span is None:
            self._send(torch.cat([batch.positions.flatten(), batch.slots]).cpu(), dst)
        self._send(x, dst)

    def isend(self, dst: int, x: torch.Tensor, batch: StepBatch) -> list:
        """send() that returns at once: (work, tensor) pairs to wait on before reuse. The
        master must never block on a send while a stage waits to hand it a result."""
        B, T = batch.positions.shape
        kind = TOKENS if x.dtype == torch.long else HIDDEN
        span = batch.span or (-1, 0)
        self.step += 1
        parts = [torch.tensor([OP_FORWARD, B, T, batch.kv_len, span[0], span[1], kind,
                               self.step], dtype=torch.long)]
        if batch.span is None:
            parts.append(torch.cat([batch.positions.flatten(), batch.slots]).cpu())
        parts.append(x.to(self.wire).contiguous())
        return [(dist.isend(t, dst), t) for t in parts]

    def send_stop(self, dst: int) -> None:
        self._send(torch.tensor([OP_STOP] + [0] * (HEADER - 1), dtype=torch.long), dst)

    def recv(self, src: int) -> tuple[int, Optional[torch.Tensor], Optional[StepBatch]]:
        """(op, payload, batch) of the next step from src."""
        h = self._recv((HEADER,), torch.long, src).tolist()
        op, B, T, kv_len, span_slot, span_p0, kind, self.step = h
        if op != OP_FORWARD:
            return op, None, None
        if span_slot >= 0:
            positions = torch.arange(span_p0, span_p0 + T, device=self.device)[None]
            slots = torch.tensor([span_slot], device=self.device)
            batch = StepBatch(positions, slots, kv_len, (span_slot, span_p0))
        else:
            index = self._recv((B * T + B,), torch.long, src)
            batch = StepBatch(index[:B * T].view(B, T), index[B * T:], kv_len, None)
        if kind == TOKENS:
            x = self._recv((B, T), torch.long, src)
        else:
            x = self._recv((B, T, self.hidden_size), self.dtype, src)
        return op, x, batch

    def recv_result(self, src: int, rows: int, tokens: int) -> torch.Tensor:
        """The hidden states a chain sends back to the master."""
        return self._recv((rows, tokens, self.hidden_size), self.dtype, src)
