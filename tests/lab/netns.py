"""Thin executor for the lab plan: runs `ip`/`nft`/`tc`/`conntrack`, enters namespaces, sweeps.

Kept small on purpose: every decision (names, addresses, rulesets) is made in ``plan.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from . import plan

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    pass


def sh(argv, *, input: str | None = None, check: bool = True, timeout: float = 30):
    """Run a short command; on failure raise with the command and its stderr (readable CI logs)."""
    r = subprocess.run(
        [str(a) for a in argv],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and r.returncode != 0:
        raise LabError(
            f"command failed ({r.returncode}): {' '.join(map(str, argv))}\n"
            f"stdin:\n{input or ''}\nstderr:\n{r.stderr}"
        )
    return r


def ns_argv(ns: str | None, argv) -> list[str]:
    return [str(a) for a in argv] if ns is None else ["ip", "netns", "exec", ns, *map(str, argv)]


def ip_batch(ns: str | None, lines) -> None:
    lines = list(lines)
    if lines:
        sh(
            (["ip"] if ns is None else ["ip", "-n", ns]) + ["-batch", "-"],
            input="\n".join(lines) + "\n",
        )


def nft(ns: str, script: str) -> None:
    sh(ns_argv(ns, ["nft", "-f", "-"]), input=script)


def in_netns(ns: str, fn):
    """Call ``fn()`` in a short-lived thread that has joined namespace ``ns``.

    The network namespace is per thread on Linux, so the rest of the process is unaffected;
    sockets created by ``fn`` stay bound to ``ns`` for their whole life.
    """
    result: dict = {}

    def run():
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    t = threading.Thread(target=run, name=f"netns-{ns}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def write_sysctls(ns: str, sysctls) -> None:
    """Write /proc/sys from inside the namespace (no fork: /proc/sys/net follows the thread)."""

    def run():
        for key, value in sysctls:
            Path("/proc/sys", *key.split(".")).write_text(value)

    in_netns(ns, run)


def ns_socket(ns: str, family=socket.AF_INET, type=socket.SOCK_DGRAM, proto=0) -> socket.socket:
    return in_netns(ns, lambda: socket.socket(family, type, proto))


# --------------------------------------------------------------------------- processes


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a pid, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start_time: int) -> bool:
    return proc_start_time(pid) == start_time


def ns_pids(ns: str) -> list[int]:
    r = sh(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def kill_ns_pids(namespaces, grace: float = 2.0) -> None:
    """SIGTERM everything running inside the namespaces, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for ns in namespaces for p in ns_pids(ns) if p != os.getpid()]
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(proc_start_time(p) for p in pids):
            time.sleep(0.02)


def stop_process(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """Stop a process we spawned (its whole session, as spawn() starts one per process)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=grace)


# --------------------------------------------------------------------------- namespaces


def list_namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def delete_namespaces(names) -> None:
    names = [n for n in names if n.startswith(plan.PREFIX)]
    if not names:
        return
    kill_ns_pids(names)
    r = sh(
        ["ip", "-force", "-batch", "-"],
        input="".join(f"netns del {n}\n" for n in names),
        check=False,
    )
    left = set(names) & set(list_namespaces())
    if left:
        raise LabError(f"could not delete namespaces {sorted(left)}: {r.stderr}")


def write_marker(run_id: str) -> None:
    Path(plan.MARKER_DIR).mkdir(parents=True, exist_ok=True)
    path = Path(plan.marker_path(run_id))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # run ids are exclusive
    with os.fdopen(fd, "w") as f:
        f.write(plan.format_marker(os.getpid(), proc_start_time(os.getpid())))


def remove_marker(run_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(plan.marker_path(run_id))


def read_markers() -> dict:
    out = {}
    d = Path(plan.MARKER_DIR)
    if d.is_dir():
        for p in d.glob("*.pid"):
            rid = p.stem
            try:
                plan.check_run_id(rid)
                out[rid] = plan.parse_marker(p.read_text())
            except (ValueError, OSError):
                continue
    return out


def sweep_stale() -> list[str]:
    """Delete namespaces (and markers) of lab runs whose owner process is gone.

    Only names with the lab prefix are ever considered, and a run whose recorded owner is still
    alive is left alone, so concurrent test sessions on one machine do not destroy each other.
    """
    names = list_namespaces()
    stale = plan.stale_run_ids(names, read_markers(), pid_alive)
    doomed = [n for n in names if plan.run_id_of(n) in stale]
    delete_namespaces(doomed)
    for rid in stale:
        remove_marker(rid)
    return doomed


def new_run_id() -> str:
    """A fresh 4-hex run id not used by any live namespace or marker (claimed via the marker)."""
    import secrets

    for _ in range(100):
        rid = secrets.token_hex(2)
        if any(plan.run_id_of(n) == rid for n in list_namespaces()):
            continue
        try:
            write_marker(rid)
        except FileExistsError:
            continue
        return rid
    raise LabError("could not allocate a lab run id")
