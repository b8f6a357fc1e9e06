"""Proxy, agent and engineer commands as real processes on loopback (no namespaces needed).

The lab tests repeat the important flows across NAT; these cover behaviour that does not depend
on the network: sessions, refusals, audit records, restarts.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
from fleet_harness import Fleet, wait_until

from enroll import admin
from enroll.cli import main as enroll_main
from enroll.repositories import Tokens


@pytest.fixture(params=["quic", "tcp"])
def running(request, fleet, echo):
    """A proxy, one connected agent (robot-1, services echo + a closed port) and an admin —
    on each transport: everything above the transport must behave the same."""
    fleet.env["FLEET_TRANSPORT"] = request.param
    config = fleet.enroll_device(
        "robot-1", {"customer": "acme"},
        {"echo": f"127.0.0.1:{echo.port}", "closed": "127.0.0.1:1"}, keepalive="5s",
        transport=request.param,
    )
    fleet.start_proxy()
    agent = fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    return fleet, ops, agent, config


def test_session_through_proxy_command(running):
    fleet, ops, _, _ = running
    out = fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops, input=b"hello tunnel\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello tunnel\n"
    types = [e["type"] for e in fleet.audit()]
    assert "device.connect" in types and "session.start" in types
    end = wait_until(lambda: [e for e in fleet.audit() if e["type"] == "session.end"], what="session.end")
    assert end[0]["fields"]["bytes_to_device"] == 13 and end[0]["fields"]["bytes_from_device"] == 13
    assert end[0]["labels"] == {"customer": "acme", "lifecycle": "active"}


def test_forward_many_concurrent_connections_with_checksums(running):
    fleet, ops, _, _ = running
    proc = subprocess.Popen(
        [*_tunnel(fleet), "forward", "robot-1", "echo", "--identity", str(ops)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, **fleet.env},
    )
    try:
        line = proc.stderr.readline()
        assert line.startswith("forwarding "), line
        port = int(line.split()[1].rsplit(":", 1)[1])
        results = {}

        def client(i):
            payload = os.urandom(300_000 + i)
            got, began = bytearray(), time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port)) as s:
                    sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
                    sender.start()
                    while chunk := s.recv(65536):
                        got += chunk
                    sender.join()
            except OSError as exc:
                results[i] = f"{exc!r} after {len(got)} of {len(payload)} bytes, {time.monotonic() - began:.1f} s"
                return
            results[i] = hashlib.sha256(payload).digest() == hashlib.sha256(got).digest()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    said = proc.stderr.read()  # forward's one line per cut or refused session, if any
    assert results == {i: True for i in range(10)}, said


def _tunnel(fleet):
    import sys

    return [sys.executable, "-m", "tunnel.cli"]


@pytest.mark.parametrize(
    "device, service, code_fragment",
    [
        ("robot-1", "kube", "exposes no service 'kube' (listed: closed, echo)"),
        ("robot-1", "5432", "exposes no service '5432'"),
        ("robot-1", "closed", "is not accepting"),
        ("robot-9", "ssh", "no device 'robot-9' that you may reach"),
    ],
)
def test_refusals_are_clear_and_audited(running, device, service, code_fragment):
    fleet, ops, _, _ = running
    out = fleet.tunnel("proxy-command", device, service, identity=ops, input=b"")
    assert out.returncode == 1
    assert code_fragment in out.stderr.decode()
    denied = [e for e in fleet.audit() if e["type"] == "access.denied"]
    assert denied and code_fragment.split("'")[0] in denied[-1]["reason"]
    # the proxy keeps serving everyone else
    assert fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops, input=b"x").stdout == b"x"


def test_engineer_without_role_sees_nothing(running):
    fleet, _, _, _ = running
    nobody = fleet.user("nobody", [])
    out = fleet.tunnel("ls", "--format", "json", identity=nobody)
    assert out.returncode == 0 and json.loads(out.stdout) == []
    out = fleet.tunnel("proxy-command", "robot-1", "echo", identity=nobody, input=b"")
    assert out.returncode == 1 and b"no device 'robot-1'" in out.stderr


def test_identities_cannot_stand_in_for_each_other(running, tmp_path):
    fleet, ops, _, config = running
    # a device certificate used as an engineer identity
    dev_dir = config.parent
    as_user = tmp_path / "as-user"
    as_user.mkdir()
    for src, dst in (("device.crt", "user.crt"), ("device.key", "user.key"), ("ca.crt", "ca.crt")):
        (as_user / dst).write_bytes((dev_dir / src).read_bytes())
    (as_user / "client.yaml").write_text(f"proxy: {fleet.address}\nserver_name: proxy.test\n")
    out = fleet.tunnel("ls", identity=as_user)
    assert out.returncode == 1 and b"wrong_kind" in out.stderr
    # an engineer certificate used as an agent
    agent_dir = tmp_path / "as-agent"
    agent_dir.mkdir()
    for src, dst in (("user.crt", "device.crt"), ("user.key", "device.key"), ("ca.crt", "ca.crt")):
        (agent_dir / dst).write_bytes((ops / src).read_bytes())
    (agent_dir / "agent.yaml").write_text(config.read_text())
    fleet.start_agent(agent_dir / "agent.yaml")
    wait_until(lambda: [e for e in fleet.audit() if e["type"] == "access.denied"
                        and e["fields"].get("code") == "wrong_kind" and e["actor"] == "user:ops"],
               what="wrong_kind denial for the user cert used as agent")


def test_foreign_ca_is_refused(running, tmp_path):
    fleet, _, _, _ = running
    other = Fleet(tmp_path / "other", proxy_port=fleet.proxy_port)
    foreign = other.user("mallory", ["admin"])
    out = fleet.tunnel("ls", identity=foreign)
    assert out.returncode != 0
    assert b"certificate" in out.stderr.lower() or b"refused" in out.stderr.lower()


def test_lock_and_decommission_cut_the_agent(running):
    fleet, ops, agent, config = running
    with fleet.state.registry() as reg:
        admin.lock(reg, "robot-1", None, "incident 42")
    wait_until(lambda: not fleet.online(ops, "robot-1"), 5, what="locked device offline")
    out = fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops, input=b"")
    assert out.returncode == 1 and b"locked" in out.stderr
    with fleet.state.registry() as reg:
        admin.unlock(reg, "robot-1")
    # a locked agent retries every few minutes (issue 18): restarting it brings it back now
    fleet.stop(agent)
    agent = fleet.start_agent(config)
    fleet.wait_online(ops, "robot-1", timeout=40)
    with fleet.state.registry() as reg:
        admin.decommission(reg, "robot-1")
    wait_until(lambda: not fleet.online(ops, "robot-1"), 5, what="decommissioned device offline")
    # the agent stops for good (exit status 5, see tests/test_agent_stops.py) instead of retrying
    assert agent.wait(timeout=30) == 5


def test_agent_and_proxy_restarts_come_back(running):
    fleet, ops, agent, config = running
    fleet.stop(agent, signal.SIGKILL)
    new_agent = fleet.start_agent(config)
    wait_until(lambda: fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops,
                                    input=b"again").stdout == b"again", 20, 0.3, "session after agent restart")
    proxy = fleet.processes[0]
    fleet.stop(proxy, signal.SIGKILL)
    fleet.start_proxy()
    fleet.wait_online(ops, "robot-1", timeout=40)
    assert new_agent.poll() is None
    connects = [e for e in fleet.audit() if e["type"] == "device.connect"]
    assert len(connects) >= 3


def test_expired_engineer_certificate(running):
    fleet, _, _, _ = running
    short = fleet.user("brief", ["admin"], ttl="1s")
    wait_until(lambda: fleet.tunnel("ls", identity=short).returncode == 1, 5, 0.3, "expiry")
    out = fleet.tunnel("ls", identity=short)
    assert b"expired" in out.stderr


def test_enroll_cli_user_issue_writes_private_key(fleet):
    assert enroll_main(["--state", str(fleet.state.root), "user", "issue", "Bad_Name",
                        "--dir", str(fleet.root / "x")]) == 1


def test_online_enrollment_checks_the_pin_before_sending_the_token(fleet, tmp_path):
    from enroll import tokens
    from tunnel.enroll_cli import main as enroll_main  # the installed `enroll`: with a transport

    fleet.start_proxy()
    with fleet.state.registry() as reg:
        token, _ = tokens.create(reg, fleet.state.fleet, labels={"customer": "acme"})
    other = Fleet(tmp_path / "other")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    base = ["device", "--proxy", fleet.address, "--server-name", "proxy.test", "--token-file", str(token_file)]
    status = enroll_main([*base, "--dir", str(tmp_path / "d1"), "--ca-pin", other.pin])
    assert status == 1
    with fleet.state.registry() as reg:
        assert Tokens(reg).all()[0].uses_left == 1  # never sent, never used
        assert not reg.devices()
    status = enroll_main([*base, "--dir", str(tmp_path / "d2"), "--ca-pin", fleet.pin, "--name", "online-1"])
    assert status == 0
    assert (tmp_path / "d2" / "device.crt").exists() and (tmp_path / "d2" / "agent.yaml").exists()
    types = [e["type"] for e in fleet.audit()]
    assert "device.enroll" in types and "device.enroll.denied" not in types
    # the same token again: refused by the CA step, with the reason
    status = enroll_main([*base, "--dir", str(tmp_path / "d3"), "--ca-pin", fleet.pin])
    assert status == 1
    assert [e["type"] for e in fleet.audit()][-1] == "device.enroll.denied"


def test_login_with_invite_then_password_and_failures_are_audited(fleet, tmp_path):
    from enroll import users

    fleet.start_proxy()
    with fleet.state.registry() as reg:
        invite, _ = users.add(reg, "alice", ["admin"])
    identity = tmp_path / "alice"
    base = ["login", "--proxy", fleet.address, "--user", "alice", "--server-name", "proxy.test",
            "--password-stdin"]
    invite_file = tmp_path / "invite"
    invite_file.write_text(invite)
    out = fleet.tunnel(*base, "--invite-file", invite_file, "--ca-pin", fleet.pin, identity=identity,
                       input=b"a long password\n")
    assert out.returncode == 0, out.stderr
    assert (identity / "user.key").stat().st_mode & 0o777 == 0o600
    out = fleet.tunnel(*base, identity=identity, input=b"wrong password\n")
    assert out.returncode == 1 and b"unknown user or wrong password" in out.stderr
    out = fleet.tunnel(*base, identity=identity, input=b"a long password\n")
    assert out.returncode == 0, out.stderr
    out = fleet.tunnel("whoami", "--format", "json", identity=identity)
    assert json.loads(out.stdout)["roles"] == ["admin"]
    types = [e["type"] for e in fleet.audit() if e["type"].startswith("user.login")]
    assert types == ["user.login", "user.login.failed", "user.login"]
    assert fleet.tunnel("logout", identity=identity).returncode == 0
    assert fleet.tunnel("ls", identity=identity).returncode == 1


def test_session_is_cut_when_its_certificate_expires(running):
    import asyncio

    from tunnel.client import Client, UserIdentity
    from tunnel.transport import TransportError

    fleet, _, _, _ = running
    brief = fleet.user("brief", ["admin"], ttl="4s")

    async def hold():
        client = await Client.connect(UserIdentity.load(brief))
        stream, _ = await client.dial("robot-1", "echo")
        started = time.monotonic()
        try:
            while True:
                await stream.write(b"x")
                if not await stream.read(10):
                    break
                await asyncio.sleep(0.2)
        except TransportError:
            pass
        client.close()
        return time.monotonic() - started

    held = asyncio.run(hold())
    assert 1.0 < held < 8.0, held


def test_kubeconfig_merge_keeps_other_contexts(tmp_path):
    import yaml

    from tunnel.engineer import kubeconfig_entry, merge_kubeconfig

    path = tmp_path / "config"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config",
                                    "clusters": [{"name": "prod", "cluster": {"server": "https://x"}}],
                                    "contexts": [{"name": "prod", "context": {"cluster": "prod"}}],
                                    "users": [], "current-context": "prod"}))
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    merge_kubeconfig(path, "robot-1", kubeconfig_entry("robot-1", 4567, ca, "kubernetes"))
    merge_kubeconfig(path, "robot-1", kubeconfig_entry("robot-1", 4568, ca, "kubernetes"))
    config = yaml.safe_load(path.read_text())
    assert [c["name"] for c in config["clusters"]] == ["prod", "fleet-robot-1"]
    assert config["clusters"][1]["cluster"]["server"] == "https://127.0.0.1:4568"
    assert config["clusters"][1]["cluster"]["tls-server-name"] == "kubernetes"
    assert "certificate-authority-data" in config["clusters"][1]["cluster"]
    assert config["current-context"] == "fleet-robot-1"
    assert path.stat().st_mode & 0o777 == 0o600
