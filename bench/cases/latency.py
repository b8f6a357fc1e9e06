"""Latency: echo round trip of a 64-byte message through the tunnel, against direct TCP and ssh -R.

One long-lived session per path to a TCP echo service on loopback; after a short warm-up,
``count`` sequential round trips; p50 / p95 / p99. Paths: fleet-tunnel (``tunnel forward`` ->
proxy -> agent -> echo), direct TCP to the echo service, OpenSSH ``ssh -N -R`` reverse tunnel.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import case_main, percentile  # noqa: E402
from rig import Services, SshRig, TunnelRig, echo_rtts  # noqa: E402


def run(quick: bool = False) -> list[dict]:
    count = 200 if quick else 1000
    rows: list[dict] = []
    with Services() as svc, SshRig() as ssh, \
            TunnelRig({"echo": f"127.0.0.1:{svc.echo_port}"}) as ft:
        fport, _ = ft.forward("echo")
        rport, _ = ssh.reverse(svc.echo_port)
        samples = {
            "tunnel": echo_rtts(fport, count),
            "direct": echo_rtts(svc.echo_port, count),
            "ssh": echo_rtts(rport, count),
        }
    for p in (50, 95, 99):
        ms = {k: percentile(v, p) * 1000 for k, v in samples.items()}
        rows.append({"metric": f"echo round trip (64 B), p{p}", "value": round(ms["tunnel"], 3),
                     "unit": "ms", "baseline": round(ms["direct"], 3), "baseline_name": "direct TCP",
                     "target": "-", "note": f"{len(samples['tunnel'])} round trips"})
        rows.append({"metric": f"echo round trip (64 B), p{p}, vs ssh -R",
                     "value": round(ms["tunnel"], 3), "unit": "ms", "baseline": round(ms["ssh"], 3),
                     "baseline_name": "ssh -R", "target": "-"})
    return rows


if __name__ == "__main__":
    case_main("latency", run)
