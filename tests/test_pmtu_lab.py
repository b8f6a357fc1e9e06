"""Bigger datagrams, safely: real agent, proxy and OpenSSH over a path that silently drops
datagrams over 1,200 bytes (issue 14: "a path that drops datagrams over 1200 bytes still
carries a session").

The black hole (``lab/mtu.py``) is a first-hop router whose links carry 1,228 IP bytes (a
1,200-byte QUIC datagram) and whose "fragmentation needed" errors are dropped. Sessions are
checksummed both ways: an upload (the proxy sends full-size packets to the agent) and a
download (the agent sends them to the proxy). Each side's size is read from its log
(``datagram size``, logged on every change with the reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time

import pytest
from fleet_harness import wait_until
from lab import mtu
from migration_harness import TunnelLab

from tunnel.transport.pmtu import BASE_SIZE, PROBE_SIZE

pytestmark = pytest.mark.lab

MB = 1024 * 1024


@pytest.fixture(scope="module")
def tl(module_lab, tmp_path_factory):
    t = TunnelLab(module_lab, tmp_path_factory.mktemp("pmtu"))
    yield t
    t.close()


def add_device(tl: TunnelLab, name: str, *, small_path: bool):
    """A wifi-only device; ``small_path``: the black hole is there before the agent dials."""
    dev = tl.lab.add_device(name, uplinks=("wifi",))
    if small_path:
        mtu.black_hole(dev, "wifi")
    sshd = dev.start_sshd()
    config = tl.fleet.enroll_device(name, {"customer": "acme"}, {"ssh": "127.0.0.1:22"},
                                    proxies=[tl.endpoint(tl.lab.proxy_public)], keepalive="5s")
    agent = tl.fleet.start_agent(config, spawn=tl.spawner(dev.ns))
    tl.devices[name] = {"dev": dev, "sshd": sshd, "config": config, "agent": agent}
    tl.wait_online(name, timeout=30)
    return dev


def size_events(tl: TunnelLab, name: str) -> dict[str, list[tuple[int, str]]]:
    """``datagram size`` log events of the device's QUIC connection, per side."""
    agent = [(e["size"], e["reason"]) for e in tl.agent_log(name)
             if e.get("msg") == "datagram size"]
    public = tl.devices[name]["dev"].public_address("wifi")
    proxy = []
    for line in (tl.fleet.root / "proxy.log").read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("msg") == "datagram size" and f"{public}'" in str(e.get("peer")):
            proxy.append((e["size"], e["reason"]))
    return {"agent": agent, "proxy": proxy}


def upload(tl: TunnelLab, name: str, path: str, data: bytes, *, pause=None) -> str:
    """Send ``data`` to the device over ssh; returns the sha256 the device computed.

    ``pause``: a callable run after the first half was written (the path changes under it).
    """
    proc = tl.lab.spawn(tl.lab.internet, tl.ssh_argv(name, f"cat > {path} && sha256sum {path}"),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def feed():
        half = len(data) // 2
        proc.stdin.write(data[:half])
        proc.stdin.flush()
        if pause is not None:
            pause()
        proc.stdin.write(data[half:])
        proc.stdin.close()

    writer = threading.Thread(target=feed, daemon=True)
    watchdog = threading.Timer(180, proc.kill)  # a stall fails the test instead of hanging it
    writer.start()
    watchdog.start()
    try:
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(10)
    finally:
        watchdog.cancel()
    writer.join(5)
    assert proc.returncode == 0, err.decode(errors="replace")
    return out.split()[0].decode()


def download(tl: TunnelLab, name: str, command: str) -> bytes:
    out = tl.ssh(name, command, timeout=180)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out.stdout


def test_path_that_drops_large_datagrams_still_carries_a_session(tl):
    """The black hole is there from the start: both sides probe, lose the probes, stay at
    1,200, and a checksummed session runs both ways without a stall."""
    dev = add_device(tl, "pmtusmall", small_path=True)
    data = os.urandom(6 * MB)
    path = tl.lab.tmpdir / "pmtu-small.bin"
    t0 = time.monotonic()
    assert upload(tl, "pmtusmall", str(path), data) == hashlib.sha256(data).hexdigest()
    back = download(tl, "pmtusmall", f"cat {path}")
    took = time.monotonic() - t0
    print(f"\n12 MB over the black-holed path in {took:.1f} s")
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    wait_until(lambda: all(size_events(tl, "pmtusmall").values()), 20, 0.2,
               "both sides give up probing")
    events = size_events(tl, "pmtusmall")
    for side in ("agent", "proxy"):
        assert events[side] == [(BASE_SIZE, f"probes of {PROBE_SIZE} bytes lost")], events
    assert mtu.carries(dev, "wifi", BASE_SIZE) and not mtu.carries(dev, "wifi", PROBE_SIZE)


def test_normal_path_uses_1452(tl):
    dev = add_device(tl, "pmtubig", small_path=False)
    assert mtu.carries(dev, "wifi", PROBE_SIZE)
    data = os.urandom(2 * MB)
    path = tl.lab.tmpdir / "pmtu-big.bin"
    assert upload(tl, "pmtubig", str(path), data) == hashlib.sha256(data).hexdigest()
    wait_until(lambda: all(size_events(tl, "pmtubig").values()), 20, 0.2, "size raised")
    events = size_events(tl, "pmtubig")
    assert events["agent"] == [(PROBE_SIZE, "probe acknowledged")], events
    assert events["proxy"] == [(PROBE_SIZE, "probe acknowledged")], events


def test_black_hole_mid_session_falls_back_and_the_session_goes_on(tl):
    """The path shrinks while full-size data flows both ways: each side sees a black hole,
    drops to 1,200, and both transfers finish with the right checksum."""
    dev = add_device(tl, "pmtumid", small_path=False)
    wait_until(lambda: all(size_events(tl, "pmtumid").values()), 20, 0.2, "size raised")
    hole = threading.Event()

    def make_hole():
        if not hole.is_set():
            mtu.black_hole(dev, "wifi")
            hole.set()

    up = os.urandom(8 * MB)
    first, second, go = (tl.lab.tmpdir / f"pmtu-{n}" for n in ("a.bin", "b.bin", "go"))
    first.write_bytes(os.urandom(4 * MB))
    second.write_bytes(os.urandom(4 * MB))
    want_down = hashlib.sha256(first.read_bytes() + second.read_bytes()).digest()
    down: dict[str, bytes] = {}
    # the download sends its second half only once the hole is there (the device's
    # namespace shares this file system)
    command = f"cat {first}; while [ ! -e {go} ]; do sleep 0.05; done; cat {second}"
    downloader = threading.Thread(
        target=lambda: down.update(data=download(tl, "pmtumid", command)), daemon=True)
    downloader.start()
    got = upload(tl, "pmtumid", str(tl.lab.tmpdir / "pmtu-up.bin"), up,
                 pause=lambda: (make_hole(), go.touch()))
    downloader.join(180)
    assert got == hashlib.sha256(up).hexdigest()
    assert hashlib.sha256(down["data"]).digest() == want_down
    events = size_events(tl, "pmtumid")
    black_hole = (BASE_SIZE, "black hole: full-size packets lost")
    assert black_hole in events["agent"], events
    assert black_hole in events["proxy"], events
    assert mtu.carries(dev, "wifi", BASE_SIZE) and not mtu.carries(dev, "wifi", PROBE_SIZE)
