"""``tunnel helper run|status|stop``: the per-user helper from the engineer's side.

``run`` is what a client (or the systemd user unit) starts; engineers use ``status`` and
``stop``. Neither ``status`` nor ``stop`` starts a helper. Kept out of ``tunnel/cli.py`` so the
command table there only registers it (see ``register``).
"""

from __future__ import annotations

import os
import sys
import time

from enroll import output
from enroll.durations import parse_duration
from enroll.errors import EXIT_OK, EXIT_REFUSED


def _directory(args) -> str:
    from tunnel import helper_client

    return helper_client.identity_dir(args.identity)


def cmd_run(args) -> int:
    from tunnel import helper
    from tunnel.client import UserIdentity

    identity = UserIdentity.load(_directory(args), args.proxy or os.environ.get("FLEET_PROXY") or None)
    from tunnel import log as tlog

    idle = parse_duration(args.idle).total_seconds() if args.idle not in ("0", "never") else None
    tlog.setup(args.log_format, args.log_level)
    return helper.run(identity, idle)


def cmd_status(args) -> int:
    from tunnel import helper_client, helper_protocol

    directory = _directory(args)
    status = helper_client.query(directory, "status")
    if status is None:
        data = {"running": False, "identity": directory, "socket": helper_protocol.socket_path(directory)}
    else:
        data = {"running": True, **{k: v for k, v in status.items() if k != "ok"}}
    if args.format != "table":
        output.emit(data, args.format)
    elif not data["running"]:
        print(f"no helper running for {directory} (socket {data['socket']}); the next ssh through the "
              "tunnel starts one")
    else:
        for key, value in data.items():
            print(f"{key:18} {'-' if value is None else value}")
    return EXIT_OK


def cmd_stop(args) -> int:
    from tunnel import helper_client, helper_protocol

    directory = _directory(args)
    path = helper_protocol.socket_path(directory)
    ack = helper_client.query(directory, "stop")
    if ack is None:
        if args.format != "table":
            output.emit({"stopped": None, "identity": directory, "socket": path}, args.format)
        else:
            print(f"no helper running for {directory}", file=sys.stderr)
        return EXIT_OK
    pid = ack.get("pid")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not isinstance(pid, int):  # an ack without a pid: nothing to wait for
            break
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        print(f"tunnel: error: helper {pid} did not exit within 5 s: kill {pid}", file=sys.stderr)
        return EXIT_REFUSED
    if args.format != "table":
        output.emit({"stopped": pid, "identity": directory, "socket": path}, args.format)
    else:
        print(f"stopped helper {pid} ({path})", file=sys.stderr)
    return EXIT_OK
