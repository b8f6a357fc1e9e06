"""Session setup: from starting ``ssh`` to the device's SSH banner, p50 and p95.

fleet-tunnel, two ways:

- ``helper``: the ProxyCommand of the generated ssh_config, ``python -I -S tunnel/helper_client.py
  dial %h %p`` (standard library only), which asks the per-user helper for a stream over its Unix
  socket; the helper holds the warm connection to the proxy. The very first run starts the
  helper (no helper exists before it): it is reported on its own row, and counted in the p50/p95
  too (``first connection counted``), not thrown away as a warm-up.
- ``direct``: ``ssh -o ProxyCommand='tunnel proxy-command %h %p' root@DEVICE`` (the ProxyCommand
  starts Python with aioquic, makes the QUIC handshake with the proxy, dials the device).

Baseline: ``ssh`` straight to the same sshd on 127.0.0.1. The banner moment is when ``ssh -v``
logs "Remote protocol version" (it has read the server's ``SSH-2.0-...`` line). Also reported:
the whole ``ssh ... true`` (key login, run a command, exit), each way.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import case_main, percentile  # noqa: E402
from rig import ROOT, SshRig, TunnelRig  # noqa: E402

BANNER = b"Remote protocol version"


def ssh_once(argv: list[str], timeout: float = 30.0, env=None) -> tuple[float | None, float | None]:
    """(seconds to banner, seconds to exit 0) of one ``ssh -v ... true`` run."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env)
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
    import os
    import tempfile

    count = 10 if quick else 40
    names = ("helper", "tunnel", "ssh")
    samples = {k: ([], []) for k in names}
    failures = dict.fromkeys(names, 0)
    first: tuple[float | None, float | None] = (None, None)
    runtime = tempfile.mkdtemp(prefix="bench-run-")  # the helper's socket: XDG_RUNTIME_DIR
    with SshRig() as ssh, TunnelRig({"ssh": f"127.0.0.1:{ssh.port}"}) as ft:
        tunnel_bin = Path(sys.executable).with_name("tunnel")
        pc = ft.proxy_command_argv()
        if tunnel_bin.exists():
            pc = [str(tunnel_bin), *pc[3:]]
        helper_pc = [sys.executable, "-I", "-S", str(ROOT / "tunnel" / "helper_client.py"), "dial", "%h", "%p",
                     "--identity", str(ft.ops)]
        env = {**os.environ, "XDG_RUNTIME_DIR": runtime, "PYTHONPATH": str(ROOT)}
        base = ["ssh", "-v", *ssh.common_opts(), "-o", "LogLevel=DEBUG1", "-p", str(ssh.port)]
        argv = {
            "helper": [*base, "-o", f"ProxyCommand={shlex.join(helper_pc)}", f"root@{ft.device}", "true"],
            "tunnel": [*base, "-o", f"ProxyCommand={shlex.join(pc)}", f"root@{ft.device}", "true"],
            "ssh": [*base, "root@127.0.0.1", "true"],
        }
        try:
            for i in range(count + 1):
                for path in names:
                    banner, total = ssh_once(argv[path], env=env)
                    if path == "helper" and i == 0:
                        first = (banner, total)  # started the helper: counted, and shown alone
                    elif i == 0:
                        continue  # warm-up (page cache, sshd first fork)
                    if banner is None or total is None:
                        failures[path] += 1
                        continue
                    samples[path][0].append(banner)
                    samples[path][1].append(total)
        finally:
            subprocess.run([sys.executable, "-m", "tunnel.cli", "helper", "stop", "--identity", str(ft.ops)],
                           env=env, capture_output=True, timeout=30, cwd=ROOT)
            shutil.rmtree(runtime, ignore_errors=True)
    rows = []
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    note = (f"load average after: {load}; {len(samples['ssh'][0])} runs each (helper: {len(samples['helper'][0])}, its first run, which "
            f"starts the helper, included); failures: helper {failures['helper']}, proxy-command "
            f"{failures['tunnel']}, direct {failures['ssh']}")
    for what, k in (("ssh start to SSH banner", 0), ("ssh login + 'true' + exit", 1)):
        for path, label in (("helper", "via helper"), ("tunnel", "via tunnel proxy-command")):
            for p in (50, 95):
                ft_v = percentile(samples[path][k], p) if samples[path][k] else None
                d_v = percentile(samples["ssh"][k], p) if samples["ssh"][k] else None
                rows.append({"metric": f"session setup {label}, {what}, p{p}",
                             "value": None if ft_v is None else round(ft_v, 3), "unit": "s",
                             "baseline": None if d_v is None else round(d_v, 3),
                             "baseline_name": "ssh direct",
                             "target": "<= 0.060" if path == "helper" and k == 0 and p == 50 else "-",
                             "note": note})
    if samples["helper"][1] and samples["ssh"][1]:
        ratio = percentile(samples["helper"][1], 50) / percentile(samples["ssh"][1], 50)
        rows.append({"metric": "session setup via helper / ssh direct, ssh login + 'true' + exit, p50 ratio",
                     "value": round(ratio, 3), "unit": "ratio", "target": "<= 1.1", "note": note})
    for what, k in (("ssh start to SSH banner", 0), ("ssh login + 'true' + exit", 1)):
        rows.append({"metric": f"session setup via helper, first connection (starts the helper), {what}",
                     "value": None if first[k] is None else round(first[k], 3), "unit": "s",
                     "baseline": None, "baseline_name": "-", "target": "-", "note": "one run"})
    return rows


if __name__ == "__main__":
    case_main("setup", run)
