"""``enroll backup DEST`` (issue 18): an online copy of the registry whose audit chain verifies."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import threading

from fleet_harness import PY, wait_until

from enroll import audit
from enroll.cli import main as enroll_main
from enroll.registry import Registry


def _backup(fleet, dest, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "enroll.cli", "--state", str(fleet.state.root), "backup", str(dest), *extra],
                          capture_output=True, text=True, timeout=120)


def test_backup_while_the_proxy_writes(fleet, echo, tmp_path):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"})
    fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    stop = threading.Event()
    sessions = []

    def engineer():  # each session: session.start + session.end written by the proxy
        while not stop.is_set():
            out = fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops, input=b"x")
            sessions.append(out.returncode)

    def operator():  # another writer on the same registry, as an `enroll` command would be
        with Registry(fleet.state.registry_path) as reg:
            while not stop.is_set():
                with reg.write() as db:
                    audit.append(db, "device.lock", actor="admin:test", device="robot-9", reason="load")

    threads = [threading.Thread(target=engineer), threading.Thread(target=operator)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(sessions) >= 2, 30, 0.1, "sessions under way")
        with fleet.state.registry() as reg:
            before = audit.tip(reg)
        dest = tmp_path / "backups" / "registry-1.db"
        dest.parent.mkdir()
        out = _backup(fleet, dest, "--format", "json")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["chain"] == "ok" and info["events"] >= before[0] and info["backup"] == str(dest)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert not any(p.name.startswith(".") for p in dest.parent.iterdir())  # no partial file left
    assert not os.path.exists(f"{dest}-wal")  # a standalone file
    # the copy stands on its own: it opens, verifies and holds everything committed before
    conn = sqlite3.connect(dest)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
    with Registry(dest) as copy:
        assert audit.verify(copy, before) is None
        seq, digest = audit.tip(copy)
        assert info["anchor"] == f"{seq}:{digest}" and seq == info["events"]
    # the live log went on past the copy, and the copy's anchor still matches it
    with fleet.state.registry() as reg:
        assert audit.tip(reg)[0] >= seq and audit.verify(reg, (seq, digest)) is None
    assert fleet.processes[0].poll() is None and 0 in sessions


def test_backup_refuses_to_overwrite(fleet, tmp_path, capsys):
    dest = tmp_path / "taken.db"
    dest.write_bytes(b"an older backup")
    assert enroll_main(["--state", str(fleet.state.root), "backup", str(dest)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert dest.read_bytes() == b"an older backup"
    missing = tmp_path / "no-such-dir" / "b.db"
    assert enroll_main(["--state", str(fleet.state.root), "backup", str(missing)]) == 1
    assert "not a directory" in capsys.readouterr().err and not missing.parent.exists()
    live = fleet.state.registry_path.with_name("registry.db.bak")
    assert enroll_main(["--state", str(fleet.state.root), "backup", str(live)]) == 1
    assert not live.exists()
    assert enroll_main(["--state", str(tmp_path / "nothing"), "backup", str(tmp_path / "x.db")]) == 1
    assert not (tmp_path / "x.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_backup_reports_a_broken_chain(fleet, tmp_path, capsys):
    """An edited event in the live log: the backup says where, exits 1, keeps the evidence."""
    with fleet.state.registry() as reg:
        with reg.write() as db:
            audit.append(db, "device.lock", actor="admin:test", device="robot-1", reason="first")
            audit.append(db, "device.lock", actor="admin:test", device="robot-1", reason="second")
        seq = audit.tip(reg)[0]
    # what an attacker with the file does: drop the append-only triggers, then edit
    conn = sqlite3.connect(fleet.state.registry_path)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("UPDATE audit SET reason = 'forged' WHERE seq = ?", (seq - 1,))
    conn.commit()
    conn.close()
    dest = tmp_path / "evidence.db"
    assert enroll_main(["--state", str(fleet.state.root), "backup", str(dest)]) == 1
    captured = capsys.readouterr()
    assert f"broken at event {seq - 1}" in captured.err and "evidence" in captured.err
    assert dest.exists() and stat.S_IMODE(dest.stat().st_mode) == 0o600
