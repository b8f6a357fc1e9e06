"""Session setup: from starting ``ssh`` to the device's SSH banner, p50 and p95.

fleet-tunnel: ``ssh -o ProxyCommand='tunnel proxy-command %h %p' root@DEVICE`` (the ProxyCommand
starts Python, makes the QUIC handshake with the proxy, dials the device; the agent connects to
the device's sshd). Baseline: ``ssh`` straight to the same sshd on 127.0.0.1. The banner moment is
when ``ssh -v`` logs "Remote protocol version" (it has read the server's ``SSH-2.0-...`` line).
Also reported: the whole ``ssh ... true`` (key login, run a command, exit), both ways.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import case_main, percentile  # noqa: E402
from rig import ROOT, SshRig, TunnelRig  # noqa: E402

BANNER = b"Remote protocol version"


def ssh_once(argv: list[str], timeout: float = 30.0) -> tuple[float | None, float | None]:
    """(seconds to banner, seconds to exit 0) of one ``ssh -v ... true`` run."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=ROOT)
    banner: list[float] = []

    def watch():
        for line in proc.stderr:
            if not banner and BANNER in line:
                banner.append(time.perf_counter() - t0)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    total = time.perf_counter() - t0
    t.join(5)
    return (banner[0] if banner else None), (total if code == 0 else None)


def run(quick: bool = False) -> list[dict]:
    count = 10 if quick else 40
    samples = {"tunnel": ([], []), "direct": ([], [])}
    failures = {"tunnel": 0, "direct": 0}
    with SshRig() as ssh, TunnelRig({"ssh": f"127.0.0.1:{ssh.port}"}) as ft:
        tunnel_bin = Path(sys.executable).with_name("tunnel")
        pc = ft.proxy_command_argv()
        if tunnel_bin.exists():
            pc = [str(tunnel_bin), *pc[3:]]
        base = ["ssh", "-v", *ssh.common_opts(), "-o", "LogLevel=DEBUG1", "-p", str(ssh.port)]
        argv = {
            "tunnel": [*base, "-o", f"ProxyCommand={shlex.join(pc)}", f"root@{ft.device}", "true"],
            "direct": [*base, "root@127.0.0.1", "true"],
        }
        for i in range(count + 1):
            for path in ("tunnel", "direct"):
                banner, total = ssh_once(argv[path])
                if i == 0:
                    continue  # warm-up (page cache, sshd first fork)
                if banner is None or total is None:
                    failures[path] += 1
                    continue
                samples[path][0].append(banner)
                samples[path][1].append(total)
    rows = []
    note = f"{len(samples['tunnel'][0])} runs each; failures: tunnel {failures['tunnel']}, direct {failures['direct']}"
    for what, k in (("ssh start to SSH banner", 0), ("ssh login + 'true' + exit", 1)):
        for p in (50, 95):
            ft_v = percentile(samples["tunnel"][k], p) if samples["tunnel"][k] else None
            d_v = percentile(samples["direct"][k], p) if samples["direct"][k] else None
            rows.append({"metric": f"session setup, {what}, p{p}",
                         "value": None if ft_v is None else round(ft_v, 3), "unit": "s",
                         "baseline": None if d_v is None else round(d_v, 3),
                         "baseline_name": "ssh direct", "target": "-", "note": note})
    return rows


if __name__ == "__main__":
    case_main("setup", run)
