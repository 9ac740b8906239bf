"""ClusterPipeline: the engine's Pipeline with stages on worker machines.

The master keeps the embeddings, the final norm and head, and the layers placed on it; each
worker holds one contiguous range. A step runs the master's local layers and sends the hidden
state around each chain of consecutive remote stages (master -> W1 -> ... -> Wk -> master).

Each stage keeps a paged KV cache of its layers (kv_cache.KVCache.pool), read through the
block tables that travel with every step, so prefix reuse and copy-on-write forks work as on
one machine; a headless ring (a speech model's) keeps two slots of the whole context.

When a worker dies or stalls, the master loads its layers itself and the other stages keep
their layers and caches: only the lost layers' keys and values are computed again, from the
tokens of every live sequence (the engine's, see KVOwner), with the step going no further
round the ring than those layers. Then the step is retried: the engine (and the client) see
a slow step, never an error.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from typing import Optional

import torch

from cake.cluster import keys
from cake.cluster import ray_cluster as rc
from cake.cluster import transport
from cake.cluster.placement import NodeSpec, Segment, load_topology, place, usable_memory
from cake.cluster.topology import (device_memory, layer_range, layer_ranges, packed_types,
                                   tensor_shapes, text_topology)
from cake.text.weights import layer_tensor_names
from cake.text.kv_cache import (KVCache, StepBatch, kv_row_bytes, sequence_kv_bytes,
                                serving_dtype)
from cake.text.pipeline import final_hidden, pool_blocks

log = logging.getLogger(__name__)

DTYPE_SIZES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


class StageLost(RuntimeError):
    """A step could not go around the ring; lost: the workers found at fault, when known."""

    def __init__(self, message: str, lost: Optional[list] = None):
        super().__init__(message)
        self.lost = lost


PING_TIMEOUT_S = 2.0  # a stage's Ray actor answers a ping in ~3 ms; one stopped never does


def layer_sizes(checkpoint, num_layers: int, dtype: torch.dtype, quant: Optional[str]
                ) -> tuple[list[int], int]:
    """Bytes of each decoder layer once loaded, and of everything else (embeddings, head).
    GGUF blocks kept quantized count at their packed size."""
    size = DTYPE_SIZES.get(dtype, 4)
    from cake.text.loader import resolve_quant

    packed = {n: b for n, (_, b) in packed_types(checkpoint, resolve_quant(quant, "cpu")).items()}
    layers, other = [0] * num_layers, 0
    for name, shape in tensor_shapes(checkpoint).items():
        n = size
        for d in shape:
            n *= d
        n = packed.get(name, n)
        parts = name.split(".")
        if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
            layers[int(parts[2])] += n
        else:
            other += n
    if checkpoint.config.get("tie_word_embeddings"):
        other *= 2  # the head is a copy of the embeddings on a separate stage
    return layers, other


class ClusterPipeline:
    """headless: every stage is layers only (a speech model's language model: the caller
    feeds input embeddings [B, T, D] and gets the last layer's hidden states back, and keeps
    the embeddings, final norm and head itself). Otherwise the master embeds token ids and
    returns logits, as the engine expects.

    A headless ring's caches are slot caches: num_slots blocks of the whole context."""

    block_window = None  # a replay recomputes from position 0: every block is kept

    def __init__(self, checkpoint, dtype: torch.dtype, device: str, num_slots: int,
                 max_len: int, opts: rc.ClusterOptions, head_node, master_ip: str,
                 quant: Optional[str] = "auto", headless: bool = False,
                 kv_memory: Optional[int] = None, block_size: int = 16):
        """num_slots: sequences at most (the engine's max_batch); kv_memory: bytes of KV
        blocks each node keeps (default: a quarter of its free memory)."""
        from cake.text.models.llama import ModelArgs

        self.checkpoint, self.dtype, self.device = checkpoint, dtype, torch.device(device)
        self.num_slots, self.max_len, self.opts = num_slots, max_len, opts
        self.paged, self.kv_memory = not headless, kv_memory
        self.block_size = block_size if self.paged else max_len
        self.num_blocks = None if self.paged else num_slots  # paged: sized once placed
        self.owner = None  # the engine handing out the blocks (attach)
        self.pending_copies: list[tuple[int, int]] = []  # for the stages, with the next step
        self.prefilled: dict[tuple[int, int], int] = {}  # master's layer range -> positions
        self.rebuilt: set[tuple[int, int]] = set()  # ranges the master took over last time
        self.quant, self.headless = quant, headless
        self.head_node, self.master_ip = head_node, master_ip
        self.args = ModelArgs.from_config(checkpoint.config)
        from cake.text.models import model_class
        self.state_is_kv = model_class(checkpoint.config).prefix_reusable
        self.prefix_reusable = self.can_copy_blocks = self.paged and self.state_is_kv
        self.fingerprint = rc.model_fingerprint(checkpoint)
        # Workers may reopen the same Hub snapshot themselves; a derived checkpoint (a view
        # of part of another model) has no folder of its own, so its layers are shipped.
        source = getattr(checkpoint, "folder", None) or getattr(checkpoint, "path", None)
        self.hf = rc.hf_origin(source) if source else None
        self.layer_bytes, self.master_extra = layer_sizes(
            checkpoint, self.args.num_hidden_layers, dtype, quant)
        self.topology_nodes = {n.name: n for n in load_topology(opts.topology)} \
            if opts.topology else {}
        self.backend = "tcp"
        self.link: Optional[transport.Link] = None
        self.waiter: Optional[transport.Waiter] = None
        self.workers: dict[str, rc.WorkerRecord] = {}
        self.lost: dict[str, rc.WorkerRecord] = {}  # by Ray node id
        self.history: dict[int, list] = {}  # headless: slot -> input at each cached position
        self.events: list[dict] = []
        self.lock = threading.RLock()
        self.inflight: deque = deque()  # submitted steps whose logits are not back yet
        self.results: dict[int, torch.Tensor] = {}
        self._handles = itertools.count()
        self.depth = 1
        self.stages: list = []
        self.plan: list = []
        nodes = rc.wait_for_workers(opts, set(self.topology_nodes) or None)
        self._build(nodes)

    # --- building ------------------------------------------------------------------

    def _build(self, ray_nodes: list[dict]) -> None:
        import ray

        from cake.cluster.stage import checksum, make_bundle

        t0 = time.monotonic()
        # Ring order: by worker name, so the same cluster always gets the same layout.
        ray_nodes = sorted(ray_nodes, key=lambda n: n["NodeName"])
        fresh = [rc.spawn_stage(n) for n in ray_nodes if n["NodeID"] not in self.lost]
        infos = ray.get([w.actor.describe.remote() for w in fresh], timeout=120)
        log.info("%d stage actor(s) up in %.1fs", len(fresh), time.monotonic() - t0)
        self.workers = {}
        for w, info in zip(fresh, infos):
            w.info = info
            while w.name in self.workers:  # two workers started with one --name
                w.name += "+"
            topo = self.topology_nodes.get(w.name)
            w.description = topo.description if topo else info.get("device", "")
            self.workers[w.name] = w
        specs = [NodeSpec("master", usable_memory(device_memory(self.device)), True)]
        for w in self.workers.values():
            topo = self.topology_nodes.get(w.name)
            specs.append(NodeSpec(w.name, usable_memory(w.info["vram_bytes"]),
                                  layers=topo.layers if topo else None))
        self.segments = place(specs, self.layer_bytes, self.master_extra)
        if self.num_blocks is None:
            self.num_blocks = self._pool_size()
        log.info("placement: %s", ", ".join(f"{s.node} {layer_range(s.start, s.end)}"
                                            for s in self.segments))

        # Workers: local weights when they have them, else exactly their layers' tensors.
        remote = [s for s in self.segments if s.node != "master"]
        loads = []
        for rank, seg in enumerate(remote, start=1):
            w = self.workers[seg.node]
            w.rank, w.layers = rank, (seg.start, seg.end)
            spec = {"model_hash": self.fingerprint, "start": seg.start, "end": seg.end,
                    "config": self.checkpoint.config, "dtype": str(self.dtype).split(".")[-1],
                    "hf": self.hf, "quant": self.quant}
            if ray.get(w.actor.has_weights.remote(spec), timeout=120):
                loads.append(w.actor.load.remote(spec))
            else:
                bundle = make_bundle(self.checkpoint,
                                     layer_tensor_names(self.checkpoint, seg.start, seg.end))
                spec["checksum"] = checksum(bundle)
                spec["mac"] = keys.message_mac(keys.link_secret(self.opts.key), bundle)
                loads.append(w.actor.load.remote(spec, ray.put(bundle)))
        # Meanwhile, the master's own ranges (plus embeddings first and head last).
        local = [s for s in self.segments if s.node == "master"]
        L = self.args.num_hidden_layers
        if not local or local[0].start != 0:
            local.insert(0, Segment("master", 0, 0))
        if local[-1].end != L:
            local.append(Segment("master", L, L))
        by_range = {(s.start, s.end): (self._load_local(s.start, s.end), None) for s in local}
        for w, result in zip([self.workers[s.node] for s in remote], ray.get(loads, timeout=600)):
            w.weights_from = result["weights_from"]
            w.status = "ready"
        for w in self.workers.values():
            if w.status != "ready":
                w.status, w.layers = "idle", (0, 0)
        log.info("layers loaded at %.1fs", time.monotonic() - t0)

        self._assemble(by_range, keep_caches=False)
        log.info("stages connected at %.1fs", time.monotonic() - t0)
        self.events.append({"time": time.time(), "event": "placed",
                            "layers": {s.node: layer_range(s.start, s.end) for s in remote},
                            "seconds": round(time.monotonic() - t0, 2)})

    def _load_local(self, start: int, end: int, layers_only: bool = False):
        """layers_only: without embeddings, final norm or head (a lost worker's range: the
        master's first and last stages hold those already)."""
        from cake.cluster.stage import build_stage
        from cake.text.loader import load_stage

        load = build_stage if self.headless or layers_only else load_stage
        return load(self.checkpoint, start, end, self.dtype, str(self.device), self.quant)

    def _new_cache(self, start: int, end: int) -> KVCache:
        kv = (self.args.num_key_value_heads, self.args.head_dim,
              serving_dtype(self.dtype, self.device), self.device)
        layers = self.args.kv_layers(start, end)  # DeltaNet layers keep none
        if self.paged:
            return KVCache.pool(layers, self.num_blocks, self.block_size, *kv)
        return KVCache(layers, self.num_slots, self.max_len, *kv,
                       windows={i: self.args.window(i) for i in layers})

    def _assemble(self, local: dict, keep_caches: bool) -> None:
        """The ring: local stages ((start, end) -> (stage, its cache or None for a new one))
        run here, self.segments' remote ones form chains of consecutive stages. keep_caches:
        the workers keep the caches they have (a ring rebuilt around a lost one)."""
        self.stages, self.plan = [], []
        order = sorted([Segment("master", a, b) for a, b in local] +
                       [s for s in self.segments if s.node != "master"],
                       key=lambda s: (s.start, s.end))
        i = 0
        while i < len(order):
            seg = order[i]
            if seg.node == "master":
                stage, cache = local[seg.start, seg.end]
                self.stages.append(stage)
                self.plan.append(("local", stage, cache or self._new_cache(stage.start,
                                                                             stage.end)))
                i += 1
                continue
            j = i
            while j + 1 < len(order) and order[j + 1].node != "master":
                j += 1
            self.plan.append(("remote", self.workers[order[i].node].rank,
                              self.workers[order[j].node].rank))
            i = j + 1
        self._start_group(order, keep_caches)
        # Steps can be in flight when the ring is one chain and the master's last part (the
        # head) keeps no cache. By default one step per machine: stages that share a machine
        # share its cores and memory bandwidth, so overlapping them gains nothing.
        shape = [p[0] for p in self.plan]
        last = self.plan[-1][1]
        machines = {self.master_ip} | {self.workers[s.node].host for s in order
                                       if s.node != "master"}
        self.depth = (self.opts.pipeline_depth or len(machines)) \
            if shape == ["local", "remote", "local"] and last.start == last.end else 1

    def _pool_size(self) -> int:
        """Blocks every node can keep for its layers (kv_memory each, default a quarter of
        its free memory): the fewest of them, so KV memory bounds the sequences at once."""
        row = kv_row_bytes(self.args.num_key_value_heads, self.args.head_dim,
                           serving_dtype(self.dtype, self.device))
        per_node: dict[str, int] = {}
        for seg in self.segments:
            layers = len(self.args.kv_layers(seg.start, seg.end))  # DeltaNet layers keep none
            per_node[seg.node] = per_node.get(seg.node, 0) + layers
        counts = []
        for node, layers in per_node.items():
            if not layers:
                continue
            memory = self.kv_memory
            if memory is None and node != "master":
                memory = self.workers[node].info.get("vram_bytes", 0) // 4
            counts.append(pool_blocks(row * layers * self.block_size, self.block_size,
                                      self.max_len, self.num_slots, memory, self.device))
        return min(counts, default=1)

    def _start_group(self, order: list[Segment], keep_caches: bool = False) -> None:
        import ray

        ranks = {w.name: w.rank for w in self.workers.values() if w.status == "ready"}
        # NCCL when every stage is on a CUDA device, else TCP streams through host memory.
        devices = [str(self.device)] + [w.info.get("device", "cpu") for w in self.workers.values()
                                        if w.status == "ready"]
        self.backend = "nccl" if all(d.startswith("cuda") for d in devices) \
            else transport.cpu_links()
        world = 1 + len(ranks)
        self._drop_link()
        self.steps_sent: dict[int, int] = {}  # rank -> steps sent its way on this ring
        if world == 1:
            return
        name = os.urandom(16).hex()  # the rendezvous' namespace and the links' key salt
        secure = not self.opts.insecure and self.backend != "nccl"
        starts = []
        for k, seg in enumerate(order):
            if seg.node == "master":
                continue
            prev = order[k - 1].node if k > 0 else "master"
            nxt = order[k + 1].node if k + 1 < len(order) else "master"
            w = self.workers[seg.node]
            starts.append(w.actor.start.remote(
                w.rank, world, name, w.host, ranks.get(prev, 0), ranks.get(nxt, 0),
                self.num_blocks, self.block_size, self.max_len, self.opts.worker_timeout,
                self.backend, secure, keep_caches))
        group = transport.Group(0, world, name, self.master_ip, self.opts.worker_timeout,
                                self.backend, keys.link_secret(self.opts.key) if secure else None)
        self.link = transport.Link(group, self.args.hidden_size, self.dtype, self.device)
        self.waiter = transport.Waiter()
        ray.get(starts, timeout=180)

    # --- the Pipeline protocol -----------------------------------------------------

    @torch.inference_mode()
    def forward(self, tokens, batch, logits_at=None):
        if self.depth > 1:
            return self.collect(self.submit(tokens, batch, logits_at))
        with self.lock:
            self._take_copies(batch)
            while True:
                try:
                    out = self._run(tokens, batch, logits_at)
                    break
                except StageLost as e:
                    self._recover(str(e), e.lost)
            self._remember(tokens, batch)
            return out

    def _take_copies(self, batch: StepBatch) -> None:
        """The stages copy the blocks forks wrote since the last step before running it."""
        if self.pending_copies:
            batch.copies, self.pending_copies = self.pending_copies, []

    def _run(self, tokens, batch, logits_at, upto: Optional[int] = None):
        """The step through the plan's parts (upto: through parts [0, upto] only: a replay
        goes no further than the layers it rebuilds)."""
        x = tokens
        for part in self.plan[:None if upto is None else upto + 1]:
            if part[0] == "local":
                x = self._local(part, x, batch, logits_at)
            else:
                _, first, last = part
                self._wait(self._send(first, last, x, batch) + [self.link.frame_work(last)])
                x = self._take(last)
        return x

    def _local(self, part: tuple, x, batch, logits_at=None):
        """A local stage's part of a step (prompt-sized steps counted per stage)."""
        _, stage, cache = part
        if x.shape[1] > 1 and stage.end > stage.start:
            key = (stage.start, stage.end)
            self.prefilled[key] = self.prefilled.get(key, 0) + x.shape[0] * x.shape[1]
        return stage(x, batch, cache, logits_at=logits_at if stage.is_last else None)

    def _send(self, first: int, last: int, x, batch) -> list:
        """Send a step into a chain (its result's receive posted first); returns the sends'
        works. A work is waited on once: a second wait on a gloo receive waits for another
        message."""
        try:
            self.link.frame_work(last)
            works = [w for w, _ in self.link.send(first, x, batch)]
        except Exception as e:  # a peer's connection is gone already
            raise self._broken(e) from e
        for rank in range(first, last + 1):  # a chain's ranks are consecutive
            self.steps_sent[rank] = self.steps_sent.get(rank, 0) + 1
        return works

    # --- waiting on the ring: heartbeats while a step is in flight ------------------

    def _wait(self, works: list) -> None:
        try:
            self.waiter.wait(works, self._watch)
        except StageLost:
            raise
        except Exception as e:  # a peer's connection broke
            raise self._broken(e) from e

    def _take(self, src: int) -> torch.Tensor:
        try:
            return self.link.take(src, wait=self._wait)[1]
        except StageLost:
            raise
        except transport.FrameRejected as e:
            log.error("rejected the result from rank %d: %s; rebuilding the ring", src, e)
            raise StageLost(f"rejected a frame from rank {src}: {e}") from e
        except Exception as e:
            raise self._broken(e) from e

    def _broken(self, e: Exception) -> StageLost:
        """A link broke: the loss, with the cause a stage gives when it has one (a stage that
        rejected a frame, or lost its own peer, ends its loop and closes its streams)."""
        try:
            self._watch(0.0)
        except StageLost as lost:
            return lost
        return StageLost(f"{type(e).__name__}: {e}")

    def _watch(self, waited: float) -> None:
        """Called every second a step is out: a stage that does not answer its heartbeat
        within PING_TIMEOUT_S is lost (stopped, hung, or cut off); one that answers but has
        held the step for worker_timeout is stalled."""
        beats, silent = self._heartbeats()
        if silent:
            raise StageLost(f"{', '.join(w.name for w in silent)} stopped answering", silent)
        ready = [w for w in self.workers.values() if w.name in beats]
        # a loop that has an error is ending (it set the error before closing its streams)
        ended = [w for w in ready if not beats[w.name]["running"] or beats[w.name]["error"]]
        for w in ended:  # its loop gave up: a peer's connection broke or a frame was rejected
            w.detail = beats[w.name]["error"] or "stage loop ended"
        if ended:
            raise StageLost(f"{', '.join(w.name for w in ended)}: {ended[0].detail}", ended)
        if waited >= self.opts.worker_timeout:
            behind = [w for w in sorted(ready, key=lambda w: w.rank)
                      if beats[w.name]["steps_done"] < self.steps_sent.get(w.rank, 0)][:1]
            for w in behind:
                w.detail = f"no progress for {self.opts.worker_timeout:.0f}s"
            raise StageLost(f"a step made no progress for {waited:.0f}s", behind)

    # Steps in flight: with the ring one chain (master -> W1 -> ... -> Wn -> master), the
    # engine submits a group of sequences and, before its logits are back, the next group,
    # so that every machine works on some group at once. Results come back in order.

    @torch.inference_mode()
    def submit(self, tokens, batch, logits_at=None) -> int:
        with self.lock:
            rec = {"handle": next(self._handles), "tokens": tokens, "batch": batch,
                   "logits_at": logits_at, "works": []}
            self._take_copies(batch)
            self.inflight.append(rec)
            x = self._local(self.plan[0], tokens, batch)
            try:
                rec["works"] = self._send(self.plan[1][1], self.plan[1][2], x, batch)
            except StageLost as e:
                self._recover(str(e), e.lost)  # also runs what is in flight
            return rec["handle"]

    @torch.inference_mode()
    def collect(self, handle: int) -> torch.Tensor:
        """The logits of a submitted step (earlier steps' are received first and kept)."""
        with self.lock:
            while handle not in self.results:
                rec = self.inflight[0]
                last = self.plan[1][2]
                try:
                    # results come back in order: the frame posted now is this step's
                    self._wait(rec["works"] + [self.link.frame_work(last)])
                    y = self._take(last)
                except StageLost as e:
                    self._recover(str(e), e.lost)  # also runs what is in flight
                    continue
                self.inflight.popleft()
                self.results[rec["handle"]] = self._local(self.plan[2], y, rec["batch"],
                                                          rec["logits_at"])
                self._remember(rec["tokens"], rec["batch"])
            return self.results.pop(handle)

    def hidden(self, tokens, batch, logits_at) -> torch.Tensor:
        """Embeddings: the master keeps the final norm and head (its last local stage)."""
        if self.headless:
            raise TypeError("a headless pipeline returns hidden states from forward itself")
        return final_hidden(self, self.stages[-1].model.norm, tokens, batch, logits_at)

    def attach(self, owner) -> None:
        self.owner = owner

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Here at once; on the workers with the next step, before they run it."""
        for part in self.plan:
            if part[0] == "local":
                part[2].copy_blocks(pairs)
        self.pending_copies.extend(pairs)

    def release(self, block: int) -> None:
        # A block's positions are masked out until a sequence writes them again; a headless
        # ring forgets the slot's inputs, and recurrent state kept under it (DeltaNet's) goes
        # too: on the master here, on the workers by a release message down each chain.
        self.history.pop(block, None)
        with self.lock:
            for part in self.plan:
                if part[0] == "local":
                    part[2].release(block)
                    part[1].release_sequence(block, part[2])
                elif not self.state_is_kv:
                    try:
                        for work, _ in self.link.send_release(part[1], [block]):
                            work.wait()
                    except Exception as e:  # a lost stage: a rebuilt one starts without state
                        log.warning("release of block %d not sent: %s", block, e)

    def kv_cache_bytes(self, start: int, end: int) -> int:
        """The most the KV cache of layers [start, end) can hold, on whichever node keeps it
        (a slot cache's sliding layers: their window)."""
        row = kv_row_bytes(self.args.num_key_value_heads, self.args.head_dim,
                           serving_dtype(self.dtype, self.device))
        layers = self.args.kv_layers(start, end)  # DeltaNet layers keep none
        if self.paged:
            return self.num_blocks * self.block_size * row * len(layers)
        windows = [self.args.window(i) for i in layers]
        return self.num_slots * sequence_kv_bytes(windows, row, self.max_len)

    def kv_cache_stats(self) -> dict:
        """Capacity: every node's; held now: a slot cache counts the master's own (workers keep
        theirs), the engine counts a pool's blocks itself."""
        stats = {"kv_cache_capacity_bytes": sum(self.kv_cache_bytes(s.start, s.end)
                                                for s in self.segments)}
        if not self.paged:
            local = [part[2] for part in self.plan if part[0] == "local"]
            stats["kv_cache_bytes"] = sum(c.held_bytes() for c in local)
        return stats

    def _remember(self, inputs: torch.Tensor, batch: StepBatch) -> None:
        """A headless ring's inputs (embeddings [B, T, D], one row per position), to replay
        them; a paged pipeline asks the engine for its sequences' tokens instead."""
        if self.paged:
            return
        rows = inputs.tolist() if inputs.dtype == torch.long else list(inputs.detach().clone())
        for slot, pos, toks in zip(batch.slots.tolist(), batch.positions.tolist(), rows):
            h = self.history.setdefault(slot, [])
            if pos[0] == 0:
                h.clear()
            for p, t in zip(pos, toks):
                if p < len(h):
                    h[p] = t
                else:
                    h.extend([0] * (p - len(h)) + [t])

    # --- failures ------------------------------------------------------------------

    def _heartbeats(self) -> tuple[dict, list[rc.WorkerRecord]]:
        """Every ready stage's ping, PING_TIMEOUT_S at most: (answers by worker name, the
        workers that gave none, silent or gone, with their detail set)."""
        import ray

        ready = [w for w in self.workers.values() if w.status == "ready"]
        pings = {w.actor.ping.remote(): w for w in ready}
        answered, _ = ray.wait(list(pings), num_returns=len(pings), timeout=PING_TIMEOUT_S)
        beats, lost = {}, []
        for ref, w in pings.items():
            try:
                if ref in answered:
                    beats[w.name] = ray.get(ref)
                    continue
                w.detail = f"no heartbeat for {PING_TIMEOUT_S:.0f}s"
            except Exception as e:  # its actor is gone
                w.detail = f"unreachable ({type(e).__name__})"
            lost.append(w)
        return beats, lost

    def _find_lost(self) -> list[rc.WorkerRecord]:
        """The workers at fault after a broken connection."""
        return self._heartbeats()[1]

    def _recover(self, error: str, lost: Optional[list] = None, attempts: int = 3) -> None:
        """Rebuild the ring without the lost worker, compute again what its layers had cached
        and run the steps that were in flight; a failure on the way starts over (then with
        every layer placed afresh), up to attempts times."""
        import ray

        for attempt in range(attempts):
            t0 = time.monotonic()
            log.warning("a stage failed (%s); re-placing layers", error)
            lost = lost if lost is not None else self._find_lost()
            for w in lost:
                w.status = "lost"
                self.lost[w.node_id] = w
            self._drop_link()
            try:
                keep = False
                if attempt == 0 and lost:
                    try:
                        keep = self._master_takes_over(lost)
                    except Exception as e:  # a survivor failed too: place everything anew
                        log.warning("keeping the other stages failed (%s)", e)
                if not keep:
                    for w in self.workers.values():
                        try:
                            ray.kill(w.actor)
                        except Exception:  # its node is gone already
                            log.debug("actor of %s already gone", w.name)
                    self._build([n for n in rc.alive_workers() if n["NodeID"] not in self.lost])
                if self.owner is not None:  # the rebuilt layers hold no unreferenced blocks
                    self.owner.forget_prefix_cache()
                self._replay(keep)
                for rec in self.inflight:
                    self.results[rec["handle"]] = self._run(rec["tokens"], rec["batch"],
                                                            rec["logits_at"])
                    self._remember(rec["tokens"], rec["batch"])
                self.inflight.clear()
            except StageLost as e:
                error, lost = str(e), e.lost
                continue
            self.events.append({"time": time.time(), "event": "recovered", "error": error,
                                "lost": [w.name for w in lost or []],
                                "kept_caches": bool(keep),
                                "seconds": round(time.monotonic() - t0, 2)})
            log.warning("recovered in %.1fs without %s", time.monotonic() - t0,
                        ", ".join(w.name for w in lost or []) or "a lost worker")
            return
        raise RuntimeError(f"the cluster could not recover: {error}")

    def _master_takes_over(self, lost: list) -> bool:
        """Load the lost workers' layers here, keep every other stage (layers and caches) as
        it is, and reconnect the ring. False (nothing changed) when the master lacks the
        memory for them."""
        import ray

        gone = {w.name for w in lost}
        taken = [s for s in self.segments if s.node in gone]
        held = sum(sum(self.layer_bytes[s.start:s.end]) for s in self.segments
                   if s.node == "master") + self.master_extra
        if held + sum(sum(self.layer_bytes[s.start:s.end]) for s in taken) \
                > usable_memory(device_memory(self.device)):
            return False
        for w in lost:
            try:
                ray.kill(w.actor)
            except Exception:  # its node is gone already
                log.debug("actor of %s already gone", w.name)
            w.layers = (0, 0)
            self.workers.pop(w.name, None)
        self.segments = sorted([Segment("master", s.start, s.end) if s.node in gone else s
                                for s in self.segments], key=lambda s: (s.start, s.end))
        local = {(p[1].start, p[1].end): (p[1], p[2]) for p in self.plan if p[0] == "local"}
        self.rebuilt = set()
        for s in taken:
            local[s.start, s.end] = (self._load_local(s.start, s.end, layers_only=True), None)
            self.rebuilt.add((s.start, s.end))
        for rank, seg in enumerate([s for s in self.segments if s.node != "master"], start=1):
            self.workers[seg.node].rank = rank
        self._assemble(local, keep_caches=True)
        self.events.append({"time": time.time(), "event": "placed",
                            "layers": {s.node: layer_range(s.start, s.end)
                                       for s in self.segments},
                            "seconds": 0.0})
        return True

    def _replay(self, partial: bool, chunk: int = 512) -> None:
        """Compute again every live sequence's cached positions. partial: only the layers the
        master took over lost theirs: the steps go round the ring no further than those."""
        upto = None
        if partial:
            upto = max(k for k, p in enumerate(self.plan)
                       if p[0] == "local" and (p[1].start, p[1].end) in self.rebuilt)
        if self.paged:
            items = [(toks, table) for toks, table in self.owner.live_kv()] \
                if self.owner is not None else []
        else:
            items = [(toks, slot) for slot, toks in self.history.items()]
        for toks, table in items:
            for start in range(0, len(toks), chunk):
                part = toks[start:start + chunk]
                batch = StepBatch.make([list(range(start, start + len(part)))], [table],
                                       self.device)
                inputs = (torch.tensor([part], device=self.device) if isinstance(part[0], int)
                          else torch.stack(part)[None])
                self._run(inputs, batch, torch.tensor([len(part) - 1], device=self.device),
                          upto)

    # --- lifecycle and reporting ---------------------------------------------------

    @staticmethod
    def _give_up(waited: float) -> None:
        if waited >= 2:
            raise TimeoutError("no answer in 2 s")

    def topology(self, model_id: str) -> dict:
        workers = [w.topology() for w in self.workers.values()]
        workers += [w.topology() for w in self.lost.values()]
        from cake.text.loader import resolve_quant

        doc = text_topology(model_id, self.stages, workers, self.checkpoint,
                            resolve_quant(self.quant, str(self.device)), self.dtype)
        doc["master"]["layers"] = layer_ranges((s.start, s.end) for s in self.segments
                                               if s.node == "master")
        local = [part for part in self.plan if part[0] == "local"]
        if not self.paged:  # (a pool's blocks in use: the engine's /health)
            doc["master"]["kv_cache_bytes"] = sum(p[2].held_bytes() for p in local)
        doc["master"]["kv_cache_capacity_bytes"] = sum(
            self.kv_cache_bytes(p[1].start, p[1].end) for p in local)
        # Positions each stage computed in prompt-sized steps (prefills and replays).
        doc["master"]["prefilled_tokens"] = {layer_range(*k): n
                                             for k, n in sorted(self.prefilled.items())}
        beats = self._heartbeats()[0] if self.workers else {}
        for entry, w in zip(doc["workers"], list(self.workers.values())):
            start, end = w.layers if w.status == "ready" else (0, 0)
            entry["kv_cache_capacity_bytes"] = self.kv_cache_bytes(start, end)
            entry["prefilled_tokens"] = beats.get(w.name, {}).get("prefilled_tokens")
        doc["memory_bytes"] = sum(self.layer_bytes) + self.master_extra
        doc["layer_size_bytes"] = max(self.layer_bytes)
        doc["events"] = self.events
        return doc

    def close(self) -> None:
        with self.lock:
            for part in self.plan:
                if part[0] == "remote" and self.link is not None:
                    try:  # stages end their loops; one that hangs is killed below anyway
                        works = self.link.send_stop(part[1])
                        self.waiter.wait([w for w, _ in works], self._give_up)
                    except Exception as e:
                        log.info("stage %d did not take the stop: %s", part[1], e)
            self._drop_link()
            rc.stop_master(self.head_node, [w.actor for w in self.workers.values()])

    def _drop_link(self) -> None:
        """Drop the ring's links (a wait still stuck on a lost peer's gloo or NCCL link stays
        stuck; streams are closed, which ends the old ring's stage loops)."""
        if self.link is not None:
            self.link.group.close()
        self.link = None


def start_cluster_pipeline(checkpoint, dtype, device: str, num_slots: int, max_len: int,
                           opts: rc.ClusterOptions, quant: Optional[str] = "auto",
                           headless: bool = False, kv_memory: Optional[int] = None
                           ) -> ClusterPipeline:
    """Start the head, advertise it, wait for workers and build the pipeline."""
    head, master_ip = rc.start_master(opts)
    return ClusterPipeline(checkpoint, dtype, device, num_slots, max_len, opts, head, master_ip,
                           quant, headless, kv_memory)
