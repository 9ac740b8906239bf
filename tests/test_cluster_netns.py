"""A cluster across two network namespaces joined by a veth pair, as two machines would be:
the master (and the test's HTTP client, on 127.0.0.1) in this namespace, a worker in its
own, reaching the master only through the veth link. Skipped where namespaces cannot be
made (no root, no `ip`)."""
from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from cluster_procs import FRANCE, STORY, chat, start_cluster, topology
from conftest import ROOT, write_tiny_model
from test_cluster_security import Capture

sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("ray")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def netns():
    """(namespace, this side's address, the namespace's address); removed afterwards."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    tag = os.getpid() % 10000
    ns, here, there = f"cake-t{tag}", f"ckh{tag}", f"ckn{tag}"
    subnet = f"10.213.{tag % 250}"
    if ip("netns", "add", ns, check=False).returncode != 0:
        pytest.skip("cannot make a network namespace here")
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", f"{subnet}.1/24", "dev", here)
        ip("link", "set", here, "up")
        for cmd in (["addr", "add", f"{subnet}.2/24", "dev", there], ["link", "set", there, "up"],
                    ["link", "set", "lo", "up"]):
            ip("netns", "exec", ns, "ip", *cmd)
        yield ns, f"{subnet}.1", f"{subnet}.2"
    finally:
        ip("netns", "del", ns, check=False)  # takes the veth pair with it
        ip("link", "del", here, check=False)


def test_worker_in_another_namespace(start_server, tmp_path_factory, netns):
    ns, master_ip, worker_ip = netns
    tmp = tmp_path_factory.mktemp("netns-cluster")
    model = write_tiny_model(tmp / "model", "llama", num_hidden_layers=4,
                             max_position_embeddings=4096)
    single = start_server(str(model), "--temperature", "0")
    master, workers, _ = start_cluster(
        start_server, tmp, [str(model), "--worker-timeout", "3"],
        [(["worker"], {})], host=master_ip, wrap=["ip", "netns", "exec", ns])
    try:
        doc = topology(master)
        (worker,) = doc["workers"]
        assert worker["host"] == worker_ip and worker["status"] == "ready"
        assert worker["name"].startswith(worker["hostname"] + "-")  # unique default name
        want = [chat(single, STORY, 60, stream) for stream in (False, True)]
        with Capture(f"ckh{os.getpid() % 10000}") as wire:  # the link, as a sniffer sees it
            for stream in (False, True):
                assert chat(master, STORY, 60, stream) == want[stream]
        assert len(wire.data) > 50_000  # the steps went through the link...
        assert b"dragon" not in wire.data  # ...and neither the prompt's text nor a step's
        assert struct.pack("<3q", 1, 1, 1) not in wire.data  # header (op, rows, tokens) shows
        time.sleep(8)  # idle past --worker-timeout: nothing is rebuilt
        assert chat(master, FRANCE, 30) == chat(single, FRANCE, 30)
        assert not [e for e in topology(master)["events"] if e["event"] == "recovered"]

        # A rogue on the network, without the key: garbage and frame-shaped junk at every
        # port the master and the worker listen on, from outside. The cluster goes on.
        ports = listening(master.proc.pid, master_ip) + listening(workers[0].proc.pid,
                                                                  worker_ip)
        assert ports
        for address in ports:
            pester(address)
        assert master.proc.poll() is None and workers[0].proc.poll() is None
        assert chat(master, STORY, 60, True) == chat(single, STORY, 60, True)
        assert topology(master)["workers"][0]["status"] == "ready"
    finally:
        for w in workers:
            w.stop()
        master.stop()


def test_a_frame_altered_on_the_way_is_rejected_and_the_stream_completes(
        start_server, tmp_path_factory):
    """The worker's only link runs through a forwarder that, on demand, alters one frame
    (keeping the TCP checksum right, as an attacker on the path would)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    from netdelay import DelayedHost

    tmp = tmp_path_factory.mktemp("tampered-cluster")
    model = write_tiny_model(tmp / "model", "llama", num_hidden_layers=4,
                             max_position_embeddings=4096)
    single = start_server(str(model), "--temperature", "0")
    flip = tmp / "flip-next-frame"
    with DelayedHost(f"cake-f{os.getpid() % 10000}", 0.0, str(flip)) as host:
        master, workers, _ = start_cluster(start_server, tmp, [str(model)], [(["worker"], {})],
                                           host=host.here, wrap=host.wrap)
        try:
            want = chat(single, STORY, 60, True)
            assert chat(master, FRANCE, 10) == chat(single, FRANCE, 10)
            flip.touch()
            assert chat(master, STORY, 60, True) == want
            assert not flip.exists()  # a frame was altered on the way
            recovered = [e for e in topology(master)["events"] if e["event"] == "recovered"]
            assert len(recovered) == 1 and "rejected a frame" in recovered[0]["error"]
            assert chat(master, FRANCE, 10) == chat(single, FRANCE, 10)
        finally:
            for w in workers:
                w.stop()
            master.stop()


def listening(pid: int, reachable_ip: str) -> list[tuple[str, int]]:
    """The TCP ports a process tree listens on that another machine could reach."""
    import psutil

    found = set()
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr.ip in ("0.0.0.0", "::", reachable_ip):
                found.add((reachable_ip, c.laddr.port))
    return sorted(found)


def pester(address: tuple[str, int]) -> None:
    rng = random.Random(address[1])
    junk = [rng.randbytes(4096),
            # a frame's prefix (sealed length, next frame size), then noise
            (4096).to_bytes(8, "little") + (2400).to_bytes(8, "little") + rng.randbytes(4096),
            b"\x00" * 64]
    for payload in junk:
        try:
            with socket.create_connection(address, timeout=2) as s:
                s.sendall(payload)
                s.settimeout(0.5)
                try:
                    s.recv(1024)
                except OSError:
                    pass
        except OSError:  # refused or reset: fine
            pass
