"""``tunnel audit``: query, verify and export the audit log (ops, on the proxy/CA host).

These commands read the registry directly (``--state DIR``, else $FLEET_STATE), so they run on
the host that holds registry.db, while the proxy keeps writing.

Where they sit in the layers: ops commands over the registry, in the CLI layer (above storage),
registered by ``tunnel``'s parser for every command but ``tunnel agent``. Registering them needs
only the standard library and the pure core; the registry code (:mod:`enroll.audit`,
:mod:`enroll.registry`: SQLite, the ``[server]`` extra) loads when an audit command runs, through
:func:`_registry_code`, which says what to install where it is missing. So a device never loads
SQLite for them, and no ``except ImportError`` hides a broken import.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from enroll import output
from enroll.durations import parse_duration
from enroll.errors import FleetError
from enroll.events import EVENT_TYPES
from enroll.files import write_file
from enroll.labels import parse_selector
from enroll.state import FleetState, default_state_dir

FORMATS = ("table", "json", "jsonl")
TABLE_COLUMNS = ["seq", "time", "type", "actor", "device", "labels", "result", "details"]

AUDIT_HELP = """\
The audit log holds one event per access and per change, in the registry (registry.db),
append-only and hash-chained. Each event has: seq (strictly increasing), time (UTC,
RFC 3339), type, actor and the actor's roles, device and the labels the device had at that
moment, service, login, session, remote address, result and reason; session.end adds
bytes_to_device, bytes_from_device and duration (seconds).

actions:
  query    find events by time, type, user, device and device labels
  verify   check the hash chain; name the first edited, deleted, inserted or reordered event;
           print a new anchor (SEQ:HASH) and check against an earlier one (truncation)
  export   write new events as JSON lines for a SIEM, resuming where the last export stopped

examples:
  tunnel audit query --since 90d customer=acme,site=dal --event session.start
  tunnel audit query --since 2024-05-01 --until 2024-05-02 --user alice --format json
  tunnel audit verify
  tunnel audit export --output /var/log/fleet/audit.jsonl --cursor /var/lib/fleet/audit.cursor

exit status: 0 success; 1 bad input, a broken chain or a failed export (one line on stderr
says what to do); 2 usage error.
"""

QUERY_HELP = f"""\
Events matching every filter given, oldest first.

SELECTOR matches the labels the device had *at the time of the event* (a device relabelled
since is found under its old labels for its old events): key=value, key!=value,
'key in (a,b)', 'key notin (a,b)', key, !key; several selectors and comma-separated terms
are ANDed. Events without device labels (e.g. user logins) never match a selector.

TIME (--since, --until) is a duration back from now (90d, 8h, 30m, 2w, 45s) or an
RFC 3339 time or date (2024-05-01T12:00:00Z, 2024-05-01T14:00:00+02:00, 2024-05-01 =
midnight UTC). Both ends are inclusive.

event types: {', '.join(EVENT_TYPES)}

output (--format): table (default), json (one array), jsonl (one event per line). JSON
events carry seq, time, type, actor, actor_roles, device, labels, service, login, session,
remote, bytes_to_device, bytes_from_device, duration, result, reason, details (other
fields, e.g. code, stage), prev_hash and hash.

example — who reached devices at Customer A's Dallas site in the last 90 days:
  tunnel audit query --since 90d customer=acme,site=dal --event session.start
"""

VERIFY_HELP = """\
Walk the whole chain and check every event's hash and its link to the one before. Prints
the number of events and a new anchor, the last event as SEQ:HASH (--format json: the field
"anchor"). The chain alone cannot show that events were cut off its end; an anchor kept
off this host can: a later 'verify --anchor SEQ:HASH' (or --anchor FILE: the proxy's
--anchor-dir file, an export's .anchors.jsonl) names a log that was cut short (truncated)
or rewritten up to the anchor. Exit 1 naming the first bad event if the chain is broken.

examples:
  tunnel audit verify --anchor /mnt/worm/fleet/audit-anchors.jsonl
  tunnel audit verify --format json | jq -r .anchor | logger -t fleet-audit-anchor
"""

EXPORT_HELP = """\
Write events as JSON lines (the same fields as 'query --format jsonl') to stdout or
--output FILE (appended to), oldest first, each event exactly once across runs.

Where to resume: --after SEQ if given, else the position in --cursor FILE, else the start.
The cursor file (JSON: seq and hash of the last exported event) is replaced atomically only
after the lines were written and flushed (and fsynced, for --output). If a run dies between
the two, the next run with the same --output finds the events already in the file (it reads
its last line; a half-written last line is cut off) and does not write them again. With
stdout, a consumer that fails mid-way gets the batch again; dedupe by seq. The export also
checks each event's link in the chain and stops, exit 1, at the first bad one after writing
all the good ones before it. With --output, each run that exported events appends an anchor
(the last exported event, SEQ:HASH) to FILE.anchors.jsonl: ship it with the export, and
'tunnel audit verify --anchor FILE.anchors.jsonl' catches a log later cut short.

example (cron or a systemd timer):
  tunnel audit export --output /var/log/fleet/audit.jsonl --cursor /var/lib/fleet/audit.cursor
"""


class ServerExtraMissing(FleetError, RuntimeError):
    """An audit command ran where the registry code is not installed."""

    code = "server_extra_missing"


def _registry_code():
    """:mod:`enroll.audit` (and with it the registry), loaded when an audit command runs."""
    try:
        from enroll import audit
    except ModuleNotFoundError as exc:
        if exc.name != "sqlite_utils":
            raise
        raise ServerExtraMissing(
            "tunnel audit reads the registry, on the proxy/CA host: install the server extra "
            "there (pip install 'fleet-tunnel[server]')") from None
    return audit


def _iso(moment: dt.datetime) -> str:
    from enroll.registry import iso

    return iso(moment)


def _state(args) -> FleetState:
    return FleetState(Path(args.state) if args.state else default_state_dir())


def parse_time(text: str, what: str, now: dt.datetime | None = None) -> dt.datetime:
    """A duration back from now (``90d``) or an RFC 3339 time or date; UTC if no offset given."""
    now = now or dt.datetime.now(dt.UTC)
    text = text.strip()
    if text == "now":
        return now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"bad time {text!r} for {what}: use a duration back from now (90d, 8h, 30m) or an "
            "RFC 3339 time (2024-05-01T12:00:00Z) or date (2024-05-01)"
        ) from None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _details(rec: dict) -> str:
    parts = []
    for key in ("service", "login", "session", "remote"):
        if rec.get(key) is not None:
            parts.append(f"{key}={rec[key]}")
    if rec.get("bytes_to_device") is not None:
        parts.append(f"bytes={rec['bytes_to_device']}/{rec.get('bytes_from_device')}")
    if rec.get("duration") is not None:
        parts.append(f"duration={rec['duration']}s")
    for key, value in rec["details"].items():
        if not isinstance(value, dict | list):
            parts.append(f"{key}={value}")
    if rec.get("reason"):
        parts.append(f"reason={rec['reason']!r}")
    return " ".join(parts)


def cmd_query(args) -> int:
    audit = _registry_code()
    selector = parse_selector(args.selector)
    now = dt.datetime.now(dt.UTC)
    since = parse_time(args.since, "--since", now) if args.since else None
    until = parse_time(args.until, "--until", now) if args.until else None
    if since and until and since > until:
        raise ValueError(f"--since ({_iso(since)}) is after --until ({_iso(until)}): swap them")
    actor = args.actor or (f"user:{args.user}" if args.user else None)
    with _state(args).registry() as reg:
        types = audit.resolve_types(reg, args.event or [])
        events = audit.query(reg, since=since, until=until, types=types, actor=actor,
                             device=args.device, selector=selector)
        if args.format == "jsonl":
            write = sys.stdout.write
            for ev in events:
                write(json.dumps(ev.as_record(), ensure_ascii=False) + "\n")
            sys.stdout.flush()
            return 0
        rows = [ev.as_record() for ev in events]
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    for rec in rows:
        rec["details"] = _details(rec)
        rec["actor"] = rec["actor"] + (f" ({','.join(rec['actor_roles'])})" if rec["actor_roles"] else "")
    if rows:
        output.table(rows, TABLE_COLUMNS)
    else:
        print("no audit events match", file=sys.stderr)
    return 0


def read_anchor(value: str) -> tuple[int, str]:
    """``--anchor VALUE``: SEQ:HASH, or a file holding anchors (see :func:`audit.anchor_from_text`).

    Of a large file (an export output) only the last MiB is read: its last events are the anchor.
    """
    audit = _registry_code()
    path = Path(value)
    if ":" in value and not path.exists():
        return audit.parse_anchor(value)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - (1 << 20)) if size > (16 << 20) else 0)
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"--anchor {value!r} is neither SEQ:HASH nor an existing file: pass the anchor "
                         "printed by 'tunnel audit verify' or an anchor file") from None
    except OSError as exc:
        raise ValueError(f"cannot read the anchor file {value}: {exc.strerror or exc}") from None
    if size > (16 << 20):
        data = data[data.find(b"\n") + 1:]  # drop the partial first line of the tail
    try:
        return audit.anchor_from_text(data.decode("utf-8", "replace"))
    except ValueError as exc:
        raise ValueError(f"{value}: {exc}") from None


def cmd_verify(args) -> int:
    audit = _registry_code()
    anchor = None
    if args.anchor:
        anchor = read_anchor(args.anchor)
    elif args.cursor:
        seq, digest = _read_cursor(Path(args.cursor))
        if seq:  # a cursor without a hash matches no event's hash: verify reports the break
            anchor = (seq, digest or "")
    with _state(args).registry() as reg:
        broken = audit.verify(reg, anchor)
        head = audit.head(reg)
    result = {
        "intact": broken is None, "events": head.count,
        "anchor": f"{head.seq}:{head.hash}" if head.seq and not broken else None,
        "checked_anchor": f"{anchor[0]}:{anchor[1]}" if anchor else None,
        "broken_at": broken.seq if broken else None, "problem": broken.problem if broken else None,
    }
    if args.format == "json":
        json.dump(result, sys.stdout, indent=2)
        print()
    if broken:
        print(f"tunnel: audit chain broken at event {broken.seq}: {broken.problem}", file=sys.stderr)
        return 1
    if args.format == "json":
        return 0
    checked = f"; matches anchor {anchor[0]}" if anchor else ""
    print(f"audit chain intact: {head.count} events{checked}")
    if head.seq:
        # The new anchor, last on its own line: keep it off this host (see the README).
        print(f"anchor {head.seq}:{head.hash}")
    return 0


# --- export -------------------------------------------------------------------------------------


def _read_cursor(path: Path) -> tuple[int, str | None]:
    try:
        data = json.loads(path.read_text())
        return int(data["seq"]), (str(data["hash"]) if data.get("hash") else None)
    except FileNotFoundError:
        return 0, None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"cursor file {path} is not an export cursor: fix it, or pass --after SEQ "
                         "to say where to resume") from None


def _write_cursor(path: Path, seq: int, digest: str) -> None:
    body = json.dumps({"seq": seq, "hash": digest, "updated": _iso(dt.datetime.now(dt.UTC))}) + "\n"
    write_file(path, body)


def cmd_export(args) -> int:
    audit = _registry_code()
    cursor = Path(args.cursor) if args.cursor else None
    out_path = Path(args.output) if args.output else None
    if args.after is not None:
        after, after_hash = args.after, None
    elif cursor:
        after, after_hash = _read_cursor(cursor)
    else:
        after, after_hash = 0, None
    with _state(args).registry() as reg:
        if out_path and args.after is None and (resumed := audit.resume_export(reg, out_path, after)):
            after, after_hash = resumed  # a previous run wrote these lines, then died
        sink = open(out_path, "a", encoding="utf-8") if out_path else sys.stdout  # noqa: SIM115
        count, first, error = 0, None, None
        last: tuple[int, str] | None = None
        try:
            try:
                for ev in audit.export_rows(reg, after, after_hash, args.limit):
                    sink.write(json.dumps(ev.as_record(), ensure_ascii=False) + "\n")
                    count += 1
                    first = first or ev.seq
                    last = (ev.seq, ev.hash)
            except audit.ExportError as exc:
                error = str(exc)
            sink.flush()
            if out_path:
                os.fsync(sink.fileno())
        finally:
            if out_path:
                sink.close()
    if cursor and last:
        _write_cursor(cursor, *last)
    if out_path and last:
        # The anchor travels with the export (ship both): a later 'verify --anchor' catches a
        # log cut short or rewritten up to here.
        anchors = Path(str(out_path) + audit.EXPORT_ANCHOR_SUFFIX)
        audit.append_anchor(anchors, *last, fleet=_state(args).fleet)
        print(f"anchor {last[0]}:{last[1]} appended to {anchors}", file=sys.stderr)
    if count and last:
        where = f"; next export resumes after {last[0]}" if cursor else \
            f"; resume with --after {last[0]}"
        print(f"exported {count} events ({first}-{last[0]}){where}", file=sys.stderr)
    elif not error:
        print(f"nothing new to export after event {after}", file=sys.stderr)
    if error:
        print(f"tunnel: {error}", file=sys.stderr)
        return 1
    return 0


# --- parser ------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return int(text)


def _seq(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a sequence number (0 or more), got {text!r}")
    return int(text)


def register(sub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("audit", help="query, verify and export the audit log (ops)",
                       description="query, verify and export the audit log (ops, on the registry host)",
                       epilog=AUDIT_HELP, formatter_class=raw)
    asub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    def state_arg(q):
        q.add_argument("--state", metavar="DIR",
                       help="fleet state directory (default: $FLEET_STATE or the XDG data dir)")

    q = asub.add_parser("query", help="find events by time, type, user, device and device labels",
                        description="find audit events by time, type, user, device and device labels",
                        epilog=QUERY_HELP, formatter_class=raw)
    q.add_argument("selector", nargs="*", metavar="SELECTOR",
                   help="device labels at the time of the event, e.g. customer=acme,site=dal")
    q.add_argument("--since", metavar="TIME", help="only events at or after TIME (e.g. 90d)")
    q.add_argument("--until", metavar="TIME", help="only events at or before TIME")
    q.add_argument("--event", action="append", metavar="TYPE",
                   help="only events of this type; repeat, or comma-separate, or a pattern "
                        "such as 'device.*'")
    who = q.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="NAME", help="only events by the engineer NAME (actor user:NAME)")
    who.add_argument("--actor", metavar="ACTOR",
                     help="only events by exactly ACTOR (e.g. device:robot-1, admin, token:ID)")
    q.add_argument("--device", metavar="ID", help="only events about device ID")
    q.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    state_arg(q)
    q.set_defaults(func=cmd_query)

    v = asub.add_parser("verify", help="check the hash chain; name the first bad event",
                        description="check the audit hash chain; name the first bad event",
                        epilog=VERIFY_HELP, formatter_class=raw)
    anchor = v.add_mutually_exclusive_group()
    anchor.add_argument("--anchor", metavar="SEQ:HASH|FILE",
                        help="also require event SEQ to have HASH and the log to reach it: the "
                             "anchor of an earlier verify, or a file holding anchors (the proxy's "
                             "audit-anchors.jsonl, an export's .anchors.jsonl, its output, a cursor)")
    anchor.add_argument("--cursor", metavar="FILE", help="use an export cursor file as the anchor")
    v.add_argument("--format", choices=("text", "json"), default="text",
                   help="text (default) or json: intact, events, anchor (the new one), "
                        "checked_anchor, broken_at, problem")
    state_arg(v)
    v.set_defaults(func=cmd_verify)

    e = asub.add_parser("export", help="write new events as JSON lines for a SIEM, resumable",
                        description="write new audit events as JSON lines for a SIEM, resumable",
                        epilog=EXPORT_HELP, formatter_class=raw)
    e.add_argument("--output", "-o", metavar="FILE", help="append to FILE (default: stdout)")
    e.add_argument("--cursor", metavar="FILE", help="resume position, read and then updated")
    e.add_argument("--after", type=_seq, metavar="SEQ",
                   help="export events after SEQ (overrides the cursor; 0 = from the start)")
    e.add_argument("--limit", type=_positive, metavar="N", help="export at most N events this run")
    state_arg(e)
    e.set_defaults(func=cmd_export)
