"""Audit log benchmark: query time over 1 million events, and events written per second.

A fleet state with a registry of N synthetic events (default 1,000,000; ``--quick``: 100,000)
over the last 365 days: 2,000 devices of 10 customers × 5 sites (so ``customer=acme,site=dal``
is 2% of devices), 100 engineers, a realistic mix of sessions, connects, migrations and
refusals, and 5% of devices relabelled (moved site) half-way. The events are bulk-inserted with
the chain computed directly (``enroll.audit.append_many``), then the chain is verified.

Measured:
- query time (library call, all rows decoded) for the selector query of the issue, with and
  without an event type, by user and by device — target < 1 s;
- the same selector query as the real CLI, ``tunnel audit query ... --format jsonl``, wall
  time including Python start-up;
- events written per second, one transaction each with synchronous=FULL (the proxy's pattern,
  one fsync per event), and bulk (append_many);
- verify and export throughput.

Run: ``python bench/cases/audit.py [--quick] [--events N]`` (prints a table, writes
bench/out/audit.json), or ``run(quick)`` from a bench runner.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from enroll import audit  # noqa: E402
from enroll.labels import parse_selector  # noqa: E402
from enroll.state import FleetState  # noqa: E402

CUSTOMERS = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "tyrell",
             "cyberdyne"]
SITES = ["dal", "hou", "aus", "sea", "nyc"]
SERVICES = ["ssh", "ssh", "ssh", "postgres", "kube"]
MIX = [  # (type, weight)
    ("session.start", 30), ("session.end", 30), ("device.connect", 9), ("device.disconnect", 9),
    ("device.migrate", 8), ("device.reconnect", 5), ("access.denied", 6), ("cert.issue", 1),
    ("device.lock", 1), ("device.unlock", 1),
]
SELECTOR = "customer=acme,site=dal"


def device_labels(i: int, moved: bool = False) -> dict[str, str]:
    site = SITES[((i // 10) + (1 if moved else 0)) % len(SITES)]
    return {"customer": CUSTOMERS[i % len(CUSTOMERS)], "site": site, "fw": f"1.{i % 7}",
            "lifecycle": "active"}


def synthetic_events(n: int, *, devices: int = 2000, users: int = 100, days: int = 365,
                     seed: int = 7, end: dt.datetime | None = None):
    """``n`` events, oldest first, spread evenly over ``days`` days up to ``end`` (now)."""
    rng = random.Random(seed)
    end = end or dt.datetime.now(dt.UTC)
    start = end - dt.timedelta(days=days)
    step = (end - start) / max(n, 1)
    movers = set(rng.sample(range(devices), devices // 20))
    types, weights = zip(*MIX, strict=True)
    choices = rng.choices(types, weights, k=n)
    roles = {u: ["admin"] if u % 10 == 0 else [f"ops-{CUSTOMERS[u % len(CUSTOMERS)]}"] for u in range(users)}
    for k in range(n):
        when = start + step * k
        i = rng.randrange(devices)
        labels = device_labels(i, moved=i in movers and k > n // 2)
        ev_type = choices[k]
        ev = {"type": ev_type, "time": when, "device": f"robot-{i:05d}", "labels": labels}
        remote = f"198.51.100.{i % 250 + 1}:{40000 + k % 20000}"
        if ev_type.startswith("session.") or ev_type == "access.denied":
            u = rng.randrange(users)
            ev.update(actor=f"user:eng-{u:03d}", actor_roles=roles[u])
            fields = {"service": rng.choice(SERVICES), "login": "root", "session": f"{k:016x}",
                      "remote": f"203.0.113.{u % 250 + 1}:{50000 + k % 10000}"}
            if ev_type == "session.end":
                fields.update(bytes_to_device=rng.randrange(1 << 20),
                              bytes_from_device=rng.randrange(1 << 22),
                              duration=round(rng.uniform(1, 3600), 3))
            if ev_type == "access.denied":
                ev.update(result="denied", reason="device is locked")
                fields.update(code="locked", stage="dial")
            ev["fields"] = fields
        elif ev_type in ("device.lock", "device.unlock"):
            ev.update(actor="admin", fields={"message": "maintenance"})
        elif ev_type == "cert.issue":
            ev.update(actor=f"device:robot-{i:05d}", fields={"kind": "device", "serial": f"{k:x}",
                                                            "renewal": True})
        else:
            ev.update(actor=f"device:robot-{i:05d}", fields={"remote": remote})
        yield ev


def build(state: FleetState, n: int, **kw) -> float:
    """Fill the state's registry with ``n`` synthetic events; return events written per second."""
    with state.registry() as reg:
        with reg.write() as db:  # a connection setting; write() is the way to the handle
            db.conn.execute("PRAGMA cache_size=-400000")  # this connection only: 400 MB of pages
        t0 = time.perf_counter()
        events = synthetic_events(n, **kw)
        done = 0
        while done < n:
            chunk = min(100_000, n - done)
            with reg.write() as db:
                audit.append_many(db, (next(events) for _ in range(chunk)))
            done += chunk
        elapsed = time.perf_counter() - t0
    return n / elapsed


def _timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def run(quick: bool = False, events: int | None = None) -> list[dict]:
    n = events or (100_000 if quick else 1_000_000)
    label = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        state = FleetState.create(Path(tmp) / "state", fleet="bench-fleet", proxy_name="proxy.test",
                                  proxy_ips=["127.0.0.1"])
        rate = build(state, n)
        rows.append({"metric": f"audit events written, bulk append_many ({label} events)",
                     "value": round(rate), "unit": "events/s", "target": "-"})
        now = dt.datetime.now(dt.UTC)
        since = now - dt.timedelta(days=90)
        selector = parse_selector(SELECTOR)
        with state.registry() as reg:
            db = reg
            cases = [
                (f"audit query, {label} events, selector {SELECTOR}, 90 days",
                 dict(since=since, selector=selector)),
                (f"audit query, {label} events, selector {SELECTOR}, 90 days, session.start",
                 dict(since=since, selector=selector, types=["session.start"])),
                (f"audit query, {label} events, --user eng-007, 90 days",
                 dict(since=since, actor="user:eng-007")),
                (f"audit query, {label} events, --device robot-00042, 90 days",
                 dict(since=since, device="robot-00042")),
                (f"audit query, {label} events, 'customer in (acme,globex)' site!=dal, 7 days",
                 dict(since=now - dt.timedelta(days=7),
                      selector=parse_selector(["customer in (acme,globex)", "site!=dal"]))),
            ]
            for metric, filters in cases:
                seconds, found = _timed(lambda f=filters: list(audit.query(db, **f)))
                rows.append({"metric": f"{metric} ({len(found)} events returned)",
                             "value": round(seconds, 3), "unit": "s", "target": "< 1 s"})
            # one transaction (and one fsync) per event, as the proxy writes them
            k = 200 if quick else 1000
            t0 = time.perf_counter()
            for j in range(k):
                with reg.write() as w:
                    audit.append(w, "session.start", actor="user:bench", actor_roles=["admin"],
                                 device="robot-00001", labels=device_labels(1), service="ssh",
                                 login="root", session=f"bench{j}", remote="127.0.0.1:1")
            rate = k / (time.perf_counter() - t0)
            rows.append({"metric": "audit events written, one transaction each (synchronous=FULL)",
                         "value": round(rate), "unit": "events/s", "target": "-"})
            t0 = time.perf_counter()
            broken = audit.verify(db)
            seconds = time.perf_counter() - t0
            assert broken is None, broken
            rows.append({"metric": f"audit verify, {label} events", "value": round(seconds, 2),
                         "unit": "s", "target": "-"})
            t0 = time.perf_counter()
            count = sum(1 for _ in audit.export_rows(db, 0))
            rate = count / (time.perf_counter() - t0)
            rows.append({"metric": "audit export (decode + chain check)", "value": round(rate),
                         "unit": "events/s", "target": "-"})
        argv = [sys.executable, "-m", "tunnel.cli", "audit", "query", "--state", str(state.root),
                "--since", "90d", *SELECTOR.split(","), "--format", "jsonl"]

        def cli():
            out = subprocess.run(argv, cwd=ROOT, capture_output=True, check=True)
            return out.stdout.count(b"\n")

        seconds, lines = _timed(cli)
        rows.append({"metric": f"tunnel audit query --since 90d {SELECTOR} --format jsonl, {label} "
                               f"events, wall time incl. start-up ({lines} lines)",
                     "value": round(seconds, 3), "unit": "s", "target": "< 1 s"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k events instead of 1M")
    parser.add_argument("--events", type=int, help="number of events (overrides --quick)")
    args = parser.parse_args()
    rows = run(args.quick, args.events)
    width = max(len(r["metric"]) for r in rows)
    print(f"{'metric'.ljust(width)}  {'value':>10}  unit      target")
    for r in rows:
        print(f"{r['metric'].ljust(width)}  {r['value']:>10}  {r['unit'].ljust(8)}  {r['target']}")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out / 'audit.json'}")


if __name__ == "__main__":
    main()
