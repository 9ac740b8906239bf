"""A second "machine" behind a link with a one-way delay, for cluster benchmarks.

This kernel has no netem, so the delay is made in user space: a network namespace whose only
link to this one is a pair of TUN devices, and a forwarder that copies each packet from one
to the other after `delay` (both directions). Everything stays inside this sandbox.

    python benchmarks/netdelay.py --name cake-d --delay-ms 0.5   # until Ctrl+C
    # this side: 10.214.0.1, the namespace's: 10.214.0.2; run there with
    # `ip netns exec cake-d COMMAND`

As a library: `with DelayedHost("cake-d", 0.5) as host: ... host.wrap ... host.ip`. With
--flip-file it also plays an attacker on the path who alters one frame on demand.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import os
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Optional

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
HERE, THERE = "10.214.0.1", "10.214.0.2"


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def open_tun_in(ns: str, name: str) -> int:
    """A TUN device created inside namespace ns (setns for the call, then back)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the namespace failed")
        return open_tun(name)
    finally:
        libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)


def tamper(packet: bytes) -> Optional[bytes]:
    """The packet with two bytes of a cake frame's sealed part changed, +1 and -1 two bytes
    apart so that the TCP checksum still holds (the kernel delivers it, as an attacker on the
    path would make it); None unless it is an IPv4 TCP segment that starts a message: on a
    TCP stream, its prefix (sealed bytes, 0) first; over gloo, a frame after gloo's preamble of
    six 8-byte words."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != 6:
        return None
    ihl = (packet[0] & 15) * 4
    start = ihl + (packet[ihl + 12] >> 4) * 4
    for at, stream in ((start, True), (start + 48, False)):
        if len(packet) < at + 64:
            continue
        sealed_len, following = struct.unpack_from("<qq", packet, at)
        if 64 < sealed_len < 1 << 31 and (following == 0 if stream
                                          else 64 < following <= (1 << 18) + 64):
            break
    else:
        return None
    out = bytearray(packet)
    i = at + 40  # inside the sealed bytes
    if out[i] == 0xFF or out[i + 2] == 0x00:
        out[i], out[i + 2] = out[i + 2], out[i]  # swapping keeps the sum too
    else:
        out[i] += 1
        out[i + 2] -= 1
    return bytes(out)


def forward(a: int, b: int, delay_s: float, stop_at: float = float("inf"),
            flip_file: Optional[str] = None) -> None:
    """Copy packets a -> b and b -> a, each after delay_s, in arrival order. While flip_file
    exists, the next frame-starting packet is tampered with and the file removed."""
    due: list = []  # (time, sequence, fd, packet)
    seq = 0
    peer = {a: b, b: a}
    while time.monotonic() < stop_at:
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, fd, packet = heapq.heappop(due)
            try:
                os.write(fd, packet)
            except BlockingIOError:  # the device's queue is full: drop, as a link would
                pass
        timeout = max(0.0, due[0][0] - now) if due else 0.05
        ready, _, _ = select.select([a, b], [], [], timeout)
        for fd in ready:
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                seq += 1
                if flip_file and os.path.exists(flip_file):
                    changed = tamper(packet)
                    if changed is not None and changed != packet:
                        packet = changed
                        os.unlink(flip_file)
                heapq.heappush(due, (time.monotonic() + delay_s, seq, peer[fd], packet))


class DelayedHost:
    """A namespace `name` reached at 10.214.0.2 through a delayed link; the forwarder runs
    in a child process (on core `core` if given). wrap: the command prefix that runs a
    program there."""

    def __init__(self, name: str, delay_ms: float, flip_file: Optional[str] = None,
                 core: Optional[int] = None):
        self.name, self.delay_ms, self.flip_file, self.core = name, delay_ms, flip_file, core
        self.ip, self.here = THERE, HERE
        self.wrap = ["ip", "netns", "exec", name]
        self.proc = None

    def __enter__(self) -> "DelayedHost":
        flip = ["--flip-file", self.flip_file] if self.flip_file else []
        pin = ["taskset", "-c", str(self.core)] if self.core is not None else []
        self.proc = subprocess.Popen([*pin, sys.executable, __file__, "--name", self.name,
                                      "--delay-ms", str(self.delay_ms), *flip],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"delayed link did not come up: {line!r}")
        return self

    def one_way_ms(self, rounds: int = 200) -> float:
        """The delay the link really adds, one way: half the median round trip of a small
        TCP message to an echo server in the namespace (the forwarder's wake-ups are late by
        some tens of microseconds on a busy machine, so the set delay is a lower bound)."""
        import socket

        echo = ("import socket\ns = socket.create_server(('0.0.0.0', 10129))\n"
                "c, _ = s.accept()\nc.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n"
                "while (m := c.recv(64)):\n    c.sendall(m)\n")
        server = subprocess.Popen([*self.wrap, sys.executable, "-c", echo])
        try:
            for _ in range(100):
                try:
                    conn = socket.create_connection((self.ip, 10129), timeout=5)
                    break
                except OSError:
                    time.sleep(0.05)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            trips = []
            for _ in range(rounds):
                t = time.perf_counter()
                conn.sendall(b"x" * 32)
                conn.recv(64)
                trips.append(time.perf_counter() - t)
            conn.close()
        finally:
            server.kill()
            server.wait()
        trips.sort()
        return trips[len(trips) // 2] / 2 * 1000

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def calibrated(name: str, one_way_ms: float, core: Optional[int] = None) -> DelayedHost:
    """A DelayedHost (not yet entered) whose forwarder adds one_way_ms, as measured: its
    lateness in waking up (the one-way time at the set delay, less the time with none, less
    the delay) is taken off the set delay. The time with none (the stacks and the copy
    itself) stays, as a real wire's own latency would."""
    with DelayedHost(name, 0.0, core=core) as probe:
        base = probe.one_way_ms()
    with DelayedHost(name, one_way_ms, core=core) as probe:
        late = probe.one_way_ms() - base - one_way_ms
    return DelayedHost(name, max(0.0, one_way_ms - late), core=core)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="cake-d")
    ap.add_argument("--delay-ms", type=float, default=0.5)
    ap.add_argument("--flip-file", help="while this file exists, tamper with the next frame "
                                        "(see tamper()) and remove it")
    args = ap.parse_args()
    ns, near, far = args.name, f"{args.name[:10]}-a", f"{args.name[:10]}-b"
    ip("netns", "add", ns)
    try:
        a = open_tun(near)
        b = open_tun_in(ns, far)
        ip("addr", "add", HERE, "peer", THERE, "dev", near)
        ip("link", "set", near, "up")
        for cmd in (["addr", "add", THERE, "peer", HERE, "dev", far], ["link", "set", far, "up"],
                    ["link", "set", "lo", "up"]):
            ip("netns", "exec", ns, "ip", *cmd)
        print("ready", flush=True)
        signal.signal(signal.SIGINT, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        try:
            forward(a, b, args.delay_ms / 1000, flip_file=args.flip_file)
        except KeyboardInterrupt:
            pass
    finally:
        ip("netns", "del", ns, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
