"""Sessions survive network switches: live OpenSSH sessions through fleet-tunnel in the lab.

Each scenario keeps an ssh session open that prints a line every 100 ms (see
``migration_harness.TickSession``) and changes the device's network under it. Measured gaps are
printed (``pytest -s``); bench/cases/migration.py reports the same numbers next to autossh.

One proxy (internet namespace, 0.0.0.0:443) serves the module; every test adds its own device.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest
from fleet_harness import wait_until
from migration_harness import TunnelLab

pytestmark = pytest.mark.lab

SETTLE = 2.0  # seconds of output watched after a switch


@pytest.fixture(scope="module")
def tl(module_lab, tmp_path_factory):
    t = TunnelLab(module_lab, tmp_path_factory.mktemp("migration"))
    yield t
    t.close()


def report(name: str, **numbers) -> None:
    print(f"\n{name}: " + ", ".join(f"{k}={v:.3f}s" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in numbers.items()))


def agent_events(tl: TunnelLab, name: str, msg: str) -> list[dict]:
    return [e for e in tl.agent_log(name) if e.get("msg") == msg]


def test_wifi_to_cellular_make_before_break(tl):
    dev, _ = tl.add_device("mbb", ("wifi", "cellular"))
    session = tl.tick_session("mbb")
    t0 = time.monotonic()
    dev.use("cellular")
    switched = time.monotonic()
    time.sleep(SETTLE)
    gap = session.max_gap(t0 - 0.2)
    report("wifi->cellular make-before-break", gap=gap, first_line=session.first_after(switched))
    assert session.alive
    assert gap < 1.0
    migrated = agent_events(tl, "mbb", "migrated")
    assert migrated and migrated[-1]["uplink"] == "cellular" and migrated[-1]["old_uplink"] == "wifi"
    wait_until(lambda: tl.audit("device.migrate", device="mbb"), 5, what="device.migrate audit")
    # the wifi -> cellular move is audited (a NAT may rebind the new flow once more right after
    # it, which is audited as a further move from one cellular address to another)
    moves = [(e["fields"]["old"], e["fields"]["new"]) for e in tl.audit("device.migrate", device="mbb")]
    assert any(old.startswith(dev.public_address("wifi") + ":")
               and new.startswith(dev.public_address("cellular") + ":") for old, new in moves), moves
    status = tl.status("mbb")
    assert status["address"].startswith(dev.public_address("cellular") + ":")
    assert status["migrations"] >= 1
    session.close()


def test_wifi_outage_then_cellular(tl):
    dev, _ = tl.add_device("bbm", ("wifi", "cellular"))
    session = tl.tick_session("bbm")
    t0 = time.monotonic()
    dev.use("cellular", break_first=True, outage=2.0)
    up = time.monotonic()
    first = session.wait_line_after(up, 5)
    time.sleep(SETTLE)
    gap = session.max_gap(t0 - 0.2)
    report("wifi down, 2 s outage, cellular up", first_line=first, gap=gap)
    assert session.alive
    assert first is not None and first < 1.0
    session.close()


def test_nat_rebinding(tl):
    dev, _ = tl.add_device("nat", ("wifi",))
    session = tl.tick_session("nat")
    t0 = time.monotonic()
    tl.lab.rebind_nat(dev, "wifi")
    time.sleep(SETTLE)
    gap = session.max_gap(t0 - 0.2)
    report("NAT rebinding", gap=gap)
    assert session.alive and gap < 1.0
    wait_until(lambda: tl.audit("device.migrate", device="nat"), 5, what="rebinding audited")
    assert not agent_events(tl, "nat", "migrated")  # the proxy followed; the agent did nothing


def test_cellular_to_satellite_600ms(tl):
    # The satellite network of this device carries the public address (see plan.device_plan),
    # so the same QUIC connection can move; 600 ms of RTT is added on the satellite uplink.
    dev, _ = tl.add_device("geo", ("cellular", "satellite"), satellite_public=True)
    dev.set_delay("satellite", 600)
    session = tl.tick_session("geo")
    t0 = time.monotonic()
    dev.use("satellite")
    switched = time.monotonic()
    first = session.wait_line_after(switched, 5)
    time.sleep(SETTLE + 1)
    gap = session.max_gap(t0 - 0.2)
    report("cellular->satellite (600 ms RTT)", first_line=first, gap=gap)
    assert session.alive
    assert first is not None and first < 2.0
    assert gap < 2.5
    migrated = agent_events(tl, "geo", "migrated")
    assert migrated and migrated[-1]["uplink"] == "satellite"
    assert not agent_events(tl, "geo", "connection ended; reconnecting")


def test_uplink_reaching_only_the_ground_endpoint(tl):
    proxies = [tl.endpoint(tl.lab.proxy_public),
               tl.endpoint(tl.lab.proxy_ground, via=["satellite"])]
    dev, _ = tl.add_device("ground", ("wifi", "satellite"), proxies=proxies)
    old = tl.tick_session("ground")
    t0 = time.monotonic()
    dev.use("satellite")
    wait_until(lambda: tl.audit("device.reconnect", device="ground"), 5, 0.02, "device.reconnect")
    back = time.monotonic() - t0
    event = tl.audit("device.reconnect", device="ground")[-1]
    report("switch to an uplink that reaches only the ground endpoint", back_online=back)
    assert back < 3.0
    assert event["fields"]["uplink"] == "satellite"
    assert "does not reach" in (event.get("reason") or event["fields"].get("reason", ""))
    status = tl.status("ground")
    assert status["address"].startswith(dev.public_address("satellite") + ":")
    r = tl.ssh("ground", "echo", "new session")
    assert r.returncode == 0 and r.stdout.strip() == b"new session", r.stderr
    # the old session was carried by the old connection, which the proxy replaced
    wait_until(lambda: not old.alive, 15, 0.1, "old session closed")


def test_dead_zone_60s(tl):
    dev, _ = tl.add_device("zone", ("wifi",))
    session = tl.tick_session("zone")
    dev.outage(60.0)
    back = time.monotonic()
    connects_before = len(tl.audit("device.connect", device="zone"))

    def online_again():
        if session.first_after(back) is not None:
            return "migrated"
        if len(tl.audit("device.connect", device="zone")) > connects_before:
            return "reconnected"
        return None

    how = wait_until(online_again, 10, 0.02, "agent back after the dead zone")
    elapsed = time.monotonic() - back
    report("60 s dead zone", back_online=elapsed, how=how)
    assert elapsed < 3.0
    r = tl.ssh("zone", "echo", "after the dead zone")
    assert r.returncode == 0, r.stderr
    if how == "reconnected":
        event = wait_until(lambda: tl.audit("device.reconnect", device="zone"), 5, what="reconnect")
        assert event[-1]["fields"]["outage"] >= 59
    session.close()


def test_scp_20mb_across_a_switch(tl):
    dev, _ = tl.add_device("scp", ("wifi", "cellular"))
    src = tl.lab.tmpdir / "payload.bin"
    src.write_bytes(os.urandom(20 * 1024 * 1024))
    dst = tl.lab.tmpdir / "received.bin"
    proc = tl.lab.spawn(tl.lab.internet, tl.scp_argv("scp", src, dst))
    wait_until(lambda: dst.exists() and dst.stat().st_size > 4 * 1024 * 1024 or proc.poll() is not None,
               60, 0.02, "scp under way")
    assert proc.poll() is None, "scp finished before the switch: make the file bigger"
    at = dst.stat().st_size
    dev.use("cellular")
    assert proc.wait(120) == 0
    report("scp 20 MB across wifi->cellular", switched_at_bytes=at)
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert agent_events(tl, "scp", "migrated")


def test_per_uplink_endpoints_and_probe_settings(tmp_path):
    from tunnel import agent_config

    path = tmp_path / "agent.yaml"
    path.write_text(
        "device_id: d1\nfleet: f\nidentity: {cert: c, key: k, ca: a}\n"
        "proxies:\n  - address: 198.18.0.1:443\n  - address: 192.0.2.1:443\n    via: satellite\n"
        "probe_interval: 500ms\nprobe_timeout: 1.5s\ndead_after: 2\n"
    )
    config = agent_config.load(path)
    public, ground = config.proxies
    assert ground.via == ("satellite",) and public.via == ()
    assert config.endpoints_for("wifi") == (public,)
    assert config.endpoints_for("satellite") == (ground,)
    assert public.serves("cellular", config.proxies) and not public.serves("satellite", config.proxies)
    assert (config.probe_interval, config.probe_timeout, config.dead_after) == (0.5, 1.5, 2)
    path.write_text(path.read_text().replace("dead_after: 2", "dead_after: 0"))
    with pytest.raises(agent_config.ConfigError, match="dead_after"):
        agent_config.load(path)
