"""Is the fleet-tunnel agent running and connected to the proxy? (run on the device by the role)

Usage: agent_connected.py (--pid-file PATH --log PATH | --unit NAME) [--stale-venv VENV --config PATH]

Exit 0 when the agent's process is alive and the last connection event it logged since it
started is "connected"; exit 1 otherwise, printing why and the last log lines. It reads the JSON
lines the agent writes with --log-format json (the log file of the "process" manager, or the
journal of the systemd unit) and ignores lines older than the process: after a restart, the old
process's "connected" must not count.

With --stale-venv and --config it checks something else: exit 3 ("stale") when the running agent
started before the installed fleet-tunnel package or its agent.yaml last changed, i.e. a restart
was due but lost (a run that failed between the change and its handler); 0 otherwise.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from datetime import datetime

# the agent's connection state, as logged by tunnel.agent
UP = {"connected", "migrated"}
DOWN = {"connection ended; reconnecting", "dial failed", "no proxy endpoint answered; retrying",
        "no route toward any proxy endpoint; waiting for a network", "path dead: nothing heard from the proxy"}
TAIL = 400


def process_start(pid: int) -> float:
    """Wall-clock start time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def when(entry: dict) -> float:
    try:
        return datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError, AttributeError):
        return 0.0


def main(argv: list[str]) -> int:
    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    if "--unit" in opts:
        unit = opts["--unit"]
        show = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", unit],
                              capture_output=True, text=True)
        pid = int(show.stdout.strip() or 0)
        lines = subprocess.run(["journalctl", "-u", unit, "-n", str(TAIL), "-o", "cat", "--no-pager"],
                               capture_output=True, text=True).stdout.splitlines()
    else:
        try:
            with open(opts["--pid-file"]) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        try:
            with open(opts["--log"], errors="replace") as f:
                lines = f.readlines()[-TAIL:]
        except OSError:
            lines = []
    if "--stale-venv" in opts:
        if not pid or not alive(pid):
            return 0  # not running: the role starts it
        dist = glob.glob(os.path.join(opts["--stale-venv"], "lib", "python*", "site-packages",
                                      "fleet_tunnel-*.dist-info"))
        changed = max((os.stat(p).st_mtime for p in [*dist, opts["--config"]] if os.path.exists(p)),
                      default=0.0)
        if process_start(pid) + 1.0 < changed:
            print(f"agent pid {pid} started before its package or agent.yaml last changed")
            return 3
        return 0
    last = "".join(line if line.endswith("\n") else line + "\n" for line in lines[-15:])
    if not pid or not alive(pid):
        print(f"the agent is not running (pid {pid or 'none'}); its last log lines:\n{last}")
        return 1
    start = process_start(pid) - 1.0
    state = None
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or when(entry) < start:
            continue
        if entry.get("msg") in UP:
            state = "connected"
        elif entry.get("msg") in DOWN:
            state = entry["msg"]
    if state == "connected":
        print(f"agent pid {pid} connected")
        return 0
    print(f"agent pid {pid} is running but not connected ({state or 'no connection yet'}); "
          f"its last log lines:\n{last}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
