"""Audit log: the chain and every kind of tampering, queries, export/resume, CLI input errors.

The end-to-end flows (events produced by the real proxy, agent and enroll commands; kill -9)
are in test_audit_flows.py. Here events come from ``audit.append`` / ``append_many`` — the same
code the producers call — on a real registry.
"""

import dataclasses
import datetime as dt
import importlib.util
import json
import sqlite3
from pathlib import Path

import pytest
from fleet_harness import raw_registry, table_rows

from enroll import audit, registry
from enroll.labels import parse_selector
from enroll.registry import Registry, iso
from enroll.state import FleetState
from tunnel.cli import main as tunnel_main

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_audit", ROOT / "bench" / "cases" / "audit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def state(tmp_path):
    return FleetState.create(tmp_path / "state", fleet="acme-fleet", proxy_name="proxy.test",
                             proxy_ips=["127.0.0.1"])


@pytest.fixture
def cli(state, capsys):
    def run(*args):
        status = tunnel_main(["audit", *map(str, args[:1]), "--state", str(state.root), *map(str, args[1:])])
        out, err = capsys.readouterr()
        return status, out, err

    return run


DAL = {"customer": "acme", "site": "dal", "lifecycle": "active"}


def add(state, n=10, **kw):
    """n session.start events for robot-1 (labels DAL); returns their seqs."""
    seqs = []
    with state.registry() as reg:
        for i in range(n):
            with reg.write() as db:
                seqs.append(audit.append(db, "session.start", actor="user:ops", actor_roles=["admin"],
                                         device="robot-1", labels=kw.get("labels", DAL), service="ssh",
                                         login="root", session=f"s{i}", remote="127.0.0.1:5000"))
    return seqs


def tamper(state, *sql_and_params):
    """What an attacker with the database file does: drop the triggers, then write."""
    conn = sqlite3.connect(state.registry_path)
    for name, in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    for sql, *params in sql_and_params:
        conn.execute(sql, *params)
    conn.commit()
    conn.close()


def row(state, seq):
    with raw_registry(state) as db:
        values = db.conn.execute(f"SELECT {', '.join(audit._COLUMNS)} FROM audit WHERE seq = ?",
                                     (seq,)).fetchone()
    return dict(zip(audit._COLUMNS, values, strict=True))


def check(state):
    with state.registry() as reg:
        return audit.verify(reg)


# --- writing ---------------------------------------------------------------------------------


def test_append_fields_sequence_time_and_chain(state):
    seqs = add(state, 3)
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    with state.registry() as reg:
        recs = list(audit.query(reg, device="robot-1"))
    assert [r.seq for r in recs] == seqs
    first = recs[0]
    assert dt.datetime.fromisoformat(first.time).tzinfo == dt.UTC  # RFC 3339, UTC
    assert first.time.endswith("Z")
    assert (first.actor, first.actor_roles, first.labels) == ("user:ops", ("admin",), DAL)
    assert tuple(first.field(k) for k in ("service", "login", "session", "remote")) == \
        ("ssh", "root", "s0", "127.0.0.1:5000")
    assert recs[1].prev_hash == first.hash and recs[2].prev_hash == recs[1].hash
    assert check(state) is None


def test_append_only_triggers(state):
    seq = add(state, 2)[0]
    with raw_registry(state, writable=True) as db, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.conn.execute("UPDATE audit SET reason = 'x' WHERE seq = ?", (seq,))
    with raw_registry(state, writable=True) as db, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.conn.execute("DELETE FROM audit WHERE seq = ?", (seq,))
    with raw_registry(state, writable=True) as db, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.conn.execute("DELETE FROM audit_labelsets")
    r = row(state, seq)
    r["seq"] = seq + 10
    with raw_registry(state, writable=True) as db, pytest.raises(sqlite3.IntegrityError, match="next sequence"):
        db.conn.execute(audit._INSERT, [r[c] for c in audit._COLUMNS])
    with raw_registry(state, writable=True) as db, pytest.raises(RuntimeError, match="inside Registry.write"):
        audit.append(db, "session.start", actor="x")
    assert check(state) is None


def test_events_read_back_are_typed_records_with_the_stable_json_shape(state):
    add(state, 1)
    with state.registry() as reg:
        ev = audit.events(reg)[-1]
        assert [e.seq for e in audit.query(reg)] == [e.seq for e in audit.export_rows(reg, 0)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.reason = "rewritten"  # type: ignore[misc]
    record = ev.as_record()
    assert list(record) == ["seq", "time", "type", "actor", "actor_roles", "device", "labels",
                            *audit.TOP_FIELDS, "result", "reason", "details", "prev_hash", "hash"]
    assert record["session"] == ev.field("session") == "s0" and record["actor_roles"] == ["admin"]
    assert not set(record["details"]) & set(audit.TOP_FIELDS) and ev.details == record["details"]


def test_append_many_continues_the_chain(state):
    add(state, 2)
    with state.registry() as reg:
        with reg.write() as db:
            first, last = audit.append_many(db, [
                {"type": "device.connect", "actor": "device:robot-2", "device": "robot-2",
                 "labels": DAL, "fields": {"remote": "127.0.0.1:1"}}] * 5)
        assert last == first + 4
        assert audit.verify(reg) is None
    add(state, 1)
    assert check(state) is None


# --- verify: every kind of tampering ---------------------------------------------------------


def _rehash(r, prev=None):
    r = dict(r)
    if prev is not None:
        r["prev_hash"] = prev
    r["hash"] = audit._digest(r["prev_hash"], r)
    return r


def test_verify_edited(state, cli):
    k = add(state, 10)[4]
    tamper(state, ("UPDATE audit SET actor = 'user:nobody' WHERE seq = ?", (k,)))
    broken = check(state)
    assert broken.seq == k and "edited" in broken.problem
    status, _, err = cli("verify")
    assert status == 1 and f"broken at event {k}: edited" in err and len(err.splitlines()) == 1


def test_verify_edited_and_rehashed(state):
    k = add(state, 10)[4]
    r = row(state, k)
    r["reason"] = "nothing happened"
    r = _rehash(r)
    tamper(state, ("UPDATE audit SET reason = ?, hash = ? WHERE seq = ?", (r["reason"], r["hash"], k)))
    broken = check(state)
    assert broken.seq == k and "edited" in broken.problem and "recomputed" in broken.problem


def test_verify_deleted(state):
    k = add(state, 10)[4]
    tamper(state, ("DELETE FROM audit WHERE seq = ?", (k,)))
    broken = check(state)
    assert broken.seq == k and "deleted" in broken.problem


def test_verify_deleted_and_renumbered(state):
    k = add(state, 10)[4]
    tamper(state, ("DELETE FROM audit WHERE seq = ?", (k,)),
           ("UPDATE audit SET seq = -(seq - 1) WHERE seq > ?", (k,)),
           ("UPDATE audit SET seq = -seq WHERE seq < 0",))
    broken = check(state)
    assert broken.seq == k and "deleted" in broken.problem


def test_verify_inserted(state):
    seqs = add(state, 10)
    k = seqs[4]
    forged = _rehash({**row(state, k), "seq": k, "actor": "user:alibi", "session": "forged"},
                     prev=row(state, k - 1)["hash"])
    tamper(state, ("UPDATE audit SET seq = -(seq + 1) WHERE seq >= ?", (k,)),
           ("UPDATE audit SET seq = -seq WHERE seq < 0",),
           (audit._INSERT, [forged[c] for c in audit._COLUMNS]))
    broken = check(state)
    assert broken.seq == k and "inserted" in broken.problem


def test_verify_appended_forgery_without_the_chain(state):
    last = add(state, 3)[-1]
    forged = {**row(state, last), "seq": last + 1, "actor": "user:alibi"}
    tamper(state, (audit._INSERT, [forged[c] for c in audit._COLUMNS]))
    broken = check(state)
    assert broken.seq == last + 1


def test_verify_reordered(state):
    k = add(state, 10)[4]
    tamper(state, ("UPDATE audit SET seq = -1 WHERE seq = ?", (k,)),
           ("UPDATE audit SET seq = ? WHERE seq = ?", (k, k + 1)),
           ("UPDATE audit SET seq = ? WHERE seq = -1", (k + 1,)))
    broken = check(state)
    assert broken.seq == k and "reordered" in broken.problem


def test_verify_label_index_edited(state):
    k = add(state, 5)[2]
    add(state, 1, labels={"customer": "globex", "site": "hou", "lifecycle": "active"})
    with raw_registry(state) as db:
        other = db.conn.execute("SELECT id FROM audit_labelsets WHERE labels LIKE '%globex%'").fetchone()[0]
    tamper(state, ("UPDATE audit SET labelset = ? WHERE seq = ?", (other, k)))
    broken = check(state)
    assert broken.seq == k and "label index" in broken.problem


def test_verify_truncation_and_rewrite_need_an_anchor(state, cli):
    seqs = add(state, 6)
    status, out, _ = cli("verify")
    assert status == 0
    anchor = out.strip().rsplit(" ", 1)[1]
    assert anchor == f"{seqs[-1]}:{row(state, seqs[-1])['hash']}"
    tamper(state, ("DELETE FROM audit WHERE seq >= ?", (seqs[-2],)))
    assert check(state) is None  # a clean cut is invisible to the chain alone
    status, _, err = cli("verify", "--anchor", anchor)
    assert status == 1 and f"broken at event {seqs[-2]}" in err and "deleted" in err
    # rewrite everything from the start with a consistent chain: caught at the anchor
    with raw_registry(state) as db:
        rows = [dict(zip(audit._COLUMNS, v, strict=True)) for v in
                db.conn.execute(f"SELECT {', '.join(audit._COLUMNS)} FROM audit ORDER BY seq")]
    rows[1]["actor"] = "user:alibi"
    prev, stmts = audit.GENESIS, []
    for r in rows:
        r = _rehash(r, prev)
        prev = r["hash"]
        stmts.append(("UPDATE audit SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                      (r["actor"], r["prev_hash"], r["hash"], r["seq"])))
    tamper(state, *stmts)
    assert check(state) is None
    with state.registry() as reg:
        broken = audit.verify(reg, (seqs[-3], row(state, seqs[-3])["hash"]))
        assert broken is None
        broken = audit.verify(reg, audit.parse_anchor(f"{seqs[-3]}:{'0' * 64}"))
    assert broken.seq == seqs[-3] and "anchor" in broken.problem
    assert cli("verify", "--anchor", "12:nothex")[0] == 1


# --- queries -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A registry with 20,000 synthetic events over a year (the benchmark's generator)."""
    bench = _bench()
    st = FleetState.create(tmp_path_factory.mktemp("big") / "state", fleet="acme-fleet",
                           proxy_name="proxy.test", proxy_ips=["127.0.0.1"])
    bench.build(st, 20_000, devices=300, users=20)
    with st.registry() as reg:
        rows = [e.as_record() for e in audit.query(reg)]
    return st, rows


@pytest.mark.parametrize("filters", [
    {"selector": ["customer=acme,site=dal"], "since": 90},
    {"selector": ["customer=acme", "site=dal"], "types": ["session.start"], "since": 90},
    {"selector": ["customer in (acme,globex)", "site notin (dal,hou)"]},
    {"selector": ["customer!=acme", "fw"]},
    {"selector": ["!fw"]},
    {"selector": ["site=dal"], "actor": "user:eng-003"},
    {"device": "robot-00042", "since": 30, "until": 5},
    {"actor": "user:eng-007", "types": ["session.start", "session.end"]},
    {"types": ["device.migrate"], "since": 10},
    {},
])
def test_query_matches_a_plain_scan(big, filters):
    st, rows = big
    now = dt.datetime.now(dt.UTC)
    kw = dict(filters)
    if "selector" in kw:
        kw["selector"] = parse_selector(kw["selector"])
    for end in ("since", "until"):
        if end in kw:
            kw[end] = now - dt.timedelta(days=kw[end])
    with st.registry() as reg:
        got = [r.seq for r in audit.query(reg, **kw)]

    def want(r):
        sel = kw.get("selector")
        return ((sel is None or (r["labels"] is not None and sel.matches(r["labels"])))
                and ("since" not in kw or r["time"] >= iso(kw["since"]))
                and ("until" not in kw or r["time"] <= iso(kw["until"]))
                and ("device" not in kw or r["device"] == kw["device"])
                and ("actor" not in kw or r["actor"] == kw["actor"])
                and ("types" not in kw or r["type"] in kw["types"]))

    expected = [r["seq"] for r in rows if want(r)]
    assert got == expected
    if filters.get("selector") == ["customer=acme,site=dal"]:
        assert 50 < len(got) < 1000


def test_query_uses_the_indexes(big):
    st, _ = big
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=90)
    with st.registry() as reg:
        plan = audit.query_plan(reg, since=since, selector=parse_selector("customer=acme,site=dal"),
                                types=["session.start"])
        assert "idx_audit_labelset_time" in plan and "SCAN" not in plan.replace("SCAN CONSTANT", "")
        assert "idx_audit_actor_time" in audit.query_plan(reg, since=since, actor="user:eng-001")
        assert "device" in audit.query_plan(reg, since=since, device="robot-00001",
                                            selector=parse_selector("site=dal"))


def test_selector_sees_labels_at_the_time(state):
    before = add(state, 2)
    hou = {**DAL, "site": "hou"}
    after = add(state, 2, labels=hou)
    with state.registry() as reg:
        dal = [r.seq for r in audit.query(reg, selector=parse_selector("site=dal"))]
        houston = [r.seq for r in audit.query(reg, selector=parse_selector("site=hou"))]
        nothing = list(audit.query(reg, selector=parse_selector("site=sea")))
    assert dal == before and houston == after and nothing == []


def test_query_cli_formats_and_filters(state, cli):
    add(state, 3)
    add(state, 1, labels={**DAL, "site": "hou"})
    status, out, _ = cli("query", "--format", "jsonl", "--since", "1h", "--event", "session.*",
                         "--user", "ops", "customer=acme", "site in (dal)")
    assert status == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3 and {r["labels"]["site"] for r in lines} == {"dal"}
    status, out, _ = cli("query", "--format", "json", "--device", "robot-1", "--until", "now")
    assert status == 0 and len(json.loads(out)) == 4
    status, out, _ = cli("query", "site=hou")
    assert status == 0 and "SEQ" in out.splitlines()[0] and "service=ssh" in out and "site=hou" in out
    status, _, err = cli("query", "site=nowhere")
    assert status == 0 and "no audit events match" in err
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
    status, out, _ = cli("query", "--format", "jsonl", "--since", since, "--actor", "user:ops")
    assert status == 0 and len(out.splitlines()) == 4


@pytest.mark.parametrize("args, fragment", [
    (["--since", "90 days"], "bad time '90 days' for --since"),
    (["--until", "yesterday"], "bad time 'yesterday' for --until"),
    (["--since", "1d", "--until", "2d"], "is after --until"),
    (["--event", "session.begin"], "unknown event type 'session.begin'"),
    (["--event", "nothing.*"], "unknown event type 'nothing.*'"),
    (["site in (dal"], "bad selector"),
    (["Customer=acme"], "bad label key"),
])
def test_query_bad_input_is_one_line(cli, args, fragment):
    status, out, err = cli("query", *args)
    assert status == 1 and out == ""
    assert fragment in err and len(err.strip().splitlines()) == 1 and err.startswith("tunnel: error:")


def test_help_documents_actions(capsys):
    with pytest.raises(SystemExit):
        tunnel_main(["audit", "--help"])
    text = capsys.readouterr().out
    assert all(w in text for w in ("query", "verify", "export", "customer=acme,site=dal"))
    with pytest.raises(SystemExit):
        tunnel_main(["audit", "query", "--help"])
    text = capsys.readouterr().out
    assert "--since" in text and "labels the device had" in text and "session.end" in text


# --- export --------------------------------------------------------------------------------------


def test_export_resumes_without_duplicates_or_gaps(state, cli, tmp_path):
    out, cursor = tmp_path / "siem.jsonl", tmp_path / "cursor"
    add(state, 5)
    assert cli("export", "--output", out, "--cursor", cursor)[0] == 0
    assert cli("export", "--output", out, "--cursor", cursor)[0] == 0  # nothing new
    add(state, 3)
    status, _, err = cli("export", "--output", out, "--cursor", cursor, "--limit", "2")
    assert status == 0 and "exported 2 events" in err
    assert cli("export", "--output", out, "--cursor", cursor)[0] == 0
    # a run that wrote its lines but died before saving the cursor, and a half-written line
    saved = cursor.read_text()
    add(state, 2)
    assert cli("export", "--output", out, "--cursor", cursor)[0] == 0
    cursor.write_text(saved)
    with open(out, "a") as f:
        f.write('{"seq": 99, "ty')
    add(state, 1)
    assert cli("export", "--output", out, "--cursor", cursor)[0] == 0
    seqs = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    with state.registry() as reg:
        assert seqs == [e.seq for e in audit.events(reg)]
    assert json.loads(cursor.read_text())["seq"] == seqs[-1]
    # stdout, resumable by --after
    status, text, err = cli("export", "--after", seqs[-3])
    assert status == 0 and [json.loads(x)["seq"] for x in text.splitlines()] == seqs[-2:]
    assert f"resume with --after {seqs[-1]}" in err


def test_export_refuses_a_rewritten_log_and_stops_at_a_break(state, cli, tmp_path):
    out, cursor = tmp_path / "siem.jsonl", tmp_path / "cursor"
    seqs = add(state, 4)
    assert cli("export", "--output", out, "--cursor", cursor)[0] == 0
    more = add(state, 4)
    tamper(state, ("UPDATE audit SET actor = 'user:alibi' WHERE seq = ?", (more[2],)))
    status, _, err = cli("export", "--output", out, "--cursor", cursor)
    assert status == 1 and f"broken at event {more[2]}" in err
    assert json.loads(cursor.read_text())["seq"] == more[1]  # the good ones went out
    tamper(state, ("UPDATE audit SET hash = ? WHERE seq = ?", ("f" * 64, more[1])))
    status, _, err = cli("export", "--output", out, "--cursor", cursor)
    assert status == 1 and f"event {more[1]} changed since it was exported" in err
    status, _, err = cli("verify", "--cursor", cursor)
    assert status == 1
    assert seqs


# --- migration ---------------------------------------------------------------------------------


def test_v3_migration_backfills_label_index(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    monkeypatch.setattr(registry, "MIGRATIONS", registry.MIGRATIONS[:2])
    with Registry(path) as reg, reg.write() as db:
        prev = audit.GENESIS
        for i, labels in enumerate([DAL, None, {**DAL, "site": "hou"}, DAL]):
            r = audit._row(i + 1, prev, "session.start", actor="user:ops", device="robot-1",
                           labels=labels, fields={"session": f"s{i}"})
            prev = r["hash"]
            db["audit"].insert({k: v for k, v in r.items()})
    monkeypatch.undo()
    with Registry(path) as reg:
        assert audit.verify(reg) is None
        seqs = [r.seq for r in audit.query(reg, selector=parse_selector("site=dal"))]
        assert seqs == [1, 4]
        with reg.write() as db:
            audit.append(db, "session.end", actor="user:ops", device="robot-1", labels=DAL)
        assert audit.verify(reg) is None
        assert len(table_rows(path, "audit_labelsets")["audit_labelsets"]) == 2
