"""The per-user helper and its standard-library ProxyCommand client (issue 15).

The protocol is tested without sockets; the client's imports in a subprocess; then real
OpenSSH (ssh with the generated config) through a real helper, proxy, agent and a loopback sshd
that trusts the fleet's user CA — including each bad input the issue lists: a stale socket
file, a socket owned by another user, a process of another uid behind the socket, a helper of
another version, a stuck helper, a replaced identity, and a helper killed mid-session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fleet_harness import ACME_TECH_ROLE, PY, Fleet, wait_until

from enroll import users
from tunnel import helper_protocol as hp
from tunnel import sshwire

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "tunnel" / "helper_client.py"
#: an interpreter another uid may run (the virtualenv's may sit in a private directory)
SYSTEM_PY = "/usr/bin/python3"

# --- the protocol (sans-I/O) ------------------------------------------------------------------

V, STAMP = "1.abc", "1:2:3"


def test_request_round_trip_and_checks():
    line = hp.request("dial", V, STAMP, device="d1", service="22", login="root")
    req = hp.parse_request(line, V, STAMP)
    assert (req["op"], req["device"], req["service"], req["login"]) == ("dial", "d1", "22", "root")
    assert "login" not in hp.parse_request(hp.request("dial", V, STAMP, device="d1", service="ssh", login=None), V, STAMP)


@pytest.mark.parametrize("line, code", [
    (b"not json\n", "bad_request"),
    (b"[1]\n", "bad_request"),
    (b'{"protocol":1}', "bad_request"),  # no newline: cut short
    (b'{"protocol":1,"version":"1.abc","identity":"1:2:3","op":"rm"}\n', "bad_request"),
    (b'{"protocol":1,"version":"1.abc","identity":"1:2:3","op":"dial","device":"d1"}\n', "bad_request"),
    (b'{"protocol":1,"version":"1.abc","identity":"1:2:3","op":"dial","device":"d\\n1","service":"22"}\n',
     "bad_request"),
    (b'{"protocol":1,"version":"1.abc","identity":"1:2:3","op":"dial","device":"d1","service":"22","x":1}\n',
     "bad_request"),
    (b'{"protocol":1,"version":"0.old","identity":"1:2:3","op":"status"}\n', "version_mismatch"),
    (b'{"protocol":2,"version":"1.abc","identity":"1:2:3","op":"status"}\n', "version_mismatch"),
    (b'{"protocol":1,"version":"1.abc","identity":"9:9:9","op":"status"}\n', "stale_identity"),
    (b'{"protocol":1,"version":"1.abc","identity":"9:9:9","op":"dial"}\n', "bad_request"),  # malformed first
    (b"{" + b" " * hp.MAX_LINE + b"}\n", "bad_request"),
])
def test_bad_requests_are_refused_with_a_code(line, code):
    with pytest.raises(hp.ProtocolError) as err:
        hp.parse_request(line, V, STAMP)
    assert err.value.code == code


def test_frames_round_trip_split_anywhere():
    data = hp.data_frames(b"x" * (hp.MAX_FRAME + 10)) + hp.frame(hp.END) + hp.frame(hp.CUT, b"why")
    for step in (1, 7, 4096, len(data)):
        dec = hp.FrameDecoder()
        frames = [f for i in range(0, len(data), step) for f in dec.feed(data[i:i + step])]
        assert [k for k, _ in frames] == [hp.DATA, hp.DATA, hp.END, hp.CUT]
        assert b"".join(p for k, p in frames if k == hp.DATA) == b"x" * (hp.MAX_FRAME + 10)
        assert frames[-1][1] == b"why" and not dec.partial


@pytest.mark.parametrize("bad", [b"Q\0\0\0\0", hp.FRAME_HEAD.pack(hp.DATA, hp.MAX_FRAME + 1),
                                 hp.FRAME_HEAD.pack(hp.END, 3) + b"abc"])
def test_bad_frames_are_refused(bad):
    with pytest.raises(hp.ProtocolError):
        hp.FrameDecoder().feed(bad)


def test_each_identity_gets_its_own_socket(tmp_path):
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    a, b = hp.socket_path(str(tmp_path / "a"), env), hp.socket_path(str(tmp_path / "b"), env)
    assert a != b and a.startswith("/run/user/1000/fleet-tunnel/helper-") and a.endswith(".sock")
    assert hp.socket_path(str(tmp_path / "a") + "/", env) == a  # the same directory, spelled otherwise
    assert hp.socket_path(str(tmp_path / "a"), {}).startswith(str(tmp_path / "a") + "/helper-")


def test_identity_stamp_changes_with_the_certificate(tmp_path):
    assert hp.identity_stamp(str(tmp_path)) == "none"
    (tmp_path / "user.crt").write_text("a")
    first = hp.identity_stamp(str(tmp_path))
    (tmp_path / "new").write_text("bb")
    (tmp_path / "new").rename(tmp_path / "user.crt")
    assert hp.identity_stamp(str(tmp_path)) not in (first, "none")


def test_client_imports_only_the_standard_library():
    """The ProxyCommand client must start fast: the standard library and the pure error root only
    (no asyncio, cryptography, aioquic, yaml, h2), and not even the slow parts of that: ``socket``
    (enum, selectors), ``typing``, ``hashlib`` (OpenSSL), ``json`` (re); ``sshwire`` loads only to refuse."""
    out = subprocess.run([PY, "-I", "-S", "-X", "importtime", str(CLIENT)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "usage:" in out.stderr
    modules = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    modules.discard("imported package")
    ours = {m for m in modules if m.split(".")[0] == "tunnel"}
    assert ours == {"tunnel", "tunnel.helper_protocol"}, ours
    core = {"enroll", "enroll.errors"}  # the error root: pure, imports nothing (sshwire's errors derive from it)
    foreign = {m for m in modules - ours - core if m.split(".")[0] not in sys.stdlib_module_names}
    assert not foreign, foreign
    assert not modules & {"asyncio", "cryptography", "aioquic", "yaml", "h2", "ssl"}
    assert not modules & {"socket", "typing", "hashlib", "subprocess", "selectors", "json", "re"}, modules


# --- real OpenSSH through a real helper -------------------------------------------------------

ROLES = ACME_TECH_ROLE


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sshd(f: Fleet, name: str, device_dir: Path, port: int) -> None:
    from lab import plan

    principals = Path(tempfile.mkdtemp(prefix=f"ft-principals-{name}-"))
    principals.chmod(0o755)
    (principals / "root").write_text(f"root@{name}\n")
    (principals / "root").chmod(0o644)
    config = device_dir / "sshd_config"
    config.write_text(plan.sshd_config(
        port=port, host_keys=[device_dir / "ssh_host_ed25519_key"], pid_file=str(device_dir / "sshd.pid"),
        authorized_keys="none",
        extra=(f"TrustedUserCAKeys {device_dir}/user_ca.pub\nAuthorizedPrincipalsFile {principals}/%u\n"
               f"HostCertificate {device_dir}/ssh_host_ed25519_key-cert.pub\n"),
    ))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = device_dir / "sshd.log"
    proc = f.start(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], log)
    wait_until(lambda: "Server listening on" in log.read_text(errors="replace") or proc.poll() is not None,
               10, 0.02, "sshd listening")
    assert proc.poll() is None, log.read_text()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("helper")
    f = Fleet(root)
    with f.state.registry() as reg:
        users.apply_roles(reg, ROLES)
    f.start_proxy()
    port = free_tcp_port()
    config = f.enroll_device("acme-on", {"customer": "acme"}, {"ssh": f"127.0.0.1:{port}"}, keepalive="5s")
    start_sshd(f, "acme-on", config.parent, port)
    f.start_agent(config)
    f.enroll_device("acme-off", {"customer": "acme"}, {"ssh": "127.0.0.1:22"})
    f.ops = f.user("ops", ["admin"])
    f.alice = f.user("alice", ["acme-tech"])
    f.wait_online(f.ops, "acme-on", timeout=20)
    f.run_dir = root / "run"
    f.run_dir.mkdir(mode=0o700)
    f.env["XDG_RUNTIME_DIR"] = str(f.run_dir)
    f.env["PYTHONPATH"] = str(REPO)
    out = f.tunnel("config", "--hosts", "*", "--write", identity=f.alice)
    assert out.returncode == 0, out.stderr
    f.config = f.alice / "ssh_config.all"
    yield f
    for ident in (f.alice, f.ops):
        subprocess.run([PY, "-m", "tunnel.cli", "helper", "stop", "--identity", str(ident)],
                       env=env(f), capture_output=True, timeout=30)
    f.close()


def env(world) -> dict:
    return {**os.environ, **world.env}


def sock_path(world, identity=None) -> Path:
    return Path(hp.socket_path(str(identity or world.alice), {"XDG_RUNTIME_DIR": str(world.run_dir)}))


def ssh(world, *command, target="root@acme-on", share=False, timeout=60) -> subprocess.CompletedProcess:
    """Plain ssh with the generated config; by default without connection sharing, so each run
    starts the ProxyCommand (and its stderr reaches us)."""
    extra = [] if share else ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    return subprocess.run(["ssh", "-F", str(world.config), "-o", "BatchMode=yes", *extra, target, *command],
                          capture_output=True, text=True, timeout=timeout, env=env(world))


def status(world, identity=None) -> dict:
    out = subprocess.run([PY, "-m", "tunnel.cli", "helper", "status", "--format", "json",
                          "--identity", str(identity or world.alice)],
                         capture_output=True, text=True, timeout=30, env=env(world))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stop_helper(world, identity=None) -> None:
    out = subprocess.run([PY, "-m", "tunnel.cli", "helper", "stop", "--identity", str(identity or world.alice)],
                         capture_output=True, text=True, timeout=30, env=env(world))
    assert out.returncode == 0, out.stderr
    assert not status(world, identity)["running"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_ssh_starts_the_helper_and_reuses_it(world):
    stop_helper(world)
    out = ssh(world, "echo via-helper")
    assert out.returncode == 0 and out.stdout == "via-helper\n", out.stderr
    first = status(world)
    assert first["running"] and first["connected"] and first["identity"] == str(world.alice)
    path = sock_path(world)
    assert first["socket"] == str(path) and path.parent == world.run_dir / "fleet-tunnel"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    # the helper is detached: its own session, not ssh's
    assert os.getsid(first["pid"]) == first["pid"]
    out = ssh(world, "echo again")
    assert out.returncode == 0 and out.stdout == "again\n", out.stderr
    assert status(world)["pid"] == first["pid"]
    # the session went through the proxy, audited as ever
    starts = [e for e in world.audit() if e["type"] == "session.start" and e.get("device") == "acme-on"]
    assert starts, world.audit()[-5:]


def test_connection_sharing_and_bulk_data_survive(world, tmp_path):
    blob = os.urandom(3 * 1024 * 1024)
    out = subprocess.run(["ssh", "-F", str(world.config), "-o", "BatchMode=yes", "root@acme-on",
                          "sha256sum"], input=blob, capture_output=True, timeout=60, env=env(world))
    import hashlib

    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()


def test_an_ssh_master_that_exits_ends_its_session_cleanly(world, tmp_path):
    """ssh SIGHUPs its ProxyCommand as it exits (a ControlPersist master retiring, ``-O exit``,
    the end of every Ansible run): the session still ends as a closed TCP connection would —
    session.end ok — not cut, held for resuming and audited as an error."""
    seen = len(world.audit())
    control = ["-o", "ControlMaster=auto", "-o", f"ControlPath={tmp_path}/cm", "-o", "ControlPersist=60"]
    base = ["ssh", "-F", str(world.config), "-o", "BatchMode=yes", *control]
    out = subprocess.run([*base, "-fN", "root@acme-on"], capture_output=True, text=True, timeout=60, env=env(world))
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*base, "root@acme-on", "echo shared"], capture_output=True, text=True, timeout=60,
                         env=env(world))
    assert out.returncode == 0 and out.stdout == "shared\n", out.stderr
    subprocess.run([*base, "-O", "exit", "root@acme-on"], capture_output=True, timeout=30, env=env(world))

    def ended():
        events = [e for e in world.audit()[seen:] if e.get("device") == "acme-on"]
        started = {e["fields"]["session"] for e in events if e["type"] == "session.start"}
        return started and [e for e in events if e["type"] in ("session.end", "session.detach")
                            and e["fields"]["session"] in started]

    ends = wait_until(ended, 15, 0.1, "the master's session ended")
    assert [(e["type"], e["result"]) for e in ends] == [("session.end", "ok")], ends


def test_second_identity_gets_its_own_helper(world):
    out = subprocess.run([PY, "-m", "tunnel.cli", "config", "--hosts", "*", "--write", "--identity", str(world.ops)],
                         capture_output=True, text=True, timeout=30, env=env(world))
    assert out.returncode == 0, out.stderr
    ssh(world, "true")
    ops = subprocess.run(["ssh", "-F", str(world.ops / "ssh_config.all"), "-o", "BatchMode=yes", "-o",
                          "ControlMaster=no", "root@acme-on", "true"], capture_output=True, text=True,
                         timeout=60, env=env(world))
    # ops has no acme-on root principal file issue: any answer from the proxy is fine; a helper ran
    assert "fleet-tunnel: " not in ops.stderr or ops.returncode == 255
    a, b = status(world), status(world, world.ops)
    assert a["running"] and b["running"] and a["pid"] != b["pid"] and a["socket"] != b["socket"]
    stop_helper(world, world.ops)


def test_refusal_through_the_helper_speaks_ssh_and_exits_1(world):
    out = subprocess.run([PY, "-I", "-S", str(CLIENT), "dial", "acme-off", "22", "--login", "root",
                          "--identity", str(world.alice)], input=b"", capture_output=True, timeout=60,
                         env=env(world))
    assert out.returncode == 1, out.stderr
    assert out.stderr.decode().startswith("tunnel: error: device acme-off is offline")
    assert out.stdout.startswith(sshwire.IDENTIFICATION)
    payload, rest = sshwire.decode_packet(out.stdout[len(sshwire.IDENTIFICATION):])
    assert rest == b"" and sshwire.decode_disconnect(payload)[1].startswith("fleet-tunnel: device acme-off is offline")
    out = ssh(world, "true", target="root@acme-off", share=True)
    assert out.returncode == 255 and "65535:11: fleet-tunnel: device acme-off is offline" in out.stderr


def test_helper_off_takes_the_direct_path(world):
    out = subprocess.run(["ssh", "-F", str(world.config), "-o", "BatchMode=yes", "-o", "ControlMaster=no",
                          "root@acme-on", "echo direct"], capture_output=True, text=True, timeout=60,
                         env={**env(world), "FLEET_HELPER": "off"})
    assert out.returncode == 0 and out.stdout == "direct\n", out.stderr


# --- bad input: each is detected, a new helper takes over, no hang, no prompt -----------------


def _takes_over(world, old_pid=None) -> dict:
    out = ssh(world, "echo took-over")
    assert out.returncode == 0 and out.stdout == "took-over\n", out.stderr
    st = status(world)
    assert st["running"] and st["pid"] != old_pid
    assert sock_path(world).lstat().st_uid == os.getuid()
    return st


def test_stale_socket_file(world):
    stop_helper(world)
    path = sock_path(world)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on (a helper killed with -9, a reboot without tmpfs)
    _takes_over(world)


def test_socket_owned_by_another_user(world):
    stop_helper(world)
    path = sock_path(world)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen()
    os.chown(path, 65534, 65534)
    try:
        _takes_over(world)
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.accept()  # nobody talked to it
    finally:
        s.close()


IMPOSTOR = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen()
print("ready", flush=True)
mode = sys.argv[2]
while True:
    c, _ = s.accept()
    data = c.recv(65536)
    print("got", len(data), flush=True)
    if mode == "old" and data:
        c.sendall(json.dumps({"ok": False, "code": "version_mismatch", "version": "0.old",
                              "reason": "helper version 0.old"}).encode() + b"\n")
    elif mode == "silent":
        import time; time.sleep(60)
    c.close()
"""


def _impostor(world, tmp_path, mode: str, user=None) -> subprocess.Popen:
    """A listener at the helper's path: another uid's, a helper of another version, a stuck one."""
    spot = Path(tempfile.mkdtemp(prefix="ft-impostor-", dir=tmp_path if user is None else None))
    spot.chmod(0o777)  # another uid binds its socket here (pytest's own tree is private)
    proc = subprocess.Popen([SYSTEM_PY, "-c", IMPOSTOR, str(spot / "s"), mode], stdout=subprocess.PIPE, text=True,
                            user=user, cwd="/")
    assert proc.stdout.readline() == "ready\n"
    os.chown(spot / "s", os.getuid(), os.getgid())  # the file looks ours; the process is not
    sock_path(world).parent.mkdir(mode=0o700, exist_ok=True)
    os.rename(spot / "s", sock_path(world))
    spot.rmdir()
    return proc


def test_a_process_of_another_uid_behind_the_socket(world, tmp_path):
    stop_helper(world)
    imp = _impostor(world, tmp_path, "quiet", user=65534)
    try:
        _takes_over(world)
    finally:
        imp.kill()
        out, _ = imp.communicate()
    # SO_PEERCRED said uid 65534: the client sent it nothing (not even the request line)
    assert "got" not in out or all(line == "got 0" for line in out.splitlines()), out


@pytest.mark.parametrize("mode", ["old", "silent"])
def test_a_helper_of_another_version_or_a_stuck_one(world, tmp_path, mode):
    stop_helper(world)
    imp = _impostor(world, tmp_path, mode)
    try:
        started = time.monotonic()
        _takes_over(world)
        assert time.monotonic() - started < 30  # not a hang (the ack timeout is 3 s)
    finally:
        imp.kill()
        imp.communicate()


def test_the_real_helper_retires_on_a_version_mismatch(world):
    out = ssh(world, "true")
    assert out.returncode == 0, out.stderr
    pid = status(world)["pid"]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path(world)))
        s.sendall(hp.request("status", "0.old", hp.identity_stamp(str(world.alice))))
        ack = json.loads(s.makefile("rb").readline())
    assert ack["ok"] is False and ack["code"] == "version_mismatch"
    wait_until(lambda: not pid_alive(pid), 10, 0.05, "the old helper to exit")
    assert not sock_path(world).exists()
    _takes_over(world, pid)


def test_a_replaced_identity_retires_the_helper(world):
    out = ssh(world, "true")
    assert out.returncode == 0, out.stderr
    pid = status(world)["pid"]
    world.user("alice", ["acme-tech"])  # a new certificate in the same directory ('tunnel login' again)
    wait_until(lambda: not pid_alive(pid), 10, 0.05, "the helper of the old certificate to exit")
    _takes_over(world, pid)


def test_a_peer_of_another_uid_is_refused_by_the_helper(world):
    """SO_PEERCRED on the helper's side: even with the socket opened up, another uid gets nothing."""
    out = ssh(world, "true")
    assert out.returncode == 0, out.stderr
    path = sock_path(world)
    path.chmod(0o666)
    path.parent.chmod(0o711)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        # the helper answers before reading anything from such a peer
        code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
                "print(s.makefile().readline(), end='')\n")
        out = subprocess.run([SYSTEM_PY, "-c", code, f"/proc/self/fd/{dirfd}/{path.name}"], user=65534,
                             pass_fds=(dirfd,), capture_output=True, text=True, timeout=30, cwd="/")
    finally:
        os.close(dirfd)
        path.chmod(0o600)
        path.parent.chmod(0o700)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["ok"] is False and reply["code"] == "forbidden" and "pid" not in reply


def test_a_killed_helper_ends_the_ssh_session_as_cut(world):
    out = ssh(world, "true")
    assert out.returncode == 0, out.stderr
    pid = status(world)["pid"]
    proc = subprocess.Popen(["ssh", "-F", str(world.config), "-o", "BatchMode=yes", "-o", "ControlMaster=no",
                             "-o", "ControlPath=none", "root@acme-on", "echo started; sleep 60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(world))
    try:
        assert proc.stdout.readline() == "started\n"
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)  # ssh sees the stream end: no half-open session
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 255, err
    assert "tunnel: error: session to acme-on/22 cut after" in err and "the helper went away" in err, err
    # the proxy ends the session too, never as a clean close from the engineer
    wait_until(lambda: any(e["type"] == "session.end" for e in world.audit()[-5:]), 20, 0.2, "session.end")
    _takes_over(world, pid)


def test_helper_exits_when_idle(world, tmp_path):
    stop_helper(world)
    proc = subprocess.Popen([PY, "-m", "tunnel.cli", "helper", "run", "--idle", "2s", "--identity",
                             str(world.alice)], env=env(world), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert "idle for 2s" in proc.stderr.read()
    assert not sock_path(world).exists()


def test_an_expired_identity_is_refused_then_a_new_login_takes_over(world):
    """The helper's certificate expires: it retires; the next ssh says to log in again (exit 1
    through `tunnel ssh`); after a new login a new helper serves the new certificate."""
    carol = world.user("carol", ["acme-tech"], ttl="20s")
    out = subprocess.run([PY, "-m", "tunnel.cli", "config", "--hosts", "*", "--write", "--identity", str(carol)],
                         capture_output=True, text=True, timeout=30, env=env(world))
    assert out.returncode == 0, out.stderr

    def tunnel_ssh():
        return subprocess.run([PY, "-m", "tunnel.cli", "ssh", "--identity", str(carol), "-o", "BatchMode=yes",
                               "-o", "ControlMaster=no", "root@acme-on", "echo carol"],
                              capture_output=True, text=True, timeout=60, env=env(world))

    try:
        out = tunnel_ssh()
        assert out.returncode == 0 and out.stdout == "carol\n", out.stderr
        pid = status(world, carol)["pid"]
        wait_until(lambda: not pid_alive(pid), 40, 0.2, "the helper of the expired certificate to retire")
        out = tunnel_ssh()
        assert out.returncode == 1, out.stderr
        assert "expired" in out.stderr and "log in again" in out.stderr, out.stderr
        world.user("carol", ["acme-tech"], ttl="1h")  # logged in again
        out = tunnel_ssh()
        assert out.returncode == 0 and out.stdout == "carol\n", out.stderr
    finally:
        subprocess.run([PY, "-m", "tunnel.cli", "helper", "stop", "--identity", str(carol)],
                       env=env(world), capture_output=True, timeout=30)


def test_no_usable_runtime_directory_takes_the_direct_path(world, tmp_path):
    """XDG_RUNTIME_DIR that cannot hold the socket (here: a file): no helper, the direct path."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    out = subprocess.run(["ssh", "-F", str(world.config), "-o", "BatchMode=yes", "-o", "ControlMaster=no",
                          "root@acme-on", "echo direct"], capture_output=True, text=True, timeout=60,
                         env={**env(world), "XDG_RUNTIME_DIR": str(blocker)})
    assert out.returncode == 0 and out.stdout == "direct\n", out.stderr


def test_helper_stop_cuts_open_sessions_as_cut(world):
    """`tunnel helper stop` with a session open: the client gets CUT with the reason, ssh ends."""
    out = ssh(world, "true")
    assert out.returncode == 0, out.stderr
    proc = subprocess.Popen(["ssh", "-F", str(world.config), "-o", "BatchMode=yes", "-o", "ControlMaster=no",
                             "-o", "ControlPath=none", "root@acme-on", "echo started; sleep 60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(world))
    try:
        assert proc.stdout.readline() == "started\n"
        stop_helper(world)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 255, err
    assert "tunnel: error: session to acme-on/22 cut after" in err and "the helper stopped" in err, err
