"""Refusals reach the engineer (issue 15): through ssh, scp, ``tunnel ssh`` and Ansible.

OpenSSH discards a ProxyCommand's stderr under connection sharing (``ControlMaster auto`` +
``ControlPersist`` in the generated ssh_config), so a refused ``tunnel proxy-command`` answers
ssh as an SSH server that disconnects at once, the reason in the SSH_MSG_DISCONNECT; ssh prints
it itself. ``tunnel ssh`` turns that back into its one line and exit status 1 (3: unreachable).

The encoder and the stderr filter are tested without sockets; then each refusal path (device
offline, device locked, a login no role allows, an unknown device; and a proxy that is down)
is performed with the real OpenSSH client, scp, ansible and ansible-playbook against a real
proxy and agents on loopback. A refusal never reaches a device's sshd, so none is needed here:
sessions that do open are in test_tunnel_lab.py and test_ansible_lab.py.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest
from fleet_harness import ACME_TECH_ROLE, PY, Fleet
from test_ansible import REPO, ansible_cmd, ansible_env

from enroll import admin, users
from tunnel import sshwire

# --- the encoder (sans-I/O) -------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["", "x", "device robot-1 is locked: incident 42", "é" * 37, "y" * 999])
def test_disconnect_packet_framing_and_round_trip(reason):
    data = sshwire.disconnect(sshwire.PREFIX + reason, sshwire.BY_APPLICATION)
    length, pad = struct.unpack(">IB", data[:5])
    assert len(data) == 4 + length and len(data) % 8 == 0  # RFC 4253 §6: a multiple of 8
    assert 4 <= pad < 4 + 8
    payload, rest = sshwire.decode_packet(data)
    assert rest == b""
    code, description, language = sshwire.decode_disconnect(payload)
    assert code == 11 and language == ""
    expected = sshwire.one_line(sshwire.PREFIX + reason)
    assert description == expected.encode()[: sshwire.MAX_DESCRIPTION].decode(errors="ignore")
    assert len(description.encode()) <= sshwire.MAX_DESCRIPTION  # OpenSSH prints at most 400


def test_refusal_is_identification_then_one_packet():
    data = sshwire.refusal("device d1 is offline", sshwire.SERVICE_NOT_AVAILABLE)
    assert data.startswith(b"SSH-2.0-fleet-tunnel\r\n")
    payload, rest = sshwire.decode_packet(data[len(sshwire.IDENTIFICATION):])
    assert rest == b""
    assert sshwire.decode_disconnect(payload) == (7, "fleet-tunnel: device d1 is offline", "")


def test_description_is_one_printable_line():
    text = sshwire.one_line("locked:\n\x1b[31mred\x1b[0m\r\tnext\x00")
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\x00" not in text
    assert text.startswith("locked: ?[31mred")


def test_packet_padding_is_given_or_random():
    fixed = sshwire.packet(b"\x01abc", padding=b"\0" * 16)
    assert fixed == struct.pack(">IB", 12, 7) + b"\x01abc" + b"\0" * 7
    assert sshwire.decode_packet(sshwire.packet(b"\x01abc"))[0] == b"\x01abc"


@pytest.mark.parametrize("bad", [b"", b"\0\0\0\x0c\x07", struct.pack(">IB", 13, 7) + b"x" * 13,
                                 struct.pack(">IB", 12, 2) + b"x" * 12])
def test_malformed_packets_are_refused(bad):
    with pytest.raises(sshwire.DecodeError):
        sshwire.decode_packet(bad)


@pytest.mark.parametrize("payload", [b"", b"\x02" + b"\0" * 12, b"\x01\0\0\0\x0b\0\0\0\x09abc"])
def test_malformed_disconnects_are_refused(payload):
    with pytest.raises(sshwire.DecodeError):
        sshwire.decode_disconnect(payload)


# --- the stderr filter of `tunnel ssh` (sans-I/O) ----------------------------------------------


RECEIVED = b"Received disconnect from UNKNOWN port 65535:11: fleet-tunnel: device d1 is locked: incident 42\r\n"
DISCONNECTED = b"Disconnected from UNKNOWN port 65535\r\n"


def run_filter(*chunks: bytes) -> tuple[bytes, sshwire.StderrFilter]:
    filt = sshwire.StderrFilter()
    out = b"".join(filt.feed(c) for c in chunks) + filt.finish()
    return out, filt


def test_filter_turns_our_disconnect_into_one_line_and_exit_1():
    out, filt = run_filter(RECEIVED, DISCONNECTED)
    assert out == b"tunnel: error: device d1 is locked: incident 42\n"
    assert filt.exit_status == 1


def test_filter_unreachable_maps_to_exit_3_and_split_chunks_work():
    line = b"Received disconnect from UNKNOWN port 65535:7: fleet-tunnel: cannot connect to the proxy\n"
    out, filt = run_filter(*(line[i:i + 5] for i in range(0, len(line), 5)), DISCONNECTED[:9], DISCONNECTED[9:])
    assert out == b"tunnel: error: cannot connect to the proxy\n"
    assert filt.exit_status == 3


def test_filter_prints_a_reason_once_when_ssh_cert_said_it_already():
    out, filt = run_filter(b"tunnel: error: device d1 is locked: incident 42\n", RECEIVED, DISCONNECTED)
    assert out == b"tunnel: error: device d1 is locked: incident 42\n"
    assert filt.exit_status == 1


def test_filter_passes_everything_else_unchanged():
    # a device's own sshd disconnecting (no fleet-tunnel prefix) and ordinary ssh lines
    other = (b"Warning: Permanently added 'x' (ED25519) to the list of known hosts.\n"
             b"Received disconnect from UNKNOWN port 65535:2: Too many authentication failures\n"
             b"Disconnected from UNKNOWN port 65535\n"
             b"root@d1: Permission denied (publickey).\n")
    out, filt = run_filter(other)
    assert out == other
    assert filt.exit_status is None


def test_filter_does_not_hold_back_a_prompt():
    filt = sshwire.StderrFilter()
    assert filt.feed(b"Enter passphrase for key 'k': ") == b"Enter passphrase for key 'k': "
    # a partial line that may be ours waits for its end, and is released unchanged at the end
    assert filt.feed(b"Received disc") == b""
    assert filt.finish() == b"Received disc"


# --- real OpenSSH, scp and Ansible against a real proxy on loopback ---------------------------

ROLES = ACME_TECH_ROLE

#: (login@device, the reason the proxy gives), one per refusal path
CASES = {
    "offline": ("root@acme-off", "device acme-off is offline"),
    "locked": ("root@acme-locked", "is locked until"),
    "forbidden-login": ("admin@acme-on", "no role allows ssh as admin"),
    "unknown": ("root@nosuch", "no device 'nosuch' that you may reach"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("refusals"))
    with f.state.registry() as reg:
        users.apply_roles(reg, ROLES)
    f.start_proxy()
    f.enroll_device("acme-off", {"customer": "acme"}, {"ssh": "127.0.0.1:22"})
    for name in ("acme-locked", "acme-on"):
        f.start_agent(f.enroll_device(name, {"customer": "acme"}, {"ssh": "127.0.0.1:22"}, keepalive="5s"))
    f.ops = f.user("ops", ["admin"])
    f.alice = f.user("alice", ["acme-tech"])
    for name in ("acme-locked", "acme-on"):
        f.wait_online(f.ops, name, timeout=20)
    with f.state.registry() as reg:
        admin.lock(reg, "acme-locked", None, "incident 42")
    out = f.tunnel("config", "--hosts", "*", "--write", identity=f.alice)
    assert out.returncode == 0, out.stderr
    f.config = f.alice / "ssh_config.all"
    text = f.config.read_text()
    assert "ControlMaster auto" in text and "ControlPersist" in text  # connection sharing stays on
    yield f
    stop_helper(f, f.alice)
    f.close()


def stop_helper(world, identity: Path) -> None:
    """The generated config starts a per-user helper (issue 15): stop it with the fleet."""
    subprocess.run([PY, "-m", "tunnel.cli", "helper", "stop", "--identity", str(identity)],
                   capture_output=True, timeout=30, env=env(world))


def env(world) -> dict:
    return {**os.environ, **world.env, "PYTHONPATH": str(REPO)}


def denied(world, since: int) -> list[dict]:
    return [e for e in world.audit()[since:] if e["type"] == "access.denied"]


@pytest.mark.parametrize("case", CASES)
def test_tunnel_ssh_prints_the_reason_as_one_line_and_exits_1(world, case):
    target, reason = CASES[case]
    before = len(world.audit())
    out = subprocess.run([PY, "-m", "tunnel.cli", "ssh", "--identity", str(world.alice), "-o", "BatchMode=yes",
                          target, "true"], capture_output=True, text=True, timeout=60, env=env(world))
    assert out.returncode == 1, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunnel: error: ") and reason in lines[0], out.stderr
    assert "kex_exchange_identification" not in out.stderr
    # refused at the proxy, and audited there
    assert denied(world, before), world.audit()[before:]


@pytest.mark.parametrize("case", CASES)
def test_plain_ssh_with_connection_sharing_prints_the_reason(world, case):
    target, reason = CASES[case]
    before = len(world.audit())
    out = subprocess.run(["ssh", "-F", str(world.config), "-o", "BatchMode=yes", target, "true"],
                         capture_output=True, text=True, timeout=60, env=env(world))
    assert out.returncode == 255
    assert "65535:11: fleet-tunnel: " in out.stderr and reason in out.stderr, out.stderr
    assert "kex_exchange_identification" not in out.stderr
    assert denied(world, before)
    # no master was left behind for a refused host
    login, _, device = target.partition("@")
    assert not (world.alice / "ssh" / f"cm-{login}@{device}").exists()


@pytest.mark.parametrize("case", CASES)
def test_scp_prints_the_reason(world, case, tmp_path):
    target, reason = CASES[case]
    out = subprocess.run(["scp", "-F", str(world.config), "-o", "BatchMode=yes", f"{target}:/etc/hostname",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=60, env=env(world))
    assert out.returncode != 0
    assert "fleet-tunnel: " in out.stderr and reason in out.stderr, out.stderr
    assert not (tmp_path / "x").exists()


def ansible_inventory(world, tmp_path: Path) -> Path:
    lines = ["[fleet]"]
    for target, _ in CASES.values():
        login, _, device = target.partition("@")
        lines.append(f"{device} ansible_user={login}")
    lines += ["[fleet:vars]", f"ansible_ssh_common_args=-F {world.config}"]
    path = tmp_path / "hosts.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


#: the repo's ansible.cfg enables only host_list and auto (fleet inventories); this test's static
#: inventory is an ini file
INI = {"ANSIBLE_INVENTORY_ENABLED": "host_list,ini,auto"}


def test_ansible_ping_shows_each_reason_in_unreachable(world, tmp_path):
    out = subprocess.run(ansible_cmd("ansible", "-i", ansible_inventory(world, tmp_path), "fleet",
                                     "-m", "ansible.builtin.ping", "-o"),
                         capture_output=True, text=True, timeout=180, env={**env(world), **ansible_env(), **INI})
    assert out.returncode == 4, out.stdout + out.stderr  # 4: hosts unreachable
    for target, reason in CASES.values():
        device = target.partition("@")[2]
        line = next(x for x in out.stdout.splitlines() if x.startswith(f"{device} | UNREACHABLE"))
        # Ansible shows ssh's stderr: our disconnect, or the same line from `tunnel ssh-cert`
        assert reason in line and "kex_exchange_identification" not in line, line
        print(line)


def test_ansible_playbook_shows_each_reason(world, tmp_path):
    playbook = tmp_path / "ping.yml"
    playbook.write_text("- hosts: fleet\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n")
    out = subprocess.run(ansible_cmd("ansible-playbook", "-i", ansible_inventory(world, tmp_path), playbook),
                         capture_output=True, text=True, timeout=180, env={**env(world), **ansible_env(), **INI})
    assert out.returncode == 4, out.stdout + out.stderr
    for target, reason in CASES.values():
        device = target.partition("@")[2]
        block = out.stdout.split(f"fatal: [{device}]: UNREACHABLE!", 1)[1].split("fatal: [", 1)[0]
        assert reason in block and "kex_exchange_identification" not in block, block
        print(block)


def test_unreachable_proxy_exit_3_and_reason_through_ssh(world, tmp_path):
    """The proxy down: `tunnel ssh` exits 3 with the one line; plain ssh shows it too."""
    import shutil

    from fleet_harness import free_udp_port

    ident = tmp_path / "alice-elsewhere"
    shutil.copytree(world.alice, ident, ignore=shutil.ignore_patterns("cm-*", "helper-*"))
    (ident / "client.yaml").write_text(f"proxy: 127.0.0.1:{free_udp_port()}\nserver_name: proxy.test\n")
    out = subprocess.run([PY, "-m", "tunnel.cli", "ssh", "--identity", str(ident), "-o", "BatchMode=yes",
                          "root@acme-on", "true"], capture_output=True, text=True, timeout=90, env=env(world))
    stop_helper(world, ident)
    assert out.returncode == 3, out.stderr
    assert "cannot connect to the proxy" in out.stderr
    assert all(line.startswith("tunnel: error: cannot connect") for line in out.stderr.splitlines()), out.stderr


def test_proxy_command_speaks_ssh_only_when_refused(world):
    """stdout carries the identification and one disconnect; stderr the line; exit 1."""
    out = subprocess.run([PY, "-m", "tunnel.cli", "proxy-command", "acme-locked", "22", "--login", "root",
                          "--identity", str(world.alice)], input=b"", capture_output=True, timeout=60,
                         env=env(world))
    assert out.returncode == 1
    assert out.stderr.decode().startswith("tunnel: error: device acme-locked is locked")
    assert out.stdout.startswith(sshwire.IDENTIFICATION)
    payload, rest = sshwire.decode_packet(out.stdout[len(sshwire.IDENTIFICATION):])
    code, description, _ = sshwire.decode_disconnect(payload)
    assert rest == b"" and code == sshwire.BY_APPLICATION
    assert description.startswith("fleet-tunnel: device acme-locked is locked")
