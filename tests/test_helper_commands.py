"""Everything else the engineer does, through the per-user helper (issue 15).

``tunnel ls``/``ssh-cert`` (one request on the helper's warm connection), ``tunnel forward``/``db``
(the command binds, hands its listening socket to the helper, stays attached) and the Ansible
inventory plugin's listing — each against a real proxy, agent, sshd and the real commands, each
compared with the direct path (``FLEET_HELPER=off``): the same output, the same refusals, the same
exit statuses. And the attacks on a forward: a refused device, the helper killed with -9 under an
open connection (a reset, never a clean end; the command exits 4 with one line).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from fleet_harness import PY, EchoServer, Fleet, wait_until
from test_helper import free_tcp_port, pid_alive, start_sshd

from enroll import users

REPO = Path(__file__).resolve().parents[1]

ROLES = """\
kind: role
version: v7
metadata: {name: acme-tech}
spec:
  allow:
    node_labels: {customer: acme}
    logins: [root]
    services: [ssh, echo]
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("helper-commands")
    f = Fleet(root)
    with f.state.registry() as reg:
        users.apply_roles(reg, ROLES)
    f.start_proxy()
    f.echo = EchoServer()
    port = free_tcp_port()
    config = f.enroll_device("acme-on", {"customer": "acme"},
                             {"ssh": f"127.0.0.1:{port}", "echo": f"127.0.0.1:{f.echo.port}"}, keepalive="5s")
    start_sshd(f, "acme-on", config.parent, port)
    f.start_agent(config)
    f.enroll_device("acme-off", {"customer": "acme"}, {"echo": "127.0.0.1:9"})
    f.run_dir = root / "run"
    f.run_dir.mkdir(mode=0o700)
    f.env["XDG_RUNTIME_DIR"] = str(f.run_dir)
    f.env["PYTHONPATH"] = str(REPO)
    f.alice = f.user("alice", ["acme-tech"])
    f.wait_online(f.alice, "acme-on", timeout=20)
    yield f
    f.close()
    f.echo.close()


def env(world, helper: bool = True) -> dict:
    return {**os.environ, **world.env, **({} if helper else {"FLEET_HELPER": "off"})}


def tunnel(world, *args, identity=None, helper: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "tunnel.cli", *args, "--identity", str(identity or world.alice)],
                          capture_output=True, text=True, timeout=timeout, env=env(world, helper))


def helper_status(world, identity=None) -> dict:
    out = tunnel(world, "helper", "status", "--format", "json", identity=identity)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stop_helper(world, identity=None) -> None:
    out = tunnel(world, "helper", "stop", identity=identity)
    assert out.returncode == 0, out.stderr


def stable(rows: list[dict]) -> list[dict]:
    """A listing without what changes between two asks (the agent's keepalive moves last_seen)."""
    return [{k: v for k, v in row.items() if k != "last_seen"} for row in rows]


# --- request/response: ls, ssh-cert ------------------------------------------------------------


def test_ls_through_the_helper_equals_the_direct_output(world):
    stop_helper(world)
    via = tunnel(world, "ls", "--format", "json")
    assert via.returncode == 0, via.stderr
    st = helper_status(world)
    assert st["running"] and st["connected"]  # the first ls started it
    direct = tunnel(world, "ls", "--format", "json", helper=False)
    assert direct.returncode == 0, direct.stderr
    assert stable(json.loads(via.stdout)) == stable(json.loads(direct.stdout))
    assert {d["id"] for d in json.loads(via.stdout)} == {"acme-on", "acme-off"}
    # the table, a selector, an id, and the "nothing matches" line: byte for byte
    for args in (["acme-off"], ["customer=acme", "--format", "json"], ["customer=globex"]):
        a, b = tunnel(world, "ls", *args), tunnel(world, "ls", *args, helper=False)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args
    assert "no device you may reach matches customer=globex" in a.stderr
    assert helper_status(world)["pid"] == st["pid"]  # one helper served them all


def test_whoami_through_the_helper_equals_the_direct_output(world):
    a, b = tunnel(world, "whoami", "--format", "json"), tunnel(world, "whoami", "--format", "json", helper=False)
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    assert json.loads(a.stdout) == json.loads(b.stdout)


def test_a_locked_engineer_gets_the_same_refusal_through_the_helper(world):
    """The proxy refuses a locked user: through the helper the same one line and exit status
    as directly, and the helper's warm connection gives her nothing more."""
    from enroll.cli import main as enroll_main

    mallory = world.user("mallory", ["acme-tech"])
    out = tunnel(world, "ls", identity=mallory)
    assert out.returncode == 0, out.stderr
    assert helper_status(world, mallory)["connected"]
    assert enroll_main(["--state", str(world.state.root), "user", "lock", "mallory", "--message", "laptop stolen"]) == 0
    # at once: the helper's warm connection, admitted before the lock, is checked again per request
    via, direct = tunnel(world, "ls", identity=mallory), tunnel(world, "ls", identity=mallory, helper=False)
    assert via.returncode == direct.returncode != 0, (via.stderr, direct.stderr)
    assert via.stderr == direct.stderr and via.stderr.count("\n") == 1, (via.stderr, direct.stderr)
    assert "locked" in via.stderr and "laptop stolen" in via.stderr, via.stderr
    assert via.stdout == ""
    assert not helper_status(world, mallory)["connected"]  # the proxy closed it
    denied = [e for e in world.audit() if e["type"] == "access.denied" and e.get("actor") == "user:mallory"]
    assert len(denied) >= 2, denied  # audited both ways: on the helper's stream and at the connect
    stop_helper(world, mallory)


def test_ssh_cert_through_the_helper(world):
    stop_helper(world)
    cert = world.alice / "ssh" / "root@acme-on-cert.pub"
    cert.unlink(missing_ok=True)
    out = tunnel(world, "ssh-cert", "acme-on", "root", "--print-path")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cert) and cert.read_text().startswith("ssh-ed25519-cert-v01@openssh.com ")
    assert helper_status(world)["running"]  # it went through the helper (and started it)
    direct = tunnel(world, "ssh-cert", "acme-on", "root", "--print-path", helper=False)
    assert direct.stdout == out.stdout
    # a login no role allows: the proxy's one line, exit 1, both ways
    a, b = tunnel(world, "ssh-cert", "acme-on", "postgres"), tunnel(world, "ssh-cert", "acme-on", "postgres", helper=False)
    assert a.returncode == b.returncode == 1 and a.stderr == b.stderr and a.stderr.count("\n") == 1, (a.stderr, b.stderr)
    assert not (world.alice / "ssh" / "postgres@acme-on-cert.pub").exists()


# --- forward through the helper -----------------------------------------------------------------

FORWARDING = re.compile(r"forwarding (127\.0\.0\.1):(\d+) -> ")


class Forward:
    """``tunnel forward`` (or ``db``) running, with its stderr lines collected."""

    def __init__(self, world, *args, helper: bool = True, identity=None):
        self.proc = subprocess.Popen([PY, "-m", "tunnel.cli", *args, "--identity", str(identity or world.alice)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env(world, helper))

    def address(self) -> tuple[str, int]:
        line = self.proc.stderr.readline()
        match = FORWARDING.search(line)
        assert match, line + self.rest()
        return match[1], int(match[2])

    def rest(self, timeout: float = 30) -> str:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return err

    def stop(self, sig=signal.SIGINT) -> tuple[int, str]:
        self.proc.send_signal(sig)
        err = self.rest()
        return self.proc.returncode, err


def transfer(address, blob: bytes) -> bytes:
    with socket.create_connection(address, timeout=60) as s:
        s.sendall(blob)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(1 << 16):
            chunks.append(data)
    return b"".join(chunks)


def test_forward_through_the_helper_carries_a_checksummed_transfer(world):
    stop_helper(world)
    fw = Forward(world, "forward", "acme-on", "echo")
    address = fw.address()
    st = helper_status(world)
    assert st["running"]  # the forward started the helper and handed it its socket
    blob = os.urandom(4 * 1024 * 1024)
    for _ in range(2):  # two connections, one after the other, on the same forward
        assert hashlib.sha256(transfer(address, blob)).hexdigest() == hashlib.sha256(blob).hexdigest()
    # while a connection is open it is one of the helper's sessions
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        assert helper_status(world)["sessions"] >= 1
    code, err = fw.stop()
    assert code == 0, err
    assert err == "", err  # clean connections: nothing to say
    # the handoff is over: nobody listens on the port any more (the helper let it go too)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()
    assert helper_status(world)["pid"] == st["pid"]  # the helper stays for the next command


def test_db_through_the_helper(world):
    db = subprocess.Popen([PY, "-m", "tunnel.cli", "db", "acme-on", "--service", "echo", "--db-user", "me",
                           "--identity", str(world.alice)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env(world))
    try:
        url = db.stdout.readline()
        match = re.fullmatch(r"postgresql://me@127\.0\.0\.1:(\d+)/\n", url)
        assert match, url
        assert transfer(("127.0.0.1", int(match[1])), b"select 1;") == b"select 1;"
        db.send_signal(signal.SIGTERM)
        _, err = db.communicate(timeout=30)
    finally:
        if db.poll() is None:
            db.kill()
    assert db.returncode == 0, err
    assert err == "forwarding to acme-on/echo; Ctrl-C to stop\n", err


@pytest.mark.parametrize("device, service", [("acme-off", "echo"), ("acme-on", "postgres"), ("nope", "echo")])
def test_a_refused_forward_is_one_line_and_exit_1_as_directly(world, device, service):
    """Offline device, a service no role allows, an unknown device: the preflight on the helper's
    connection refuses before anything is printed; the same line and status as directly."""
    via = tunnel(world, "forward", device, service)
    direct = tunnel(world, "forward", device, service, helper=False)
    assert via.returncode == direct.returncode == 1, (via.stderr, direct.stderr)
    assert via.stderr == direct.stderr and via.stderr.startswith("tunnel: error: "), (via.stderr, direct.stderr)
    assert via.stderr.count("\n") == 1 and via.stdout == ""


def test_a_refused_connection_with_no_check_is_reset_and_said_once(world):
    fw = Forward(world, "forward", "acme-off", "echo", "--no-check")
    address = fw.address()
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            while s.recv(1024):
                pass  # the refusal resets it: never a clean end
    wait_until(lambda: fw.proc.poll() is None, 1, 0.1, "the forward to stay up")
    code, err = fw.stop()
    assert code == 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunnel: forward 127.0.0.1:") and \
        "-> acme-off/echo: refused: device acme-off is offline" in lines[0] and "(reset the local connection)" in lines[0], err
    # the proxy decided and audited it like any other dial
    denied = [e for e in world.audit() if e["type"] == "access.denied" and e.get("device") == "acme-off"]
    assert denied, world.audit()[-5:]


def test_a_port_in_use_is_the_commands_own_error(world):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        out = tunnel(world, "forward", "acme-on", "echo", "--local", f"127.0.0.1:{port}")
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(f"tunnel: error: cannot listen on 127.0.0.1:{port}: ") and out.stderr.count("\n") == 1


def test_helper_killed_mid_forward_resets_the_connection_and_the_command_exits_cut(world):
    fw = Forward(world, "forward", "acme-on", "echo")
    address = fw.address()
    pid = helper_status(world)["pid"]
    s = socket.create_connection(address, timeout=30)
    try:
        s.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(s.recv(1 << 16))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ConnectionResetError):
            while s.recv(1 << 16):
                pass  # never a clean end: the killed helper's connection was armed to reset
    finally:
        s.close()
    err = fw.rest()
    assert fw.proc.returncode == 4, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunnel: error: ") and "the helper went away" in lines[0], err
    wait_until(lambda: not pid_alive(pid), 10, 0.05, "the killed helper to be gone")
    # the next command starts a new helper
    out = tunnel(world, "ls")
    assert out.returncode == 0, out.stderr
    assert helper_status(world)["pid"] != pid


def test_helper_stop_mid_forward_ends_it_as_cut(world):
    fw = Forward(world, "forward", "acme-on", "echo")
    address = fw.address()
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(b"abc")
        assert s.recv(3) == b"abc"
        stop_helper(world)
        with pytest.raises(ConnectionResetError):
            while s.recv(1024):
                pass
    err = fw.rest()
    assert fw.proc.returncode == 4, err
    assert err.splitlines()[-1].startswith("tunnel: error: the helper stopped (asked to stop)"), err


def test_forward_with_the_helper_off_still_works(world):
    fw = Forward(world, "forward", "acme-on", "echo", helper=False)
    address = fw.address()
    assert transfer(address, b"direct") == b"direct"
    code, err = fw.stop()
    assert code == 0, err


# --- the Ansible inventory plugin ---------------------------------------------------------------


def test_inventory_plugin_with_and_without_the_helper(world, tmp_path):
    from test_ansible import ansible_cmd, ansible_env, inventory_file

    inv = inventory_file(tmp_path, world.alice)
    stop_helper(world)

    def listing(helper: bool) -> dict:
        out = subprocess.run(ansible_cmd("ansible-inventory", "-i", inv, "--list"), capture_output=True, text=True,
                             timeout=120, env=ansible_env(**world.env, **({} if helper else {"FLEET_HELPER": "off"})))
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        for host in data["_meta"]["hostvars"].values():
            host.pop("fleet_last_seen", None)
        return data

    direct = listing(False)
    assert not helper_status(world)["running"]  # FLEET_HELPER=off: the plugin dialed itself
    via = listing(True)
    assert helper_status(world)["running"]  # the listing started the helper
    assert via == direct and set(via["_meta"]["hostvars"]) == {"acme-on", "acme-off"}
    # and a real playbook through it: the listing, the certificate and the session via the helper
    book = tmp_path / "whoami.yml"
    book.write_text("- hosts: acme-on\n  gather_facts: false\n  tasks:\n"
                    "    - ansible.builtin.command: echo via-helper\n      register: out\n      changed_when: false\n"
                    "    - ansible.builtin.assert:\n        that: out.stdout == 'via-helper'\n")
    cp = tmp_path / "cp"
    cp.mkdir()
    out = subprocess.run(ansible_cmd("ansible-playbook", "-i", inv, book), capture_output=True, text=True,
                         timeout=300, env=ansible_env(**world.env, ANSIBLE_SSH_CONTROL_PATH_DIR=cp))
    for sock in cp.iterdir():
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "ok=2" in out.stdout, out.stdout[-2000:]
    # a device that is offline: UNREACHABLE with the tunnel's reason, through the helper
    out = subprocess.run(ansible_cmd("ansible", "-i", inv, "acme-off", "-m", "ping"), capture_output=True,
                         text=True, timeout=300, env=ansible_env(**world.env))
    assert out.returncode != 0 and "UNREACHABLE" in out.stdout, out.stdout
    assert "device acme-off is offline" in out.stdout, out.stdout
