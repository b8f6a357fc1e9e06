"""Append audit events to the registry, hash-chained so tampering is detectable.

Callers append inside the same write transaction as the change they record (see
``Registry.write``), so the change and its event commit together or not at all. Each event stores
the hash of the one before it; :func:`verify` walks the chain and names the first event that does
not fit. Event types are stable names such as ``device.enroll`` or ``access.denied``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

import sqlite_utils

from enroll.registry import iso

GENESIS = "0" * 64
_CHAINED = ("seq", "time", "type", "actor", "actor_roles", "device", "labels", "result", "reason", "fields")


def _digest(prev_hash: str, row: dict) -> str:
    body = json.dumps([row[k] for k in _CHAINED], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


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
    """Append one event; must run inside ``Registry.write()``. Returns its sequence number."""
    if not db.conn.in_transaction:
        raise RuntimeError("audit.append must run inside Registry.write()")
    last = list(db.query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"))
    seq, prev = (last[0]["seq"] + 1, last[0]["hash"]) if last else (1, GENESIS)
    row = {
        "seq": seq,
        "time": iso(now or dt.datetime.now(dt.UTC)),
        "type": type,
        "actor": actor,
        "actor_roles": json.dumps(sorted(actor_roles)),
        "device": device,
        "labels": json.dumps(labels, sort_keys=True) if labels is not None else None,
        "result": result,
        "reason": reason,
        "fields": json.dumps({k: v for k, v in fields.items() if v is not None}, sort_keys=True),
    }
    row["prev_hash"] = prev
    row["hash"] = _digest(prev, row)
    db["audit"].insert(row)
    return seq


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    problem: str


def verify(db: sqlite_utils.Database) -> ChainBreak | None:
    """Walk the chain; return the first event that was edited, inserted, removed or reordered."""
    prev, expected_seq = GENESIS, 1
    for row in db.query("SELECT * FROM audit ORDER BY seq"):
        if row["seq"] != expected_seq:
            return ChainBreak(row["seq"], f"sequence jumps from {expected_seq - 1} to {row['seq']}")
        if row["prev_hash"] != prev:
            return ChainBreak(row["seq"], "does not follow the event before it")
        if _digest(prev, row) != row["hash"]:
            return ChainBreak(row["seq"], "content does not match its hash (edited)")
        prev, expected_seq = row["hash"], expected_seq + 1
    return None


def events(db: sqlite_utils.Database, *types: str) -> list[dict]:
    """Events in order, decoded; optionally only the given types."""
    sql, params = "SELECT * FROM audit", []
    if types:
        sql += f" WHERE type IN ({','.join('?' * len(types))})"
        params = list(types)
    out = []
    for row in db.query(sql + " ORDER BY seq", params):
        row = dict(row)
        row["actor_roles"] = json.loads(row["actor_roles"])
        row["labels"] = json.loads(row["labels"]) if row["labels"] else None
        row["fields"] = json.loads(row["fields"])
        out.append(row)
    return out
