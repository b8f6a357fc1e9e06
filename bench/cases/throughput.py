"""Throughput of one session, engineer -> proxy -> agent -> device service, on loopback.

Three paths to the same bulk TCP service, in the same run:

* fleet-tunnel: ``tunnel forward`` (engineer) -> ``tunnel proxy`` -> ``tunnel agent`` -> service;
* direct TCP to the service;
* OpenSSH reverse tunnel: the "device" runs ``ssh -N -R P:127.0.0.1:service`` to a private sshd;
  the engineer connects to P on the sshd side.

Both directions: ``down`` (the device sends, e.g. logs, scp from the device) and ``up`` (the
engineer sends). ``tunnel forward`` dials the proxy the way an engineer does by default (TLS/TCP
first, QUIC as the fallback; with ``FLEET_HELPER=off``, so the forward process itself splices
and its CPU is what is measured; sessions are resumable, the default) while the agent is on
QUIC; the rows name the transport each hop
actually used (read from the processes' sockets, not assumed). A second ``tunnel forward`` with
``FLEET_TRANSPORT=quic`` measures the all-QUIC variant in the same run (proxy and forward rows
marked "engineer hop QUIC"). Each figure is the median of several transfers. CPU-ms per MB comes from
/proc/PID/stat (utime + stime) of the proxy, the agent and the engineer's forward process
(for ssh: sshd's session processes and the device's ssh client) over the tunnel transfers.

The floor: before the rig starts, the same process measures what aioquic itself costs per MB in
memory (``bench/quicfloor.py``: two ``QuicConnection``s, no sockets, the transport's datagram
size and windows). With both hops on QUIC the proxy receives each byte on one QUIC hop and
sends it on the other, so its floor is that whole exchange (one receiving + one sending side);
with the engineer hop on TLS/TCP it is the one QUIC side the proxy runs (receiving from the
device, or sending to it). The proxy rows report their CPU per MB as a ratio to it. Measured in the same run because both move with the load.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import case_main, cpu_seconds  # noqa: E402
from quicfloor import floor  # noqa: E402
from rig import Services, SshRig, TunnelRig, transfer  # noqa: E402

MB = 1_000_000


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


def hop_transport(pid: int, proxy_port: int) -> str:
    """Which transport process ``pid`` uses to reach the proxy: "TLS/TCP", "QUIC" or "?".

    Read from /proc: a TCP socket of the process connected to ``proxy_port`` means TLS/TCP;
    otherwise a UDP socket means QUIC (our UDP endpoint is not connected, so its peer is not in
    the table; the engineer and the agent open no other UDP socket).
    """
    inodes = _socket_inodes(pid)

    def rows(table: str) -> list[list[str]]:
        with contextlib.suppress(OSError), open(f"/proc/net/{table}") as f:
            return [line.split() for line in list(f)[1:]]
        return []

    for table in ("tcp", "tcp6"):
        for cols in rows(table):
            if int(cols[2].rsplit(":", 1)[1], 16) == proxy_port and int(cols[9]) in inodes:
                return "TLS/TCP"
    for table in ("udp", "udp6"):
        if any(int(cols[9]) in inodes for cols in rows(table)):
            return "QUIC"
    return "?"


def _measure(port: int, direction: str, nbytes: int, runs: int, pids: dict[str, list[int]]):
    """Median MB/s over ``runs`` transfers, and CPU-ms per MB per process group."""
    before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
    rates = [nbytes / MB / transfer(port, direction, nbytes) for _ in range(runs)]
    after = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
    moved = nbytes * runs / MB
    cpu = {k: (after[k] - before[k]) * 1000 / moved for k in pids}
    return statistics.median(rates), cpu


def run(quick: bool = False) -> list[dict]:
    runs = 2 if quick else 3
    sizes = {  # bytes per transfer: ~2-5 s each
        "tunnel": (16 if quick else 32) * MB,
        "direct": (256 if quick else 1024) * MB,
        "ssh": (64 if quick else 256) * MB,
    }
    rows: list[dict] = []
    qf = floor(nbytes=(16 if quick else 32) * MB, runs=3)
    size = qf["datagram_size"]
    rows.append({
        "metric": f"aioquic floor in memory, {size}-byte datagrams, sender + receiver",
        "value": round(qf["pair"], 1), "unit": "CPU-ms/MB", "target": "-",
        "note": f"median of {qf['runs']} x {qf['nbytes'] // MB} MB, two QuicConnections, no sockets; "
                f"sender {qf['sender']:.1f} + receiver {qf['receiver']:.1f} CPU-ms/MB "
                f"(split by time in each side's calls)"})
    with Services() as svc, SshRig() as ssh, \
            TunnelRig({"bulk": f"127.0.0.1:{svc.bulk_port}"}) as ft:
        os.environ.pop("FLEET_TRANSPORT", None)  # the engineer's default order
        # the forward splices in its own process (measured here), not in the per-user helper:
        # through the helper this process would only wait, and the helper's one connection
        # would also carry the QUIC variant below whatever FLEET_TRANSPORT it was given
        os.environ["FLEET_HELPER"] = "off"
        fport, fwd = ft.forward("bulk")
        os.environ["FLEET_TRANSPORT"] = "quic"  # the all-QUIC variant, for comparison
        try:
            qport, qfwd = ft.forward("bulk")
        finally:
            del os.environ["FLEET_TRANSPORT"]
            del os.environ["FLEET_HELPER"]
        rport, ssh_client = ssh.reverse(svc.bulk_port)
        for port in (fport, qport, rport):  # warm the paths (session setup, sshd session child)
            transfer(port, "down", MB)
        proxy_port = ft.fleet.proxy_port
        engineer_hop = hop_transport(fwd.pid, proxy_port)
        hops = f"engineer hop {engineer_hop}, device hop {hop_transport(ft.agent.pid, proxy_port)}"
        quic_hop = hop_transport(qfwd.pid, proxy_port)
        for direction in ("down", "up"):
            way = "device -> engineer" if direction == "down" else "engineer -> device"
            label = f"{way}, engineer hop {engineer_hop}"  # the default rows name their hop
            ft_rate, ft_cpu = _measure(fport, direction, sizes["tunnel"], runs, {
                "proxy": [ft.proxy.pid], "agent": [ft.agent.pid], "forward": [fwd.pid]})
            # The proxy's share of the floor: both sides of an aioquic exchange when both hops
            # are QUIC; with the engineer on TLS/TCP it only receives (down) or sends (up) QUIC.
            if engineer_hop == "TLS/TCP":
                side = "receiver" if direction == "down" else "sender"
                floor_ms, floor_name = qf[side], f"aioquic floor, {side}"
            else:
                floor_ms, floor_name = qf["pair"], "aioquic floor"
            q_rate, q_cpu = _measure(qport, direction, sizes["tunnel"], runs, {
                "proxy": [ft.proxy.pid], "forward": [qfwd.pid]})
            direct, _ = _measure(svc.bulk_port, direction, sizes["direct"], runs, {})
            ssh_pids = {"sshd": ssh.session_pids(), "ssh": [ssh_client.pid]}
            ssh_rate, ssh_cpu = _measure(rport, direction, sizes["ssh"], runs, ssh_pids)
            rows += [
                {"metric": f"throughput, one session, {label}", "value": round(ft_rate, 2),
                 "unit": "MB/s", "baseline": round(direct, 1), "baseline_name": "direct TCP",
                 "target": ">= 12 MB/s", "note": hops},
                {"metric": f"throughput, one session, {label}, vs ssh -R", "value": round(ft_rate, 2),
                 "unit": "MB/s", "baseline": round(ssh_rate, 1), "baseline_name": "ssh -R",
                 "target": ">= 12 MB/s"},
                {"metric": f"CPU per MB, proxy, {label}", "value": round(ft_cpu["proxy"], 1),
                 "unit": "CPU-ms/MB", "baseline": round(ssh_cpu["sshd"], 1),
                 "baseline_name": "sshd session", "target": "<= 50 CPU-ms/MB", "note": hops},
                {"metric": f"CPU per MB, proxy vs aioquic floor, {label}", "value": round(ft_cpu["proxy"], 1),
                 "unit": "CPU-ms/MB", "baseline": round(floor_ms, 1),
                 "baseline_name": floor_name, "target": "-",
                 "note": f"ratio = proxy CPU per MB / aioquic's in-memory cost of the QUIC side(s) "
                         f"the proxy runs for this direction, same run; {hops}"},
                {"metric": f"CPU per MB, agent, {label}", "value": round(ft_cpu["agent"], 1),
                 "unit": "CPU-ms/MB", "baseline": round(ssh_cpu["ssh"], 1),
                 "baseline_name": "ssh -R client", "target": "<= 30 CPU-ms/MB", "note": hops},
                {"metric": f"CPU per MB, engineer's tunnel forward, {label}",
                 "value": round(ft_cpu["forward"], 1), "unit": "CPU-ms/MB", "target": "<= 30 CPU-ms/MB",
                 "note": f"{hops}; ssh -R has no engineer-side process (plain TCP to sshd)"},
                {"metric": f"throughput, one session, {way}, engineer hop {quic_hop}", "value": round(q_rate, 2),
                 "unit": "MB/s", "target": "-",
                 "note": f"FLEET_TRANSPORT=quic: engineer hop {quic_hop}, same proxy and agent"},
                {"metric": f"CPU per MB, proxy vs aioquic floor, {way}, engineer hop {quic_hop}",
                 "value": round(q_cpu["proxy"], 1), "unit": "CPU-ms/MB", "baseline": round(qf["pair"], 1),
                 "baseline_name": "aioquic floor", "target": "-",
                 "note": f"FLEET_TRANSPORT=quic: both hops {quic_hop}; the proxy terminates two QUIC hops"},
                {"metric": f"CPU per MB, engineer's tunnel forward, {way}, engineer hop {quic_hop}",
                 "value": round(q_cpu["forward"], 1), "unit": "CPU-ms/MB", "target": "-",
                 "note": f"FLEET_TRANSPORT=quic: engineer hop {quic_hop}"},
            ]
    return rows


if __name__ == "__main__":
    case_main("throughput", run)
