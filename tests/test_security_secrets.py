"""Issue 13 item 9: join tokens, invites, passwords and one-time codes never on a command line.

The attack: any local user reads ``/proc/PID/cmdline`` of every process. Each test starts the real
``enroll device`` / ``tunnel login`` process with its secret passed the new ways, catches it while
it dials (a silent proxy holds it there), and checks its command line. The old ``--token VALUE``
style is refused with a usage error that says what to do. A real login with an invite starting
with ``-`` runs the exact command ``enroll user add`` prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fleet_harness import PY

from enroll import users
from enroll.cli import main as enroll_main
from enroll.repositories import Users
from enroll.secret_input import SecretError, env_command, read_secret

DASH_TOKEN = "-ft1.acme-fleet.0123456789.dash-first-secret"  # starts with '-' on purpose


@contextlib.contextmanager
def silent_proxy():
    """UDP and TCP on one loopback port that take packets and connections and never answer."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    tcp = socket.create_server(("127.0.0.1", port))
    try:
        yield udp, f"127.0.0.1:{port}"
    finally:
        udp.close()
        tcp.close()


def catch_while_dialing(argv, *, env=None, stdin_data: bytes | None = None) -> tuple[bytes, bytes]:
    """Run ``argv`` against a silent proxy; once it dials (its secret read), return its
    /proc/PID/cmdline and /proc/PID/environ mode-check material, then stop it."""
    with silent_proxy() as (udp, address):
        argv = [a.replace("PROXY", address) for a in argv]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, **(env or {})})
        try:
            if stdin_data is not None:
                proc.stdin.write(stdin_data)
            proc.stdin.close()
            udp.settimeout(30)
            udp.recvfrom(65536)  # the first QUIC Initial: the process is past reading its secrets
            assert proc.poll() is None, proc.stderr.read()
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            environ_mode = os.stat(f"/proc/{proc.pid}/environ").st_mode & 0o777
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    return cmdline, environ_mode


# --- enroll device: the join token ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["env", "stdin", "file"])
def test_enroll_device_token_is_not_on_its_command_line(fleet, tmp_path, how):
    argv = [PY, "-m", "tunnel.enroll_cli", "device", "--dir", str(tmp_path / "d"), "--proxy", "PROXY",
            "--server-name", "proxy.test", "--ca-pin", fleet.pin]
    env, data = {}, None
    if how == "env":
        env = {"FLEET_TOKEN": DASH_TOKEN}
    elif how == "stdin":
        argv += ["--token-file", "-"]
        data = DASH_TOKEN.encode() + b"\n"
    else:
        path = tmp_path / "token"
        path.write_text(DASH_TOKEN + "\n")
        path.chmod(0o600)
        argv += ["--token-file", str(path)]
    cmdline, environ_mode = catch_while_dialing(argv, env=env, stdin_data=data)
    assert b"tunnel.enroll_cli\0device" in cmdline  # it is the process we mean
    assert DASH_TOKEN.encode() not in cmdline and b"dash-first-secret" not in cmdline
    assert environ_mode & 0o077 == 0  # /proc/PID/environ: owner only, unlike cmdline


def test_old_token_option_is_a_usage_error_that_says_what_to_do(tmp_path, capsys):
    for argv in (["device", "--dir", str(tmp_path / "d"), "--proxy", "127.0.0.1:9", "--ca-pin", "x",
                  "--token", "ft1.x"],
                 ["sign", "--csr", str(tmp_path / "r.json"), "--token", "ft1.x"]):
        with pytest.raises(SystemExit) as exc:
            enroll_main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "/proc/PID/cmdline" in err and "$FLEET_TOKEN" in err and "--token-file" in err
    assert not (tmp_path / "d").exists()  # refused before anything was made


def test_missing_token_is_a_clear_refusal(fleet, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FLEET_TOKEN", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: no prompt
    status = enroll_main(["device", "--dir", str(tmp_path / "d"), "--proxy", "127.0.0.1:9", "--ca-pin", fleet.pin])
    assert status == 1
    assert "needs the join token: pass it in $FLEET_TOKEN" in capsys.readouterr().err


def test_read_secret_sources_and_bad_input(tmp_path):
    environ = {"FLEET_TOKEN": "  -abc  "}
    assert read_secret("join token", file=None, env="FLEET_TOKEN", environ=environ) == "-abc"
    assert "FLEET_TOKEN" not in environ  # children do not inherit it
    assert read_secret("join token", file="-", env="X", stdin=io.StringIO("-tok\nrest\n"), environ={}) == "-tok"
    assert read_secret("join token", file=None, env="X", prompt=True, stdin=io.StringIO(""), environ={}) is None
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SecretError, match="is empty"):
        read_secret("join token", file=str(empty), env="X", environ={})
    two = tmp_path / "two"
    two.write_text("a\nb\n")
    with pytest.raises(SecretError, match="spans several lines"):
        read_secret("join token", file=str(two), env="X", environ={})
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100_000)
    with pytest.raises(SecretError, match="larger than"):
        read_secret("join token", file=str(big), env="X", environ={})
    with pytest.raises(SecretError, match="no such join token file"):
        read_secret("join token", file=str(tmp_path / "none"), env="X", environ={})
    line = env_command("FLEET_INVITE", "-a'b", ["tunnel", "login", "--user", "x"])
    assert shlex.split(line) == ["FLEET_INVITE=-a'b", "tunnel", "login", "--user", "x"]


# --- tunnel login: invite, password, one-time code --------------------------------------------------


def test_tunnel_login_secrets_are_not_on_its_command_line(fleet, tmp_path):
    code_file = tmp_path / "code"
    code_file.write_text("314159\n")
    argv = [PY, "-m", "tunnel.cli", "login", "--proxy", "PROXY", "--user", "alice", "--server-name", "proxy.test",
            "--ca-pin", fleet.pin, "--password-stdin", "--totp-file", str(code_file),
            "--identity", str(tmp_path / "id")]
    cmdline, _ = catch_while_dialing(argv, env={"FLEET_INVITE": DASH_TOKEN, "FLEET_TRANSPORT": "quic"},
                                     stdin_data=b"a long password\n")
    assert b"tunnel.cli\0login" in cmdline
    for secret in (DASH_TOKEN.encode(), b"a long password", b"314159"):
        assert secret not in cmdline


def test_old_invite_and_totp_options_are_usage_errors():
    for flag, value in (("--invite", "abc"), ("--totp", "123456")):
        out = subprocess.run([PY, "-m", "tunnel.cli", "login", "--proxy", "127.0.0.1:9", "--user", "a",
                              flag, value], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, out.stderr
        assert "/proc/PID/cmdline" in out.stderr and f"{flag}-file" in out.stderr


@pytest.mark.parametrize("flags", [["--invite-file", "-"], ["--invite"], ["--totp"]])  # alone: read stdin
def test_two_secrets_from_one_piped_stdin_are_refused(tmp_path, flags):
    out = subprocess.run([PY, "-m", "tunnel.cli", "login", "--proxy", "127.0.0.1:9", "--user", "a",
                          *flags, "--password-stdin", "--identity", str(tmp_path / "id")],
                         input="x\ny\n", capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "would all read stdin" in out.stderr, out.stderr
    assert not (tmp_path / "id").exists()


def test_printed_login_command_works_for_an_invite_starting_with_dash(fleet, tmp_path, capsys, monkeypatch):
    """`enroll user add` prints the first-login command; run it exactly, with an invite that
    starts with '-' (about 1 in 64 do), through a real proxy."""
    fleet.start_proxy()
    real = users.secrets.token_urlsafe
    monkeypatch.setattr(users.secrets, "token_urlsafe", lambda n=None: "-" + real(n))
    assert enroll_main(["--state", str(fleet.state.root), "user", "add", "dash", "--role", "admin"]) == 0
    monkeypatch.undo()
    printed = capsys.readouterr().out
    line = next(ln.strip() for ln in printed.splitlines() if "tunnel login" in ln)
    invite = shlex.split(line)[0].split("=", 1)[1]
    assert invite.startswith("-") and "--invite" not in line
    with fleet.state.registry() as reg:
        assert Users(reg).get("dash").invite_hash == hashlib.sha256(invite.encode()).hexdigest()
    # `tunnel` on PATH runs this tree's code (python -m tunnel.cli)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "tunnel").write_text(f"#!/bin/sh\nexec {shlex.quote(PY)} -m tunnel.cli \"$@\"\n")
    (bindir / "tunnel").chmod(0o755)
    line = re.sub(r"--proxy \S+", f"--proxy {fleet.address}", line)
    identity = tmp_path / "dash-id"
    out = subprocess.run(["bash", "-c", f"{line} --server-name proxy.test --password-stdin --identity {identity}"],
                         input=b"a long password\n", capture_output=True, timeout=60,
                         env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    assert (identity / "user.crt").exists()
    logins = [e for e in fleet.audit() if e["type"] == "user.login"]
    assert logins and logins[-1]["actor"] == "user:dash"
