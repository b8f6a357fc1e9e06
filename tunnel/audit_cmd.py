"""``tunnel audit``: query, verify and export the audit log (ops, on the proxy/CA host)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from enroll import audit
from enroll.state import FleetState, default_state_dir


def cmd_verify(args) -> int:
    state = FleetState(Path(args.state) if args.state else default_state_dir())
    with state.registry() as reg:
        broken = audit.verify(reg.db)
        count = reg.db["audit"].count
    if broken:
        print(f"tunnel: audit chain broken at event {broken.seq}: {broken.problem}", file=sys.stderr)
        return 1
    print(f"audit chain intact: {count} events")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="query, verify and export the audit log",
                       description="query, verify and export the audit log")
    asub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = asub.add_parser("verify", help="check the hash chain; name the first bad event")
    v.add_argument("--state", metavar="DIR", help="fleet state directory")
    v.set_defaults(func=cmd_verify)
