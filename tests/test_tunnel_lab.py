"""The tunnel across real NAT and CGNAT, with real OpenSSH, scp and PostgreSQL.

One lab per module: the proxy in the internet namespace (public 198.18.0.1 and ground-station
192.0.2.1 addresses), devices behind CGNAT running the agent and their own sshd that trusts
only the fleet user CA, engineers running in the internet namespace. Engineers log in with
their own certificates; the roles give the two customers' engineers disjoint devices.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fleet_harness import PY, Fleet, wait_until
from lab import netns

from enroll import admin, users

pytestmark = pytest.mark.lab

LOGINS = ("ftdiag", "ftread")
ROLES = """\
kind: role
version: v7
metadata: {name: acme-tech}
spec:
  allow:
    node_labels: {customer: acme}
    logins: [ftdiag]
    services: [ssh, echo]
  deny:
    node_labels: {lifecycle: decommissioned}
---
kind: role
version: v7
metadata: {name: globex-tech}
spec:
  allow:
    node_labels: {customer: globex}
    logins: [ftread]
    services: [ssh, echo, postgres]
"""


def ensure_login_users():
    """Unix accounts the roles grant (sshd logs into real accounts)."""
    for login in LOGINS:
        if subprocess.run(["id", login], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", login], check=True)
        # "*" = no password, but not locked: sshd without PAM refuses locked ("!") accounts
        subprocess.run(["usermod", "-p", "*", login], check=True)


class World:
    """Everything a test in this module needs, built once."""

    def __init__(self, lab, root: Path):
        self.lab = lab
        self.fleet = Fleet(root, proxy_host=lab.proxy_public, proxy_port=443, extra_ips=(lab.proxy_ground,))
        self.fleet.start_proxy(spawn=lambda argv, **kw: lab.spawn(lab.internet, argv, **kw),
                               listen="0.0.0.0:443")
        with self.fleet.state.registry() as reg:
            users.apply_roles(reg, ROLES)
        self.devices = {}
        self.sshd = {}
        self.cleanup: list[Path] = []
        for name, customer in (("acme-1", "acme"), ("acme-2", "acme"), ("globex-1", "globex"),
                               ("globex-2", "globex"), ("globex-3", "globex")):
            self.add_device(name, customer)
        self.ops = self.login("ops", ["admin"])
        self.alice = self.login("alice", ["acme-tech"])
        self.bob = self.login("bob", ["globex-tech"])
        for name in self.devices:
            self.fleet.wait_online(self.ops, name, run=self.run, timeout=30)

    def add_device(self, name: str, customer: str) -> None:
        dev = self.lab.add_device(name.replace("-", ""), uplinks=("cellular",))
        config = self.fleet.enroll_device(
            name, {"customer": customer, "site": "dal"},
            {"ssh": "127.0.0.1:22", "echo": "127.0.0.1:7", "postgres": "127.0.0.1:5432"},
            keepalive="5s",
        )
        d = config.parent
        # sshd reads principals files as the target user: root-owned, world-readable, outside
        # root's private pytest tree (as /etc/ssh/fleet-principals is on a real device).
        principals = Path(tempfile.mkdtemp(prefix=f"ft-principals-{name}-"))
        principals.chmod(0o755)
        self.cleanup.append(principals)
        for login in (*LOGINS, "root"):
            (principals / login).write_text(f"{login}@{name}\n")
            (principals / login).chmod(0o644)
        self.sshd[name] = dev.start_sshd(
            config_extra=(f"AuthorizedKeysFile none\nTrustedUserCAKeys {d}/user_ca.pub\n"
                          f"AuthorizedPrincipalsFile {principals}/%u\n"
                          f"HostCertificate {d}/ssh_host_ed25519_key-cert.pub\n"),
            host_key_dir=d,
        )
        # -t 60: after the client's half-close, socat must wait for cat's output to drain
        # through the tunnel (its default 0.5 s truncates the echo on a busy machine)
        dev.spawn(["socat", "-t", "60", "TCP-LISTEN:7,bind=127.0.0.1,reuseaddr,fork", "EXEC:cat"])
        self.fleet.start_agent(config, spawn=lambda argv, **kw: dev.spawn(argv, **kw))
        self.devices[name] = dev

    def run(self, argv, **kw):
        """subprocess.run inside the internet namespace, where engineers sit."""
        return subprocess.run(netns.ns_argv(self.lab.internet, argv), **kw)

    def login(self, name: str, roles: list[str]) -> Path:
        """A user via invite + `tunnel login` (admins use a direct `enroll user issue`)."""
        if roles == ["admin"]:
            return self.fleet.user(name, roles)
        with self.fleet.state.registry() as reg:
            invite, _ = users.add(reg, name, roles)
        identity = self.fleet.root / "users" / name
        out = self.run([PY, "-m", "tunnel.cli", "login", "--proxy", self.fleet.address, "--user", name,
                        "--ca-pin", self.fleet.pin, "--server-name", "proxy.test",
                        "--password-stdin", "--identity", str(identity)],
                       input=b"correct horse battery\n", capture_output=True, timeout=30,
                       env={**os.environ, "FLEET_INVITE": invite})
        assert out.returncode == 0, out.stderr
        return identity

    def tunnel(self, *args, identity, **kw):
        return self.fleet.tunnel(*args, identity=identity, run=self.run, **kw)

    def ssh(self, identity: Path, target: str, *command: str, extra=()) -> subprocess.CompletedProcess:
        argv = [PY, "-m", "tunnel.cli", "ssh", "--identity", str(identity),
                "-o", "BatchMode=yes", "-o", "ControlMaster=no", *extra, target, *command]
        return self.run(argv, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def world(module_lab, tmp_path_factory):
    ensure_login_users()
    w = World(module_lab, tmp_path_factory.mktemp("tunnel-lab"))
    yield w
    w.fleet.close()
    for path in w.cleanup:
        shutil.rmtree(path, ignore_errors=True)


# --- issue: the tunnel across CGNAT -----------------------------------------------------------


def test_ssh_and_scp_through_cgnat(world, tmp_path):
    out = world.ssh(world.ops, "root@acme-1", "hostname; echo via-tunnel")
    assert out.returncode == 0, out.stderr
    assert b"via-tunnel" in out.stdout
    # the proxy saw the CGNAT's outer address, not the device's
    status = json.loads(world.tunnel("status", "acme-1", "--format", "json", identity=world.ops).stdout)
    dev = world.devices["acme-1"]
    assert status[0]["address"].split(":")[0] == dev.public_address("cellular")

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(50 * 1024 * 1024))
    config = world.fleet.root / "users" / "ops" / "ssh_config.all"
    assert config.exists()
    out = world.run(["scp", "-q", "-F", str(config), "-o", "BatchMode=yes", str(big),
                     "root@acme-1:/tmp/ft-big.bin"], capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    out = world.ssh(world.ops, "root@acme-1", "sha256sum /tmp/ft-big.bin; rm -f /tmp/ft-big.bin")
    assert out.stdout.split()[0].decode() == hashlib.sha256(big.read_bytes()).hexdigest()


def test_twenty_concurrent_sessions_to_five_devices(world):
    """4 sessions to each of 5 devices at once through `tunnel forward`, checksummed both ways."""
    forwards = []
    ports = {}
    for name in world.devices:
        proc = world.lab.spawn(world.lab.internet, [
            PY, "-m", "tunnel.cli", "forward", name, "echo", "--identity", str(world.ops),
        ], stderr=subprocess.PIPE, text=True)
        forwards.append(proc)
        line = proc.stderr.readline()
        assert line.startswith("forwarding"), line
        ports[name] = int(line.split()[1].rsplit(":", 1)[1])
    results = {}

    def session(name, i):
        payload = os.urandom(200_000 + i)
        s = world.lab.socket(world.lab.internet, socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(("127.0.0.1", ports[name]))
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
        sender.join()
        s.close()
        results[(name, i)] = got == payload

    threads = [threading.Thread(target=session, args=(n, i)) for n in world.devices for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for p in forwards:
            netns.stop_process(p)
    assert len(results) == 20 and all(results.values()), results


@pytest.mark.skipif(not shutil.which("psql"), reason="psql is not installed (scripts/test installs postgresql)")
def test_psql_through_tunnel_forward(world, tmp_path):
    pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    data = Path(tempfile.mkdtemp(prefix="ft-pgdata-"))  # outside root's 0700 pytest tree
    shutil.chown(data, "postgres", "postgres")
    subprocess.run(["runuser", "-u", "postgres", "--", str(pg_bin / "initdb"), "-D", str(data),
                    "--auth=trust", "-U", "postgres"], check=True, capture_output=True)
    dev = world.devices["globex-1"]
    pg = dev.spawn(["runuser", "-u", "postgres", "--", str(pg_bin / "postgres"), "-D", str(data),
                    "-h", "127.0.0.1", "-p", "5432", "-k", str(data)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    forward = None
    try:
        wait_until(lambda: dev.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], check=False)
                   .returncode == 0, 30, 0.2, "postgres ready")
        forward = world.lab.spawn(world.lab.internet, [
            PY, "-m", "tunnel.cli", "db", "globex-1", "--identity", str(world.bob), "--db-user", "postgres",
        ], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        url = forward.stdout.readline().strip()
        assert url.startswith("postgresql://postgres@127.0.0.1:"), url
        out = world.run(["psql", url + "postgres", "-tAc", "select 40 + 2"], capture_output=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == b"42"
        # acme's engineer may not reach globex's database
        out = world.tunnel("proxy-command", "globex-1", "postgres", identity=world.alice, input=b"")
        assert out.returncode == 1 and b"no device 'globex-1'" in out.stderr
    finally:
        if forward:
            netns.stop_process(forward)
        netns.stop_process(pg)
        shutil.rmtree(data, ignore_errors=True)


def test_inbound_to_the_device_is_impossible(world):
    """Nothing listens on the device's networks: its sshd is on loopback, behind CGNAT."""
    dev = world.devices["acme-1"]
    s = world.lab.socket(world.lab.internet, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1)
    with pytest.raises(OSError):
        s.connect((dev.public_address("cellular"), 22))


# --- issue: roles, tenant isolation, SSH certificates ------------------------------------------


def _ls(world, identity):
    out = world.tunnel("ls", "--format", "json", identity=identity)
    assert out.returncode == 0, out.stderr
    return sorted(d["id"] for d in json.loads(out.stdout))


def test_tenant_isolation_matrix(world):
    """users × devices × logins × services: list, dial and a real ssh login, every cell."""
    acme, globex = ["acme-1", "acme-2"], ["globex-1", "globex-2", "globex-3"]
    assert _ls(world, world.alice) == acme
    assert _ls(world, world.bob) == globex
    grants = {"alice": ("acme", "ftdiag", {"ssh", "echo"}), "bob": ("globex", "ftread", {"ssh", "echo", "postgres"})}
    for user, identity in (("alice", world.alice), ("bob", world.bob)):
        customer, own_login, services = grants[user]
        for device in ("acme-1", "globex-1"):
            mine = device.startswith(customer)
            out = world.tunnel("proxy-command", device, "echo", identity=identity, input=b"ping\n")
            if mine:
                assert out.returncode == 0 and out.stdout == b"ping\n", (user, device, out)
            else:
                assert out.returncode == 1 and f"no device '{device}'".encode() in out.stderr
            out = world.tunnel("proxy-command", device, "postgres", identity=identity, input=b"")
            assert out.returncode == 1
            if mine and "postgres" not in services:
                assert b"no role allows postgres" in out.stderr, out.stderr
            elif mine:  # allowed by policy; nothing listens there in this test
                assert b"is not accepting" in out.stderr, out.stderr
            for login in LOGINS:
                out = world.ssh(identity, f"{login}@{device}", "id -un")
                ok = mine and login == own_login
                if ok:
                    assert out.returncode == 0 and out.stdout.strip() == login.encode(), (user, device, login, out)
                else:
                    assert out.returncode != 0, (user, device, login, out)
                    assert b"refused" in out.stderr or b"no device" in out.stderr or b"no role" in out.stderr


def test_ssh_certificate_is_bound_to_one_login_on_one_device(world, tmp_path):
    from tunnel.client import UserIdentity
    from tunnel.engineer import ssh_cert_path

    assert world.ssh(world.alice, "ftdiag@acme-1", "true").returncode == 0
    ident = UserIdentity.load(world.alice)
    cert = ssh_cert_path(ident, "acme-1", "ftdiag")
    key = world.alice / "ssh" / "id_ed25519"
    proxy_cmd = f"{PY} -m tunnel.cli proxy-command %h %p --identity {world.ops}"
    for target in ("ftdiag@acme-2", "ftread@acme-1", "root@acme-1"):
        out = world.run(["ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy_cmd}", "-o", "BatchMode=yes",
                         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                         "-o", "IdentitiesOnly=yes", "-i", str(key), "-o", f"CertificateFile={cert}",
                         target, "true"], capture_output=True, timeout=30)
        assert out.returncode == 255 and b"Permission denied" in out.stderr, (target, out.stderr)


def test_relabel_cuts_the_open_session_within_a_second(world):
    dev_id = "acme-2"
    proc = world.lab.spawn(world.lab.internet, [
        PY, "-m", "tunnel.cli", "ssh", "--identity", str(world.alice),
        "-o", "BatchMode=yes", "-o", "ControlMaster=no", f"ftdiag@{dev_id}",
        "while :; do echo tick; sleep 0.1; done",
    ], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"tick\n"
        with world.fleet.state.registry() as reg:
            admin.relabel(reg, dev_id, {"customer": "globex"}, [])
        cut_at = time.monotonic()
        proc.wait(timeout=10)
        elapsed = time.monotonic() - cut_at
        # the proxy re-checks every second; the ssh client then notices the reset stream
        assert elapsed < 3.0, elapsed
        assert dev_id not in _ls(world, world.alice)
        assert dev_id in _ls(world, world.bob)
        ends = [e for e in world.fleet.audit() if e["type"] == "session.end" and e["device"] == dev_id]
        assert ends and ends[-1]["reason"].startswith("cut:")
    finally:
        if proc.poll() is None:
            netns.stop_process(proc)
        with world.fleet.state.registry() as reg:
            admin.relabel(reg, dev_id, {"customer": "acme"}, [])


def test_user_lock_blocks_new_sessions(world):
    with world.fleet.state.registry() as reg:
        users.lock(reg, "bob", None, "offboarding")
    try:
        out = world.tunnel("ls", identity=world.bob)
        assert out.returncode == 1 and b"locked" in out.stderr
    finally:
        with world.fleet.state.registry() as reg:
            users.unlock(reg, "bob")
    assert world.tunnel("ls", identity=world.bob).returncode == 0
