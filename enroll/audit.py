"""The audit log: append-only, hash-chained events in the registry, queryable by label and time.

Writing. Callers append inside the same write transaction as the change they record (see
``Registry.write``), so the change and its event commit together or not at all; the registry runs
WAL with ``synchronous=FULL``, so an event whose transaction returned survives ``kill -9`` (and a
power cut). Each event gets the next sequence number (1, 2, 3, … with no gaps), the time (UTC,
RFC 3339 with microseconds), and the hash of the event before it::

    hash = sha256(prev_hash + json([seq, time, type, actor, actor_roles, device, labels,
                                    result, reason, fields]))

Append-only. Since schema v3 SQLite triggers refuse ``UPDATE`` and ``DELETE`` on ``audit`` and
``audit_labelsets`` and any ``INSERT`` that is not the next sequence number. There is no switch
to turn that off: maintenance that really must rewrite the log has to ``DROP TRIGGER`` by hand
(they come back only by restoring a backup), and :func:`verify` still names every change.

Verifying. :func:`verify` walks the chain and names the first event that was edited, deleted,
inserted or reordered, and checks the label index against each event's own labels. The chain
is a plain hash, not a signature: someone with write access who recomputes every later hash, or
cuts events off the end, is caught only against a copy kept elsewhere — the SIEM export
(:func:`export_rows`) or an anchor (``seq:hash`` of the last event); pass it as ``anchor``.
Anchors are written routinely (:func:`append_anchor`): ``tunnel audit verify`` prints one, the
export appends one beside its output and the proxy one every ``--anchor-every`` to
``--anchor-dir``; :func:`anchor_from_text` reads any of them back.

Querying. ``labels`` on an event are the device's labels *at that moment*. Each distinct label
set is stored once in ``audit_labelsets`` and events point at it (``audit.labelset``, indexed
with time), so a selector is evaluated once per distinct label set with the shared
:mod:`enroll.labels` semantics, then the matching events are fetched through the index.

Event types are stable names (:data:`enroll.events.EVENT_TYPES`).

Why one module of about 700 lines: writing, verifying, querying and exporting all depend on the
chain's private format (``_COLUMNS``, ``_row``, ``_digest``, the label index); split apart, that
format would have to become a public API of its own.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from enroll.errors import FleetError
from enroll.events import EVENT_TYPES
from enroll.labels import Selector
from enroll.registry import Registry, iso

GENESIS = "0" * 64
_CHAINED = ("seq", "time", "type", "actor", "actor_roles", "device", "labels", "result", "reason", "fields")

#: Fields that every exported/queried event carries at top level (``null`` when absent).
TOP_FIELDS = ("service", "login", "session", "remote", "bytes_to_device", "bytes_from_device", "duration")
_TOP_SET = frozenset(TOP_FIELDS)

_COLUMNS = ("seq", "time", "type", "actor", "actor_roles", "device", "labels", "result", "reason",
            "fields", "prev_hash", "hash", "labelset")
_INSERT = f"INSERT INTO audit ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


# Reused encoders (json.dumps builds a new one per call when given options): same output.
_chain_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_sorted_json = json.JSONEncoder(sort_keys=True).encode


def _digest(prev_hash: str, row: dict) -> str:
    body = _chain_json([row[k] for k in _CHAINED])
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def _labels_text(labels: dict[str, str] | None) -> str | None:
    return _sorted_json(labels) if labels is not None else None


def _labelset(conn: sqlite3.Connection, text: str | None, cache: dict | None = None) -> int | None:
    """The id of this exact label set in ``audit_labelsets``, added if new."""
    if text is None:
        return None
    if cache is not None and text in cache:
        return cache[text]
    found = conn.execute("SELECT id FROM audit_labelsets WHERE labels = ?", (text,)).fetchone()
    ident = found[0] if found else conn.execute(
        "INSERT INTO audit_labelsets (labels) VALUES (?)", (text,)).lastrowid
    if cache is not None:
        cache[text] = ident
    return ident


def _head(conn: sqlite3.Connection) -> tuple[int, str]:
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return (last[0], last[1]) if last else (0, GENESIS)


def _iso(t: dt.datetime) -> str:
    """:func:`enroll.registry.iso`, faster for the usual UTC datetimes (bulk appends)."""
    if t.tzinfo is dt.UTC and t.year >= 1000:
        return t.isoformat(timespec="microseconds")[:-6] + "Z"
    return iso(t)


def _row(seq: int, prev: str, type: str, *, actor: str, actor_roles: Iterable[str] = (),
         device: str | None = None, labels: dict[str, str] | None = None, result: str = "ok",
         reason: str = "", time: dt.datetime | str | None = None, fields: dict | None = None) -> dict:
    row = {
        "seq": seq,
        "time": time if isinstance(time, str) else _iso(time or dt.datetime.now(dt.UTC)),
        "type": type,
        "actor": actor,
        "actor_roles": json.dumps(sorted(actor_roles)),
        "device": device,
        "labels": _labels_text(labels),
        "result": result,
        "reason": reason,
        "fields": _sorted_json({k: v for k, v in (fields or {}).items() if v is not None}),
    }
    row["prev_hash"] = prev
    row["hash"] = _digest(prev, row)
    return row


def append(
    db: sqlite_utils.Database,
    type: str,
    *,
    actor: str,
    actor_roles: Iterable[str] = (),
    device: str | None = None,
    labels: dict[str, str] | None = None,
    result: str = "ok",
    reason: str = "",
    now: dt.datetime | None = None,
    **fields,
) -> int:
    """Append one event; must run inside ``Registry.write()``. Returns its sequence number.

    ``labels`` are the device's labels at this moment (or a token's, for ``token.create``).
    Extra keyword arguments are stored as event fields; ``None`` values are dropped. Known
    fields: service, login, session, remote, bytes_to_device, bytes_from_device, duration,
    code, stage, and type-specific details.
    """
    conn = db.conn
    if not conn.in_transaction:
        raise RuntimeError("audit.append must run inside Registry.write()")
    seq, prev = _head(conn)
    row = _row(seq + 1, prev, type, actor=actor, actor_roles=actor_roles, device=device,
               labels=labels, result=result, reason=reason, time=now, fields=fields)
    row["labelset"] = _labelset(conn, row["labels"])
    conn.execute(_INSERT, [row[c] for c in _COLUMNS])
    return row["seq"]


def append_many(db: sqlite_utils.Database, events: Iterable[dict], batch: int = 10_000) -> tuple[int, int]:
    """Append many events in one go (imports, benchmarks); must run inside ``Registry.write()``.

    Each event is a dict with ``type``, ``actor`` and optionally ``actor_roles``, ``device``,
    ``labels``, ``result``, ``reason``, ``time`` (datetime or RFC 3339 text as :func:`iso`
    writes it) and ``fields`` (dict). The chain is computed here exactly as :func:`append` does.
    Returns (first seq, last seq); (n+1, n) when ``events`` is empty.
    """
    conn = db.conn
    if not conn.in_transaction:
        raise RuntimeError("audit.append_many must run inside Registry.write()")
    seq, prev = _head(conn)
    first = seq + 1
    cache: dict[str, int | None] = {}
    pending: list[list[object]] = []
    for ev in events:
        seq += 1
        row = _row(seq, prev, ev["type"], actor=ev["actor"], actor_roles=ev.get("actor_roles", ()),
                   device=ev.get("device"), labels=ev.get("labels"), result=ev.get("result", "ok"),
                   reason=ev.get("reason", ""), time=ev.get("time"), fields=ev.get("fields"))
        row["labelset"] = _labelset(conn, row["labels"], cache)
        prev = row["hash"]
        pending.append([row[c] for c in _COLUMNS])
        if len(pending) >= batch:
            conn.executemany(_INSERT, pending)
            pending.clear()
    if pending:
        conn.executemany(_INSERT, pending)
    return first, seq


# --- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    problem: str


@dataclass(frozen=True)
class Head:
    count: int
    seq: int
    hash: str


def parse_anchor(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` as printed by ``tunnel audit verify`` (or stored in an export cursor)."""
    seq, sep, digest = text.strip().partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"bad anchor {text!r}: write it as SEQ:HASH, e.g. 1234:{'ab' * 4}… (64 hex digits)")
    return int(seq), digest


def _seq_with_hash(conn: sqlite3.Connection, digest: str) -> int | None:
    found = conn.execute("SELECT seq FROM audit WHERE hash = ?", (digest,)).fetchone()
    return found[0] if found else None


def _check_link(conn, row: dict, expected_seq: int, prev: str) -> ChainBreak | None:
    """Does ``row`` sit right after the event whose hash is ``prev``? If not, say why."""
    seq = row["seq"]
    if seq != expected_seq:
        missing = f"event {expected_seq}" if seq == expected_seq + 1 else f"events {expected_seq}-{seq - 1}"
        return ChainBreak(expected_seq, f"{missing} missing (deleted): the sequence jumps from "
                                        f"{expected_seq - 1} to {seq}")
    if row["prev_hash"] == prev:
        return None
    owner = _seq_with_hash(conn, row["prev_hash"])
    if owner is not None and owner > seq:
        return ChainBreak(seq, f"out of order (reordered): it belongs after event {owner}")
    intact = _digest(row["prev_hash"], row) == row["hash"]
    if owner is not None and owner < seq - 1 and (
            intact or _digest(row["prev_hash"], {**row, "seq": owner + 1}) == row["hash"]):
        extra = f"event {owner + 1} is" if owner + 1 == seq - 1 else f"events {owner + 1}-{seq - 1} are"
        return ChainBreak(owner + 1, f"inserted: {extra} not in the chain (event {seq} follows "
                                     f"event {owner})")
    if not intact:
        return ChainBreak(seq, "does not follow the event before it and does not match its own hash: "
                               "forged, or renumbered after an event before it was deleted")
    if seq > 1:
        return ChainBreak(seq - 1, f"edited: its hash was recomputed, but event {seq} still points "
                                   "at the original")
    return ChainBreak(seq, "does not start the chain (the first event's previous hash must be zeros)")


def _handle(source: sqlite_utils.Database | Registry) -> sqlite_utils.Database:
    """The database of a :class:`enroll.registry.Registry`, or ``source`` itself when it is
    already one (a write transaction's handle): read functions take either."""
    return source._db if isinstance(source, Registry) else source


def verify(db: sqlite_utils.Database | Registry, anchor: tuple[int, str] | None = None) -> ChainBreak | None:
    """Walk the chain; return the first event that was edited, inserted, removed or reordered.

    With ``anchor`` (seq, hash) — taken from an earlier verify or an export — also report a chain
    that was cut short or rewritten up to that event.
    """
    db = _handle(db)
    conn = db.conn
    labelsets = dict(conn.execute("SELECT id, labels FROM audit_labelsets"))
    prev, expected_seq = GENESIS, 1
    cur = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM audit ORDER BY seq")
    while chunk := cur.fetchmany(5000):
        for values in chunk:
            row = dict(zip(_COLUMNS, values, strict=True))
            broken = _check_link(conn, row, expected_seq, prev)
            if broken:
                return broken
            if _digest(prev, row) != row["hash"]:
                return ChainBreak(row["seq"], "edited: its content does not match its hash")
            if labelsets.get(row["labelset"]) != row["labels"]:
                return ChainBreak(row["seq"], "label index edited: the label set it points at is not "
                                              "its labels")
            if anchor and row["seq"] == anchor[0] and row["hash"] != anchor[1]:
                return ChainBreak(row["seq"], "does not match the anchor: the chain up to here was "
                                              "rewritten")
            prev, expected_seq = row["hash"], expected_seq + 1
    if anchor and anchor[0] >= expected_seq:
        missing = f"event {expected_seq}" if anchor[0] == expected_seq else f"events {expected_seq}-{anchor[0]}"
        return ChainBreak(expected_seq, f"{missing} missing (deleted): the log was truncated, it ends "
                                        f"at event {expected_seq - 1} but the anchor says event "
                                        f"{anchor[0]} was recorded")
    return None


def tip(db: sqlite_utils.Database | Registry) -> tuple[int, str]:
    """(seq, hash) of the last event — an anchor — without counting the log; (0, zeros) if empty."""
    db = _handle(db)
    return _head(db.conn)


# --- anchors -----------------------------------------------------------------------------------

#: The file the proxy appends anchors to, in ``tunnel proxy --anchor-dir DIR``.
ANCHOR_FILE = "audit-anchors.jsonl"
#: Export anchors go beside the export: ``OUTPUT`` + this suffix.
EXPORT_ANCHOR_SUFFIX = ".anchors.jsonl"


def anchor_record(seq: int, digest: str, *, fleet: str | None = None,
                  now: dt.datetime | None = None) -> dict:
    """One anchor as written to an anchor file: ``anchor`` is the ``SEQ:HASH`` verify takes."""
    return {"anchor": f"{seq}:{digest}", "seq": seq, "hash": digest, "fleet": fleet,
            "time": _iso(now or dt.datetime.now(dt.UTC))}


def append_anchor(path, seq: int, digest: str, *, fleet: str | None = None,
                  now: dt.datetime | None = None) -> dict:
    """Append one anchor line to ``path`` (JSON lines, created 0644) and fsync it.

    Append-only on purpose: the file works on append-only storage (``chattr +a``, a WORM
    mount) and each line can be shipped as it is written (syslog, a SIEM, another host).
    """
    import os

    rec = anchor_record(seq, digest, fleet=fleet, now=now)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return rec


def anchor_from_text(text: str) -> tuple[int, str]:
    """The anchor in ``text``: ``SEQ:HASH``, or the content of a file that holds anchors.

    Accepted files: an anchor file (JSON lines), an export cursor (JSON with seq and hash), an
    export output (JSON lines of events) or lines of ``SEQ:HASH``. Of several anchors the one
    with the highest seq counts: the chain links every event to the one before, so matching it
    implies matching every earlier anchor, and a log that was cut and has grown again since is
    still caught (at that seq, by its hash). Raises ValueError saying what was expected.
    """
    text = text.strip()
    try:
        whole = json.loads(text) if text.startswith("{") else None
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        lines: list = [whole]
    else:
        lines = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue  # a half-written line
            elif line:
                lines.append(line)
    best: tuple[int, str] | None = None
    for found in lines:
        if isinstance(found, dict):
            if "seq" not in found or "hash" not in found:
                continue
            found = f"{found['seq']}:{found['hash']}"
        anchor = parse_anchor(str(found))
        if best is None or anchor[0] > best[0]:
            best = anchor
    if best is None:
        raise ValueError("no anchor found: expected SEQ:HASH, an anchor file (audit-anchors.jsonl), "
                         "an export cursor or an export output")
    return best


def head(db: sqlite_utils.Database | Registry) -> Head:
    db = _handle(db)
    seq, digest = _head(db.conn)
    count = db.conn.execute("SELECT count(*) FROM audit").fetchone()[0]
    return Head(count, seq, digest)


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event read back from the log (:func:`events`, :func:`query`, :func:`export_rows`).

    ``fields`` holds everything else recorded with it, as appended (``session``, ``remote``,
    ``stage``, …); :attr:`details` is the part of it that has no top-level column in the stable
    record. :meth:`as_record` is that record: what ``tunnel audit query`` prints and ``tunnel
    audit export`` writes, one JSON object per event, its keys in a fixed order.
    """

    seq: int
    time: str
    type: str
    actor: str
    actor_roles: tuple[str, ...]
    device: str | None
    labels: dict[str, str] | None
    result: str | None
    reason: str | None
    fields: dict[str, Any]
    prev_hash: str
    hash: str

    def field(self, key: str) -> Any:
        """One recorded field (``session``, ``stage``, …), or None when the event has none."""
        return self.fields.get(key)

    @property
    def details(self) -> dict[str, Any]:
        """The recorded fields that are not top-level keys of :meth:`as_record`."""
        return {k: v for k, v in self.fields.items() if k not in _TOP_SET}

    def as_record(self) -> dict[str, Any]:
        """The stable record (see :data:`TOP_FIELDS`): ``null`` for a top field not recorded.

        Spelled out key by key (it runs once per exported event): the same keys, in the same
        order, as ``TOP_FIELDS`` puts them between ``labels`` and ``result``.
        """
        get = self.fields.get
        return {
            "seq": self.seq, "time": self.time, "type": self.type, "actor": self.actor,
            "actor_roles": list(self.actor_roles), "device": self.device, "labels": self.labels,
            "service": get("service"), "login": get("login"), "session": get("session"),
            "remote": get("remote"), "bytes_to_device": get("bytes_to_device"),
            "bytes_from_device": get("bytes_from_device"), "duration": get("duration"),
            "result": self.result, "reason": self.reason,
            "details": {k: v for k, v in self.fields.items() if k not in _TOP_SET},
            "prev_hash": self.prev_hash, "hash": self.hash,
        }


def events(db: sqlite_utils.Database | Registry, *types: str) -> list[AuditEvent]:
    """Events in order; optionally only the given types."""
    db = _handle(db)
    sql, params = f"SELECT {', '.join(_COLUMNS)} FROM audit", []
    if types:
        sql += f" WHERE type IN ({','.join('?' * len(types))})"
        params = list(types)
    cache: dict[str, dict] = {}
    return [event_of(dict(zip(_COLUMNS, values, strict=True)), cache)
            for values in db.conn.execute(sql + " ORDER BY seq", params)]


def recorded_types(db: sqlite_utils.Database | Registry) -> list[str]:
    """Every event type present in the log (a skip-scan of the type index: cheap at any size)."""
    db = _handle(db)
    sql = ("WITH RECURSIVE t(type) AS (SELECT min(type) FROM audit UNION ALL "
           "SELECT (SELECT min(type) FROM audit WHERE type > t.type) FROM t WHERE t.type IS NOT NULL) "
           "SELECT type FROM t WHERE type IS NOT NULL")
    return [r[0] for r in db.conn.execute(sql)]


def resolve_types(db: sqlite_utils.Database | Registry, patterns: Iterable[str]) -> list[str]:
    """Event type names from ``--event`` values: exact names, comma lists or globs (``device.*``).

    Known are :data:`EVENT_TYPES` and any type already recorded. Raises ValueError naming the
    first value that matches none.
    """
    db = _handle(db)
    out: list[str] = []
    recorded: list[str] | None = None
    for value in patterns:
        for name in (p.strip() for p in value.split(",")):
            if not name:
                continue
            if name in EVENT_TYPES:
                hits = [name]
            else:
                if recorded is None:
                    recorded = recorded_types(db)
                known = list(EVENT_TYPES) + [t for t in recorded if t not in EVENT_TYPES]
                hits = [t for t in known if fnmatch.fnmatchcase(t, name)]
            if not hits:
                raise ValueError(f"unknown event type {name!r}: use one of {', '.join(EVENT_TYPES)} "
                                 "(or a pattern such as 'device.*')")
            out += [h for h in hits if h not in out]
    return out


def _in(column: str, values: list, indexed: bool) -> tuple[str, list]:
    col = column if indexed else f"+{column}"
    return f"{col} IN ({','.join('?' * len(values))})", list(values)


def query(
    db: sqlite_utils.Database | Registry,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    types: Iterable[str] = (),
    actor: str | None = None,
    device: str | None = None,
    selector: Selector | None = None,
) -> Iterator[AuditEvent]:
    """Events matching every given filter, oldest first.

    ``selector`` matches the labels the event recorded — the device's labels at that moment, not
    its labels now. Events without labels never match a non-empty selector. ``since`` is
    inclusive, ``until`` inclusive.
    """
    db = _handle(db)
    conn = db.conn
    types = list(types)
    labelset_ids: list[int] | None = None
    cache: dict[str, dict] = {}
    labelsets: dict[int, dict] = {}
    for ident, text in conn.execute("SELECT id, labels FROM audit_labelsets"):
        labelsets[ident] = cache[text] = json.loads(text)
    if selector is not None and selector.terms:
        labelset_ids = [i for i, labels in labelsets.items() if selector.matches(labels)]
        if not labelset_ids:
            return
    # Choose the index (the most selective filter given) and keep SQLite off the others with '+'.
    if device is not None:
        use = "device"
    elif labelset_ids is not None and len(labelset_ids) <= max(1, len(labelsets) // 2):
        use = "labelset"
    elif actor is not None:
        use = "actor"
    elif types:
        use = "type"
    else:
        use = "time"
    where: list[str] = []
    params: list = []
    if device is not None:
        where.append("device = ?" if use == "device" else "+device = ?")
        params.append(device)
    if labelset_ids is not None:
        col = "labelset" if use == "labelset" else "+labelset"
        where.append(f"{col} IN ({','.join(map(str, sorted(labelset_ids)))})")  # ints from the db
    if actor is not None:
        where.append("actor = ?" if use == "actor" else "+actor = ?")
        params.append(actor)
    if types:
        clause, values = _in("type", types, use == "type")
        where.append(clause)
        params += values
    if since is not None:
        where.append("time >= ?")
        params.append(iso(since))
    if until is not None:
        where.append("time <= ?")
        params.append(iso(until))
    sql = f"SELECT {', '.join(_COLUMNS)} FROM audit"
    if where:
        sql += " WHERE " + " AND ".join(where)
    cur = conn.execute(sql + " ORDER BY seq", params)
    while chunk := cur.fetchmany(2000):
        for values in chunk:
            yield event_of(dict(zip(_COLUMNS, values, strict=True)), cache)


def query_plan(db: sqlite_utils.Database | Registry, **filters) -> str:
    """The SQLite plan of :func:`query` for these filters (tests, benchmarks)."""
    db = _handle(db)
    captured: list[str] = []
    conn = db.conn
    conn.set_trace_callback(captured.append)
    try:
        next(query(db, **filters), None)
    finally:
        conn.set_trace_callback(None)
    sql = next((s for s in captured if s.startswith("SELECT seq")), None)
    if sql is None:
        return ""
    return "\n".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql))


def event_of(row: dict, cache: dict[str, dict] | None = None) -> AuditEvent:
    """One stored ``audit`` row (its columns by name) decoded.

    ``cache`` (labels text → decoded dict) saves decoding the same label set again and again;
    events decoded with one cache share their label dicts (read them, never change them).
    """
    text = row["labels"]
    if text is None:
        labels = None
    elif cache is not None:
        labels = cache.get(text)
        if labels is None:
            labels = cache[text] = json.loads(text)
    else:
        labels = json.loads(text)
    return AuditEvent(
        row["seq"], row["time"], row["type"], row["actor"],
        tuple(json.loads(row["actor_roles"])) if row["actor_roles"] else (), row["device"], labels,
        row["result"], row["reason"], json.loads(row["fields"]) if row["fields"] else {},
        row["prev_hash"], row["hash"],
    )


# --- export ------------------------------------------------------------------------------------


class ExportError(FleetError, RuntimeError, code="export"):
    """The export cannot continue from where it stopped; the message says what to do."""


def export_rows(db: sqlite_utils.Database | Registry, after: int, after_hash: str | None = None,
                limit: int | None = None) -> Iterator[AuditEvent]:
    """Events after sequence number ``after``, oldest first, checked link by link.

    ``after_hash`` is the hash of event ``after`` as exported last time; if the log no longer has
    it, the log was rewritten since, and ExportError says so. An event that does not fit the chain
    stops the export with ExportError *after* every good event before it was yielded.
    """
    db = _handle(db)
    conn = db.conn
    cache: dict[str, dict] = {}
    if after > 0:
        found = conn.execute("SELECT hash FROM audit WHERE seq = ?", (after,)).fetchone()
        if found is None:
            raise ExportError(f"the audit log has no event {after} any more (last export ended there): "
                              "run 'tunnel audit verify'")
        prev = found[0]
        if after_hash is not None and prev != after_hash:
            raise ExportError(f"event {after} changed since it was exported: run 'tunnel audit verify'")
    else:
        prev = GENESIS
    sql = f"SELECT {', '.join(_COLUMNS)} FROM audit WHERE seq > ? ORDER BY seq"
    params: list = [after]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    cur = conn.execute(sql, params)
    expected = after + 1
    while chunk := cur.fetchmany(2000):
        for values in chunk:
            row = dict(zip(_COLUMNS, values, strict=True))
            broken = _check_link(conn, row, expected, prev)
            if broken is None and _digest(prev, row) != row["hash"]:
                broken = ChainBreak(row["seq"], "edited: its content does not match its hash")
            if broken:
                raise ExportError(f"audit chain broken at event {broken.seq}: {broken.problem}; "
                                  "exported everything before it — run 'tunnel audit verify'")
            yield event_of(row, cache)
            prev, expected = row["hash"], expected + 1


# --- session pairing ---------------------------------------------------------------------------


def close_open_sessions(db: sqlite_utils.Database, reason: str, *, now: dt.datetime | None = None) -> list[str]:
    """Append a ``session.end`` for every ``session.start`` that has none; return their ids.

    For the proxy's start-up: no session outlives the proxy process, so one left open was cut
    by a crash or ``kill -9``. Each end repeats its start's actor, device, labels, service,
    login, session and remote (so a query for either finds both), with ``result=error`` and
    ``reason``. Must run inside ``Registry.write()``.
    """
    rows = db.conn.execute(
        "SELECT actor, actor_roles, device, labels, fields FROM audit WHERE type = 'session.start' "
        "AND json_extract(fields, '$.session') IS NOT NULL "
        "AND json_extract(fields, '$.session') NOT IN ("
        "  SELECT json_extract(fields, '$.session') FROM audit WHERE type = 'session.end'"
        "  AND json_extract(fields, '$.session') IS NOT NULL) "
        "ORDER BY seq").fetchall()
    closed = []
    for actor, roles, device, labels, fields in rows:
        start = json.loads(fields)
        kept = {k: start[k] for k in ("service", "requested", "login", "session", "remote") if k in start}
        append(db, "session.end", actor=actor, actor_roles=json.loads(roles), device=device,
               labels=json.loads(labels) if labels is not None else None, result="error",
               reason=reason, now=now, **kept)
        closed.append(start["session"])
    return closed


# --- export crash recovery ---------------------------------------------------------------------


def _cut_partial_line(path) -> tuple[int, str] | None:
    """Cut a half-written last line; return (seq, hash) of the last whole event in the file."""
    import os

    if not os.path.exists(path):
        return None
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        start = max(0, size - 65536)
        f.seek(start)
        tail = f.read()
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n")
            f.truncate(start + cut + 1 if cut >= 0 else start)
            f.flush()
            os.fsync(f.fileno())
            tail = tail[: cut + 1] if cut >= 0 else b""
    lines = tail.splitlines()
    if not lines:
        return None
    try:
        last = json.loads(lines[-1])
        return int(last["seq"]), str(last["hash"])
    except (ValueError, KeyError, TypeError):
        return None


def resume_export(db: sqlite_utils.Database | Registry, path, after: int) -> tuple[int, str] | None:
    """Where an export appending to ``path`` resumes when a previous run died after writing
    events but before saving its cursor (``after``): the last whole event in the file, if it
    is beyond ``after`` and is that very event of this log (same hash). A half-written last
    line is cut off first. None: resume at ``after``.
    """
    db = _handle(db)
    found = _cut_partial_line(path)
    if not found or found[0] <= after:
        return None
    row = db.execute("SELECT hash FROM audit WHERE seq = ?", [found[0]]).fetchone()
    return found if row and row[0] == found[1] else None


def is_session_start(db: sqlite_utils.Database | Registry, seq: int, session: str) -> bool:
    """Whether event ``seq`` is the ``session.start`` of ``session`` (so its end may pair)."""
    db = _handle(db)
    row = db.execute("SELECT type, fields FROM audit WHERE seq = ?", [seq]).fetchone()
    return row is not None and row[0] == "session.start" and json.loads(row[1] or "{}").get("session") == session
