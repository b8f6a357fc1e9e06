"""Enrollment under contention and crashes, with real processes."""

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from fleet_harness import integrity_ok

from enroll import audit, device, tokens
from enroll.repositories import Certificates, Tokens
from enroll.state import FleetState


def _fleet(tmp_path):
    return FleetState.create(tmp_path / "state", fleet="acme-fleet", proxy_name="proxy.test", proxy_ips=[])


def test_racing_enrollments_for_one_single_use_token(tmp_path):
    fleet = _fleet(tmp_path)
    with fleet.registry() as reg:
        token, _ = tokens.create(reg, fleet.fleet, labels={"customer": "acme"})
    requests = []
    for i in range(6):
        device.prepare(tmp_path / f"dev{i}", f"racer-{i}")
        requests.append(tmp_path / f"dev{i}" / "request.json")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "enroll.cli", "--state", str(fleet.root), "sign",
             "--csr", str(r), "--out", str(r.with_suffix(".bundle"))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "FLEET_TOKEN": token},
        )
        for r in requests
    ]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1, results
    assert all("already used" in err for _, err in losers), losers
    with fleet.registry() as reg:
        assert len(reg.devices()) == 1
        denied = audit.events(reg, "device.enroll.denied")
        assert len(denied) == len(losers)
        assert audit.verify(reg) is None


def test_kill_during_enrollment_burst_leaves_no_half_registered_device(tmp_path):
    fleet = _fleet(tmp_path)
    with fleet.registry() as reg:
        token, _ = tokens.create(reg, fleet.fleet, labels={"customer": "acme"}, uses=100000)
    device.prepare(tmp_path / "dev", None)
    script = textwrap.dedent(f"""
        import json, sys
        from enroll.enrollment import enroll
        from enroll.state import FleetState
        state = FleetState({str(fleet.root)!r})
        request = json.load(open({str(tmp_path / "dev" / "request.json")!r}))
        reg = state.registry()
        print("ready", flush=True)
        while True:
            enroll(state, reg, request, {token!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    with fleet.registry() as reg:
        assert integrity_ok(fleet)
        devices = reg.devices()
        assert len(devices) > 5, "the burst should have enrolled several devices before the kill"
        serials = {c.serial: c.subject for c in Certificates(reg).listing(include_expired=True, now=dt.datetime.now(dt.UTC))}
        for dev in devices:
            assert serials.get(dev.cert_serial) == dev.id
        assert len(serials) == len(devices)
        token = Tokens(reg).all()[0]
        assert token.uses_total - token.uses_left == len(devices)
        enrolled = [e.device for e in audit.events(reg, "device.enroll")]
        assert sorted(enrolled) == sorted(d.id for d in devices)
        assert audit.verify(reg) is None
    json.dumps([d.as_dict() for d in devices])  # everything decodes
