"""Sessions that survive a new connection (issue 17), proved in the network lab.

Each case keeps two things open through a disruption that QUIC migration cannot carry (the
agent, or the engineer's end, needs a new connection):

* an OpenSSH session through ``tunnel proxy-command`` whose remote loop prints a sequence number
  every 100 ms (``resume_harness.SeqTickSession``): the SAME ssh process must go on printing,
  with no number lost or repeated;
* a 32 MiB download through ``tunnel forward`` from a paced server on the device, sha256 on both
  ends: it must complete byte-exact, and the device's local connection must complete (not reset).

and checks the proxy audited ``session.resume`` for both sessions. The largest gap between ticks
(and between transfer bytes) is printed per case (``pytest -s``); bench/cases/migration.py
reports the same numbers as "resume gap, CASE" rows.

The last case is the refusal: a device lock issued during an outage stops the resume, the
engineer's ssh and forward print the reason, the agent logs it, the device's local connection is
reset and the audit has the refusal.

One proxy (internet namespace, 0.0.0.0:443) serves the module; every case adds its own device
and stops its agent at the end. The 3-minute outage is the only long case.
"""

from __future__ import annotations

import signal
import time

import pytest
from fleet_harness import wait_until
from migration_harness import TunnelLab
from resume_harness import (
    TRANSFER_SIZE,
    CaseRun,
    add_resume_device,
    case_ground_endpoint,
    case_outage,
    case_proxy_restart,
    case_tcp_uplink_change,
    case_udp_blocked,
    enroll_cli,
    mentions,
    report,
    resumes,
    session_ids,
    start_case,
    stop_helper,
)

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.resumable]


@pytest.fixture(scope="module")
def tl(module_lab, tmp_path_factory):
    t = TunnelLab(module_lab, tmp_path_factory.mktemp("resume"))
    yield t
    stop_helper(t)  # started detached by the helper variants: not in the lab's process groups
    t.close()


@pytest.fixture
def case(tl):
    """Collects the case's run and device so both are closed even when an assertion fails."""
    opened: dict = {}
    yield opened
    run = opened.get("run")
    if run is not None:
        run.close()
    device = opened.get("device")
    if device in tl.devices:
        tl.fleet.stop(tl.devices[device]["agent"])


def assert_survived(tl: TunnelLab, run: CaseRun, with_helper: bool = True) -> None:
    """The same session went on, byte-exact, and the proxy audited the resume of both
    (``with_helper=False``: a second session through the helper is judged elsewhere)."""
    transfer, server = run.transfer, run.server
    judged = {k: v for k, v in run.sessions().items() if with_helper or k == "ssh"}
    for name, session in judged.items():
        assert session.alive, f"the {name} session ended: {session.stderr()}"
        assert session.first_after(run.back) is not None, f"no tick on the {name} session after the disruption"
        assert not session.sequence_problems(), (name, session.sequence_problems())
    assert transfer.ended == "eof", f"transfer: {transfer.ended}; forward said: {transfer.stderr()}"
    assert transfer.received == TRANSFER_SIZE
    assert transfer.sha256 == server.sha256, "the transfer's bytes differ from what was sent"
    wait_until(lambda: run.server_outcome == "complete", 10, 0.1, f"server side complete: {server.outcomes}")
    # the same sessions: no new session.start for the device, and each one resumed
    assert session_ids(tl, run.device) == run.ids_at_start, "a new session was started"
    for name, events in run.resumes(tl).items():
        if name not in judged and name != "bulk":
            continue
        assert events, f"no session.resume audited for the {name} session"
        assert all(e["device"] == run.device and e["result"] == "ok" for e in events), events
    ends = tl.audit("session.end", device=run.device)
    judged_ids = (run.ssh_session, run.helper_ssh_session if with_helper else None)
    assert not [e for e in ends if e["fields"].get("session") in judged_ids], \
        f"an ssh session was ended in the audit though it goes on: {ends}"


def print_case(tl: TunnelLab, run: CaseRun) -> None:
    """One line per case (``pytest -s``): the gaps, how often each session resumed, the audited
    outage and bytes replayed, and the case's own numbers (``run.notes``)."""
    resumed = run.resumes(tl)
    outages = [e["fields"].get("outage") for e in resumed["ssh"]]
    notes = {k: v for k, v in run.notes.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    report(f"resume: {run.name}", gap=run.gap, first_line=run.first_line, transfer_gap=run.transfer_gap,
           resumes={k: len(v) for k, v in resumed.items()}, audited_outage=outages,
           replayed=run.replayed(tl), **notes)


def test_cellular_to_satellite_reaching_only_the_ground_endpoint(tl, case):
    run = case_ground_endpoint(tl, "rground", case)
    print_case(tl, run)
    # the satellite uplink reaches only the ground endpoint: the agent had to reconnect
    wait_until(lambda: tl.audit("device.reconnect", device="rground"), 20, 0.2, "a new connection")
    status = tl.status("rground")
    assert status["address"].startswith(tl.devices["rground"]["dev"].public_address("satellite") + ":")
    assert_survived(tl, run)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_proxy_restart(tl, case, sig):
    name = f"rrestart{int(sig)}"
    run = case_proxy_restart(tl, name, case, sig)
    print_case(tl, run)
    if sig == signal.SIGTERM:
        # a clean shutdown detaches a resumable session instead of ending it
        detached = [e for e in tl.audit("session.detach", device=name)
                    if e["fields"].get("session") == run.ssh_session]
        assert detached, "no session.detach for the ssh session at the proxy's shutdown"
    assert_survived(tl, run)


def test_through_the_helper_proxy_killed(tl, case):
    """The ssh session and the download through the per-user helper (the generated ssh config's
    ProxyCommand, and ``tunnel forward`` as the helper serves it): the helper's connection to the
    proxy is gone after a kill -9, so the helper's splice must re-attach both sessions like
    ``tunnel proxy-command`` and the direct forward do, the download byte-exact."""
    run = case_proxy_restart(tl, "rhelper", case, signal.SIGKILL, helper=True)
    print_case(tl, run)
    assert_survived(tl, run)
    # the helper carried both (a forward that could not have the helper would go direct)
    helper_log = "\n".join(p.read_text(errors="replace")
                           for p in (tl.lab.tmpdir / "xdg-run" / "fleet-tunnel").glob("helper-*.log"))
    for sid in (run.ssh_session, run.bulk_session):
        assert f"session {sid}: stream lost" in helper_log, f"session {sid} was not held by the helper"


@pytest.fixture(scope="module")
def three_minutes(tl):
    """The 3-minute outage, run once for the two tests that judge it (it is the suite's only
    long case): a session via ``tunnel proxy-command``, one as the generated ssh config runs it
    (helper ProxyCommand, its ServerAlive settings) and the download."""
    keep: dict = {}
    try:
        run = case_outage(tl, "routage", keep, 180.0)
        print_case(tl, run)
        yield run
    finally:
        if keep.get("run") is not None:
            keep["run"].close()
        if keep.get("device") in tl.devices:
            tl.fleet.stop(tl.devices[keep["device"]]["agent"])


def test_three_minutes_without_any_uplink(tl, three_minutes):
    run = three_minutes
    # longer than the idle timeout: the agent had to come back on a new connection
    wait_until(lambda: len(tl.audit("device.connect", "device.reconnect", device="routage")) > 1, 20, 0.2,
               "the agent back on a new connection")
    outages = [e["fields"].get("outage") for e in run.resumes(tl)["ssh"]]
    assert outages and max(o or 0 for o in outages) >= 60, f"resume outage not recorded: {outages}"
    assert_survived(tl, run, with_helper=False)


def test_three_minutes_ssh_through_the_generated_config(tl, three_minutes):
    """ssh as ``tunnel config`` sets it up keeps its session through the outage too: the
    helper re-attaches, and ssh's own keepalive must not give up before the resume hold does.

    In a whole-module run this helper is the one that re-attached after the proxy's kill -9
    (``test_through_the_helper_proxy_killed``), on a new connection: the case that once ran out
    of streams there, one refused resume dial every 2 s through the outage (stop 22's open bug;
    ``tests/test_resume_streams.py``)."""
    run = three_minutes
    session = run.helper_session
    assert session is not None
    assert session.alive, f"ssh through the generated config ended: {session.stderr() or '(nothing said)'}"
    assert session.first_after(run.back) is not None, "no tick after the outage"
    assert not session.sequence_problems(), session.sequence_problems()
    assert resumes(tl, run.helper_ssh_session or "?"), "no session.resume audited for it"


def test_udp_blocked_mid_session_then_unblocked(tl, case):
    run = case_udp_blocked(tl, "rudp", case)
    print_case(tl, run)
    assert run.notes["transport_before"] == "quic"
    assert run.notes["on_tcp"] is not None, f"no tick on the TCP fallback: {run.session.stderr()}"
    assert run.notes["transfer_ended_before_unblock"] is None, \
        "the transfer ended before UDP came back (make it longer, or it was cut)"
    assert run.notes["quic_after"] is not None, "the agent did not go back to QUIC"
    assert_survived(tl, run)


def test_tcp_fallback_changing_uplink(tl, case):
    run = case_tcp_uplink_change(tl, "rtcpmove", case)
    print_case(tl, run)
    status = tl.status("rtcpmove")
    assert status["transport"] == "tcp"
    assert status["address"].startswith(tl.devices["rtcpmove"]["dev"].public_address("cellular") + ":")
    assert_survived(tl, run)


def test_lock_during_an_outage_refuses_the_resume(tl, case):
    dev, _ = add_resume_device(tl, "rlock", ("wifi",))
    case["device"] = "rlock"
    run = case["run"] = start_case(tl, "device locked during an outage", "rlock")
    run.started = time.monotonic()
    outage = dev.outage(10.0, block=False)
    time.sleep(1.0)
    locked_at = time.monotonic()
    enroll_cli(tl, "lock", "rlock", "--ttl", "1h", "--message", "resume lab")
    outage.join(30)
    run.back = time.monotonic()
    session, transfer, server = run.session, run.transfer, run.server
    # the engineer's ends stop, each saying why in one line
    wait_until(lambda: not session.alive, 60, 0.2, "the ssh session to end")
    assert transfer.wait(30) not in (None, "eof"), f"the transfer did not fail: {transfer.ended}"
    report("resume refused: device locked during an outage", ssh_ended_after=time.monotonic() - locked_at,
           ssh_said=[line for line in session.stderr_lines if "tunnel" in line],
           forward_said=transfer.stderr_lines[1:])
    assert session.proc.returncode != 0
    # the reason, once, in one line (a line that the tunnel was lost and is resuming may precede it)
    assert len([line for line in session.stderr_lines if "locked" in line]) == 1, session.stderr()
    assert len([line for line in transfer.stderr_lines if "locked" in line]) == 1, transfer.stderr()
    # the device's local connection was reset (not closed as if the download had ended)
    wait_until(lambda: run.server_outcome != "sending", 30, 0.2,
               f"the device's local connection to end: {server.outcomes}")
    assert run.server_outcome == "reset", server.outcomes
    # the agent logged the end of each session with the reason
    for sid in (run.ssh_session, run.bulk_session):
        wait_until(lambda sid=sid: [r for r in tl.agent_log("rlock") if mentions(r, sid, "lock")], 30, 0.2,
                   f"the agent's log line for session {sid}")
    # no resume went through after the lock, and the audit has the refusal
    for sid in (run.ssh_session, run.bulk_session):
        assert not resumes(tl, sid), f"session {sid} was resumed though the device was locked"
    refusals = [e for e in tl.audit(device="rlock")
                if e["type"] in ("access.denied", "session.end") and e["result"] != "ok"
                and "lock" in (e["reason"] or "").lower()]
    assert refusals, "no audited refusal naming the lock"
    enroll_cli(tl, "unlock", "rlock")
