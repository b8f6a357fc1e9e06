"""Throughput of one session, engineer -> proxy -> agent -> device service, on loopback.

Three paths to the same bulk TCP service, in the same run:

* fleet-tunnel: ``tunnel forward`` (engineer) -> ``tunnel proxy`` -> ``tunnel agent`` -> service;
* direct TCP to the service;
* OpenSSH reverse tunnel: the "device" runs ``ssh -N -R P:127.0.0.1:service`` to a private sshd;
  the engineer connects to P on the sshd side.

Both directions: ``down`` (the device sends, e.g. logs, scp from the device) and ``up`` (the
engineer sends). Each figure is the median of several transfers. CPU-ms per MB comes from
/proc/PID/stat (utime + stime) of the proxy, the agent and the engineer's forward process
(for ssh: sshd's session processes and the device's ssh client) over the tunnel transfers.

The floor: before the rig starts, the same process measures what aioquic itself costs per MB in
memory (``bench/quicfloor.py``: two ``QuicConnection``s, no sockets, the transport's datagram
size and windows). The proxy receives each byte on one QUIC hop and sends it on the other, so
its floor is that whole exchange (one receiving + one sending side); the proxy rows report
their CPU per MB as a ratio to it. Measured in the same run because both move with the load.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import case_main, cpu_seconds  # noqa: E402
from quicfloor import floor  # noqa: E402
from rig import Services, SshRig, TunnelRig, transfer  # noqa: E402

MB = 1_000_000


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
        fport, fwd = ft.forward("bulk")
        rport, ssh_client = ssh.reverse(svc.bulk_port)
        transfer(fport, "down", MB)  # warm both paths (session setup, sshd session child)
        transfer(rport, "down", MB)
        for direction in ("down", "up"):
            label = "device -> engineer" if direction == "down" else "engineer -> device"
            ft_rate, ft_cpu = _measure(fport, direction, sizes["tunnel"], runs, {
                "proxy": [ft.proxy.pid], "agent": [ft.agent.pid], "forward": [fwd.pid]})
            direct, _ = _measure(svc.bulk_port, direction, sizes["direct"], runs, {})
            ssh_pids = {"sshd": ssh.session_pids(), "ssh": [ssh_client.pid]}
            ssh_rate, ssh_cpu = _measure(rport, direction, sizes["ssh"], runs, ssh_pids)
            rows += [
                {"metric": f"throughput, one session, {label}", "value": round(ft_rate, 2),
                 "unit": "MB/s", "baseline": round(direct, 1), "baseline_name": "direct TCP",
                 "target": ">= 12 MB/s"},
                {"metric": f"throughput, one session, {label}, vs ssh -R", "value": round(ft_rate, 2),
                 "unit": "MB/s", "baseline": round(ssh_rate, 1), "baseline_name": "ssh -R",
                 "target": ">= 12 MB/s"},
                {"metric": f"CPU per MB, proxy, {label}", "value": round(ft_cpu["proxy"], 1),
                 "unit": "CPU-ms/MB", "baseline": round(ssh_cpu["sshd"], 1),
                 "baseline_name": "sshd session", "target": "<= 50 CPU-ms/MB"},
                {"metric": f"CPU per MB, proxy vs aioquic floor, {label}", "value": round(ft_cpu["proxy"], 1),
                 "unit": "CPU-ms/MB", "baseline": round(qf["pair"], 1),
                 "baseline_name": "aioquic floor", "target": "-",
                 "note": "ratio = proxy CPU per MB / aioquic's in-memory sender + receiver cost, same run"},
                {"metric": f"CPU per MB, agent, {label}", "value": round(ft_cpu["agent"], 1),
                 "unit": "CPU-ms/MB", "baseline": round(ssh_cpu["ssh"], 1),
                 "baseline_name": "ssh -R client", "target": "<= 30 CPU-ms/MB"},
                {"metric": f"CPU per MB, engineer's tunnel forward, {label}",
                 "value": round(ft_cpu["forward"], 1), "unit": "CPU-ms/MB", "target": "<= 30 CPU-ms/MB",
                 "note": "ssh -R has no engineer-side process (plain TCP to sshd)"},
            ]
    return rows


if __name__ == "__main__":
    case_main("throughput", run)
