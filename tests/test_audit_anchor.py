"""Audit anchors (issue 13, item 14): a clean cut of the log's tail is invisible to the chain
alone, so anchors are written routinely — by ``tunnel audit verify`` (printed), by ``tunnel
audit export`` (beside its output) and by the proxy (``--anchor-dir``, periodically) — and
``verify --anchor SEQ:HASH|FILE`` names the truncation.
"""

import json
import signal
import sqlite3

import pytest
from fleet_harness import PY, wait_until

from enroll import audit, tokens
from enroll.state import FleetState
from tunnel.cli import main as tunnel_main


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


def add(state, n):
    with state.registry() as reg:
        for i in range(n):
            with reg.write() as db:
                audit.append(db, "session.start", actor="user:ops", device="robot-1", service="ssh",
                             session=f"s{i}")
        return audit.tip(reg)[0]


def truncate(state, after_seq):
    """What an attacker with the database file does: drop the triggers, cut the tail."""
    conn = sqlite3.connect(state.registry_path)
    for name, in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DELETE FROM audit WHERE seq > ?", (after_seq,))
    conn.commit()
    conn.close()


def test_verify_prints_a_new_anchor_as_text_and_json(state, cli):
    last = add(state, 3)
    status, out, _ = cli("verify")
    digest = audit.tip(state.registry())[1]
    assert status == 0 and out.splitlines()[-1] == f"anchor {last}:{digest}"
    status, out, _ = cli("verify", "--format", "json")
    result = json.loads(out)
    assert status == 0 and result["intact"] and result["anchor"] == f"{last}:{digest}"
    assert result["events"] == last and result["checked_anchor"] is None


def test_truncation_after_an_anchor_is_named(state, cli, tmp_path):
    add(state, 5)
    status, out, _ = cli("verify")
    anchor = out.split()[-1]
    seq = int(anchor.split(":")[0])
    truncate(state, seq - 2)
    assert cli("verify")[0] == 0  # the chain alone cannot tell
    status, _, err = cli("verify", "--anchor", anchor)
    assert status == 1 and f"broken at event {seq - 1}" in err and "truncated" in err
    assert f"events {seq - 1}-{seq} missing" in err
    # the same anchor kept in a file, and the JSON answer
    kept = tmp_path / "anchor.txt"
    kept.write_text(anchor + "\n")
    status, out, err = cli("verify", "--anchor", kept, "--format", "json")
    result = json.loads(out)
    assert status == 1 and not result["intact"] and result["broken_at"] == seq - 1
    assert "truncated" in result["problem"] and result["anchor"] is None


def test_export_writes_its_anchor_beside_the_output(state, cli, tmp_path):
    a = add(state, 4)
    out_file = tmp_path / "siem" / "audit.jsonl"
    out_file.parent.mkdir()
    status, _, err = cli("export", "--output", out_file)
    anchors = tmp_path / "siem" / ("audit.jsonl" + audit.EXPORT_ANCHOR_SUFFIX)
    assert status == 0 and str(anchors) in err
    first = json.loads(anchors.read_text().splitlines()[-1])
    assert first["seq"] == a and first["anchor"] == f"{a}:{first['hash']}"
    b = add(state, 2)
    assert cli("export", "--output", out_file)[0] == 0
    assert [json.loads(line)["seq"] for line in anchors.read_text().splitlines()] == [a, b]
    assert cli("export", "--output", out_file)[0] == 0  # nothing new: no new anchor
    assert len(anchors.read_text().splitlines()) == 2
    truncate(state, b - 1)
    add(state, 1)  # the log grew again after the cut: same length, a different last event
    status, _, err = cli("verify", "--anchor", anchors)
    assert status == 1 and f"broken at event {b}" in err and "anchor" in err
    # the export output itself anchors too: its last event
    status, _, err = cli("verify", "--anchor", out_file)
    assert status == 1 and f"broken at event {b}" in err


def test_anchor_parsing_accepts_the_known_files_and_refuses_the_rest(state, cli, tmp_path):
    h = "ab" * 32
    assert audit.anchor_from_text(f"12:{h}") == (12, h)
    assert audit.anchor_from_text(json.dumps({"seq": 3, "hash": h, "updated": "x"})) == (3, h)  # cursor
    lines = [json.dumps(audit.anchor_record(s, h)) for s in (5, 9, 7)] + ['{"seq": 99, "ha']
    assert audit.anchor_from_text("\n".join(lines)) == (9, h)  # the highest; a torn line ignored
    with pytest.raises(ValueError, match="no anchor found"):
        audit.anchor_from_text('{"nothing": 1}')
    status, _, err = cli("verify", "--anchor", tmp_path / "missing.jsonl")
    assert status == 1 and "neither SEQ:HASH nor an existing file" in err
    (tmp_path / "junk").write_text("hello\n")
    status, _, err = cli("verify", "--anchor", tmp_path / "junk")
    assert status == 1 and "bad anchor" in err


def test_the_proxy_writes_anchors_periodically_and_at_shutdown(tmp_path):
    from fleet_harness import Fleet

    fleet = Fleet(tmp_path)
    anchors_dir = tmp_path / "anchors"
    anchors_dir.mkdir()
    log = fleet.root / "proxy.log"
    try:
        base = [PY, "-m", "tunnel.cli", "proxy", "--state", str(fleet.state.root), "--listen",
                fleet.address, "--log-format", "json"]
        bad = fleet.start([*base, "--anchor-dir", str(tmp_path / "nowhere")], log)
        assert bad.wait(15) == 1 and "not a writable directory" in log.read_text()
        proxy = fleet.start([*base, "--anchor-dir", str(anchors_dir), "--anchor-every", "1s"], log)
        wait_until(lambda: '"listening"' in log.read_text(), 15, 0.05, "proxy listening")
        anchor_file = anchors_dir / audit.ANCHOR_FILE

        def anchored_seqs():
            if not anchor_file.exists():
                return []
            return [json.loads(line)["seq"] for line in anchor_file.read_text().splitlines()]

        for round_ in range(2):  # the log grows, an anchor follows within the interval
            with fleet.state.registry() as reg:
                tokens.create(reg, fleet.state.fleet, labels={"customer": "acme"})
                tip = audit.tip(reg)[0]
            wait_until(lambda tip=tip: tip in anchored_seqs(), 15, 0.1, f"anchor {round_} at {tip}")
        assert anchored_seqs() == sorted(set(anchored_seqs()))  # only when the log moved
        with fleet.state.registry() as reg:
            tokens.create(reg, fleet.state.fleet, labels={"customer": "acme"})
            tip = audit.tip(reg)[0]
        fleet.stop(proxy, signal.SIGTERM)
        assert anchored_seqs()[-1] == tip  # the last one at shutdown
        rec = json.loads(anchor_file.read_text().splitlines()[-1])
        assert rec["fleet"] == "acme-fleet" and rec["anchor"] == f"{tip}:{rec['hash']}"
        truncate(fleet.state, tip - 1)
        status = tunnel_main(["audit", "verify", "--state", str(fleet.state.root),
                              "--anchor", str(anchor_file)])
        assert status == 1
    finally:
        fleet.close()
