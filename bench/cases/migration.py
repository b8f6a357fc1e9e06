"""First byte after a network switch: fleet-tunnel (QUIC migration) vs ssh -R kept up by autossh.

Run as root: ``python bench/cases/migration.py [--quick]`` (table on stdout, JSON rows in
bench/out/migration.json). Each scenario runs on two lab devices at once, switched at the same
moment:

* fleet-tunnel: a live ``ssh`` session through the tunnel prints a line every 100 ms; the value is
  the time from the switch (the new uplink being up) to the first line on *that same* session.
* baseline: the device runs ``autossh -M 0 -N -R PORT:127.0.0.1:22`` to an sshd in the internet
  namespace (ServerAliveInterval 2 × 3, ClientAliveInterval 2 × 3 on the server — an
  aggressive setting that favours the baseline); its session dies on a switch, so the value is
  the time until a *new* ``ssh -p PORT`` session through the reverse tunnel prints its first
  byte (null: not back within the measuring window).

The lab's delay relay only delays UDP, so the baseline's satellite leg has no added RTT (again in
its favour). ``--quick`` skips the 60 s dead zone.

Resumable sessions (issue 17): rows "resume gap, CASE" run the disruptions of
tests/test_resume_lab.py (``resume_harness``) that need a new connection — the ground-station
endpoint, a proxy restart (SIGTERM, kill -9), UDP blocked and unblocked, the TCP fallback
changing uplink, and (not with ``--quick``) 3 minutes without any uplink. Each keeps a
sequence-numbered ssh tick session and a sha256-checked 32 MiB ``tunnel forward`` download open
through the disruption; the value is the largest interval between ticks from the disruption on,
reported only when the same session went on without a lost or repeated line, the download
arrived byte-exact and ``session.resume`` was audited (otherwise null, with the reason in
``note``). "bytes replayed, CASE" rows give what the audit says the resumes replayed. No
baseline: autossh cannot keep a session across any of these.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from lab import Lab, netns, plan  # noqa: E402
from migration_harness import TunnelLab  # noqa: E402
from resume_harness import (  # noqa: E402
    case_ground_endpoint,
    case_outage,
    case_proxy_restart,
    case_tcp_uplink_change,
    case_udp_blocked,
    survived,
)

JUMP_PORT = 2222
BASELINE_WINDOW = 60.0  # seconds the baseline gets to come back
SSH_COMMON = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
              "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]  # fmt: skip


class Baseline:
    """The jump sshd in the internet namespace that autossh -R tunnels land on."""

    def __init__(self, lab: Lab):
        self.lab = lab
        d = Path(tempfile.mkdtemp(prefix="jump-", dir=lab.tmpdir))
        self.key = d / "device_key"
        host_key = d / "ssh_host_ed25519_key"
        for k in (self.key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k], check=True)
        (d / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        config = d / "sshd_config"
        config.write_text(plan.sshd_config(
            port=JUMP_PORT, host_keys=[host_key], pid_file=str(d / "sshd.pid"),
            authorized_keys=str(d / "authorized_keys"),
            extra=(f"ListenAddress {lab.proxy_public}\nListenAddress {lab.proxy_ground}\n"
                   "ClientAliveInterval 2\nClientAliveCountMax 3\n"),
        ))  # fmt: skip
        self.log = d / "sshd.log"
        with open(self.log, "wb") as f:
            self.proc = lab.spawn(lab.internet, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                  stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while "Server listening on" not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError(self.log.read_text())
            time.sleep(0.05)
        self.next_port = 30000

    def add_device(self, name: str, uplinks, satellite_public=False):
        dev = self.lab.add_device(name, uplinks=uplinks, satellite_public=satellite_public)
        sshd = dev.start_sshd()
        port, self.next_port = self.next_port, self.next_port + 1
        argv = ["autossh", "-M", "0", "-N", "-i", str(self.key), "-p", str(JUMP_PORT), *SSH_COMMON,
                "-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=3",
                "-o", "ExitOnForwardFailure=yes", "-o", "ConnectTimeout=5",
                "-R", f"127.0.0.1:{port}:127.0.0.1:22", f"root@{self.lab.proxy_public}"]  # fmt: skip
        env = {**os.environ, "AUTOSSH_GATETIME": "0", "AUTOSSH_POLL": "5",
               "AUTOSSH_LOGFILE": str(self.lab.tmpdir / f"autossh-{name}.log")}
        self.lab.spawn(dev.ns, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_up(sshd, port, 20)
        return dev, sshd, port

    def argv(self, sshd, port, *command):
        return ["ssh", "-i", str(sshd.client_key), "-p", str(port), *SSH_COMMON,
                "-o", "ConnectTimeout=3", "root@127.0.0.1", *command]  # fmt: skip

    def first_byte(self, sshd, port, since: float, window: float) -> float | None:
        """Seconds from ``since`` until a new session through the tunnel prints a byte."""
        while time.monotonic() - since < window:
            try:
                r = subprocess.run(netns.ns_argv(self.lab.internet, self.argv(sshd, port, "echo", "x")),
                                   capture_output=True, timeout=4)
                if r.returncode == 0 and r.stdout.strip() == b"x":
                    return time.monotonic() - since
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.1)
        return None

    def wait_up(self, sshd, port, timeout):
        if self.first_byte(sshd, port, time.monotonic(), timeout) is None:
            raise RuntimeError("autossh tunnel did not come up")


def measure(name, target, tl, base, uplinks, switch, *, satellite_public=False, proxies=None,
            delay=None, reconnect=False, rows=None):
    """Run one scenario on a tunnel device and a baseline device at the same time."""
    k = len(rows)
    ft_dev, _ = tl.add_device(f"ft{k}", uplinks, proxies=proxies, satellite_public=satellite_public)
    bl_dev, bl_sshd, port = base.add_device(f"bl{k}", uplinks, satellite_public=satellite_public)
    if delay:
        for d in (ft_dev, bl_dev):
            d.set_delay(*delay)
    session = tl.tick_session(f"ft{k}")
    threads = [threading.Thread(target=switch, args=(d,)) for d in (ft_dev, bl_dev)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    up = time.monotonic()
    baseline: dict = {}
    bt = threading.Thread(target=lambda: baseline.update(
        v=base.first_byte(bl_sshd, port, up, BASELINE_WINDOW)))
    bt.start()
    if reconnect:  # the old session cannot survive: time until a new session prints
        value = None
        while time.monotonic() - up < 15:
            r = tl.ssh(f"ft{k}", "echo", "x", timeout=10)
            if r.returncode == 0:
                value = time.monotonic() - up
                break
    else:
        value = session.wait_line_after(up, 15)
    bt.join()
    session.close()
    row = {"metric": f"first byte after {name}", "value": None if value is None else round(value, 3),
           "unit": "s", "baseline": None if baseline.get("v") is None else round(baseline["v"], 3),
           "target": target}
    rows.append(row)
    print(f"  {row['metric']}: {row['value']} s (autossh: {row['baseline']})", flush=True)


def scp_row(tl, rows):
    dev, _ = tl.add_device("ftscp", ("wifi", "cellular"))
    src = tl.lab.tmpdir / "payload.bin"
    src.write_bytes(os.urandom(20 * 1024 * 1024))
    dst = tl.lab.tmpdir / "received.bin"
    t0 = time.monotonic()
    proc = tl.lab.spawn(tl.lab.internet, tl.scp_argv("ftscp", src, dst))
    while not (dst.exists() and dst.stat().st_size > 4 * 1024 * 1024) and proc.poll() is None:
        time.sleep(0.02)
    dev.use("cellular")
    ok = proc.wait(120) == 0 and dst.read_bytes() == src.read_bytes()
    rows.append({"metric": "scp 20 MB across wifi→cellular (completed, checksum ok)",
                 "value": round(time.monotonic() - t0, 3) if ok else None, "unit": "s",
                 "baseline": None, "target": "completes"})
    print(f"  {rows[-1]['metric']}: {rows[-1]['value']} s", flush=True)


#: (case key, row title, target for the gap, the case function with its arguments)
RESUME_CASES = [
    ("ground", "cellular→satellite (ground endpoint only)", "≤ 3 s", case_ground_endpoint, ()),
    ("sigterm", "proxy restart (SIGTERM)", "≤ 5 s", case_proxy_restart, (signal.SIGTERM,)),
    ("kill9", "proxy restart (kill -9)", "≤ 5 s", case_proxy_restart, (signal.SIGKILL,)),
    ("udp", "UDP blocked (QUIC→TCP) and unblocked", "≤ 6 s", case_udp_blocked, ()),
    ("tcpmove", "TCP fallback changing uplink", "≤ 5 s", case_tcp_uplink_change, ()),
    ("outage", "3 min without any uplink", "≤ 183 s (outage + 3 s)", case_outage, (180.0,)),
]


def resume_rows(tl, rows, quick: bool) -> None:
    """One "resume gap" row (and a "bytes replayed" row) per resumable-session case."""
    for key, title, target, fn, args in RESUME_CASES:
        if quick and key == "outage":
            continue
        keep: dict = {}
        value, note, replayed = None, None, None
        try:
            result = fn(tl, f"rs{key}"[:12], keep, *args)
            note = survived(tl, result, with_helper=False)
            if note is None:
                value = round(result.gap, 3)
            if result.helper_session is not None:  # the outage's second session: generated config
                why = survived(tl, result)
                note = "; ".join(filter(None, [note, "ssh via the generated ssh config: " +
                                               ("survived" if why is None else why)]))
            replayed = result.replayed(tl)
            extra = {k: v for k, v in result.notes.items() if isinstance(v, int | float)}
            if extra:
                note = "; ".join(filter(None, [note, ", ".join(f"{k}={v:.3f}" for k, v in extra.items())]))
        except Exception as exc:  # noqa: BLE001 - a case that breaks is a null row, the rest still run
            note = f"{type(exc).__name__}: {exc}"
        finally:
            if keep.get("run") is not None:
                keep["run"].close()
            if keep.get("device") in tl.devices:
                tl.fleet.stop(tl.devices[keep["device"]]["agent"])
        rows.append({"metric": f"resume gap, {title}", "value": value, "unit": "s", "baseline": None,
                     "target": target, "note": note})
        print(f"  {rows[-1]['metric']}: {value} s{f' ({note})' if note else ''}", flush=True)
        if replayed is not None:
            rows.append({"metric": f"bytes replayed, {title}", "value": replayed, "unit": "B",
                         "baseline": None, "target": None})
            print(f"  {rows[-1]['metric']}: {replayed} B", flush=True)


def run(quick: bool = False) -> list[dict]:
    rows: list[dict] = []
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        tl = TunnelLab(lab, Path(tmp))
        base = Baseline(lab)
        try:
            measure("wifi→cellular (make-before-break)", "≤ 1 s", tl, base, ("wifi", "cellular"),
                    lambda d: d.use("cellular"), rows=rows)
            measure("wifi down, 2 s outage, cellular up", "≤ 1 s after the uplink is up", tl, base,
                    ("wifi", "cellular"), lambda d: d.use("cellular", break_first=True, outage=2.0),
                    rows=rows)
            measure("NAT rebinding", "≤ 1 s", tl, base, ("wifi",),
                    lambda d: (lab.rebind_nat(d, "wifi"), lab.rebind_nat(d, "wifi", "tcp")), rows=rows)
            measure("cellular→satellite (600 ms RTT)", "≤ 2 RTT", tl, base, ("cellular", "satellite"),
                    lambda d: d.use("satellite"), satellite_public=True, delay=("satellite", 600),
                    rows=rows)
            proxies = [tl.endpoint(lab.proxy_public), tl.endpoint(lab.proxy_ground, via=["satellite"])]
            measure("switch to an uplink reaching only the ground endpoint (new session)", "≤ 3 s",
                    tl, base, ("wifi", "satellite"), lambda d: d.use("satellite"), proxies=proxies,
                    reconnect=True, rows=rows)
            if not quick:
                measure("60 s dead zone (new session)", "≤ 3 s after coverage returns", tl, base,
                        ("wifi",), lambda d: d.outage(60.0), reconnect=True, rows=rows)
            scp_row(tl, rows)
            resume_rows(tl, rows, quick)
        finally:
            tl.close()
    return rows


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    rows = run(quick)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "migration.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    width = max(len(r["metric"]) for r in rows)
    print(f"\n{'metric':<{width}}  {'fleet-tunnel':>12}  {'autossh -R':>10}  target")
    for r in rows:
        v = "—" if r["value"] is None else f"{r['value']:.3f} {r['unit']}"
        b = "—" if r["baseline"] is None else f"{r['baseline']:.3f} {r['unit']}"
        print(f"{r['metric']:<{width}}  {v:>12}  {b:>10}  {r['target']}")
    print(f"\nwritten: {out / 'migration.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
