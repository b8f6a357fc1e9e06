"""Issue 13 item 3: an enrollment bundle altered on the air-gapped path is refused, field by field.

Each attack takes a real bundle from the CA step, changes it the way an attacker on the path (or
a broken CA host) would, and installs it through the real ``enroll device --install`` command: the
command must exit 1 with one line naming what was wrong, and the device directory must be byte for
byte unchanged (the device has no audit log of its own: the refusal on stderr is its record).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import json
import os

import pytest

from enroll import certs, device, online, tokens
from enroll.cli import main
from enroll.enrollment import enroll
from enroll.request import BUNDLE_FIELDS, MAX_BUNDLE_BYTES, field_digest, sign_bundle
from enroll.state import FleetState

BIG = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    return FleetState.create(tmp_path_factory.mktemp("ca") / "state", fleet="acme-fleet",
                             proxy_name="proxy.test", proxy_ips=["198.18.0.1"])


@pytest.fixture(scope="module")
def attacker(tmp_path_factory):
    """Another fleet: its CA, SSH CAs and keys are what an attacker holds."""
    return FleetState.create(tmp_path_factory.mktemp("evil") / "state", fleet="acme-fleet",
                             proxy_name="proxy.test", proxy_ips=[])


def _sign(fleet, directory, name, labels=None):
    request = device.prepare(directory, name)
    with fleet.registry() as reg:
        token, _ = tokens.create(reg, fleet.fleet, labels=labels or {"customer": "acme"})
        return enroll(fleet, reg, request, token)


@pytest.fixture
def case(fleet, tmp_path):
    """A prepared device directory and the genuine bundle that answers its request."""
    directory = tmp_path / "dev"
    bundle = _sign(fleet, directory, f"gen-{os.urandom(3).hex()}")
    return directory, bundle


def snapshot(directory):
    return {p.name: (p.read_bytes(), p.stat().st_mode) for p in sorted(directory.iterdir())}


def install_cli(directory, bundle_path, pin, capsys):
    status = main(["device", "--dir", str(directory), "--install", str(bundle_path), "--ca-pin", pin])
    return status, capsys.readouterr().err


def refused(directory, bundle_or_text, pin, capsys, fragment, tmp_path):
    """Install through the CLI; assert exit 1, one clear line naming the problem, nothing written."""
    before = snapshot(directory)
    path = tmp_path / "bundle.json"
    if isinstance(bundle_or_text, (bytes, str)):
        path.write_bytes(bundle_or_text if isinstance(bundle_or_text, bytes) else bundle_or_text.encode())
    else:
        path.write_text(json.dumps(bundle_or_text, indent=2))
    status, err = install_cli(directory, path, pin, capsys)
    assert status == 1, err
    assert err.startswith("enroll: error:") and err.count("\n") == 1, err
    assert fragment in err, err
    assert len(err) < 600  # one line, never an echo of a huge field
    assert snapshot(directory) == before
    assert not (directory / "device.crt").exists() and not (directory / "user_ca.pub").exists()
    return err


def resign(bundle, ca_key, **changes):
    """What a broken (or compromised-but-pinned) CA would sign: the semantic checks must hold too."""
    body = {k: v for k, v in bundle.items() if k != "signature"}
    body.update(changes)
    return sign_bundle(body, ca_key)


def pin(fleet):
    return certs.ca_pin(fleet.ca_cert)


# --- the genuine bundle still installs ---------------------------------------------------------


def test_genuine_bundle_installs_through_the_cli(fleet, case, tmp_path, capsys):
    directory, bundle = case
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    status, err = install_cli(directory, path, pin(fleet), capsys)
    assert status == 0, err
    assert (directory / "user_ca.pub").read_text().strip() == fleet.ssh_ca_public("user")
    assert set(bundle["signature"]["digests"]) == set(BUNDLE_FIELDS)


# --- altered in transit: the CA's signature catches every field ---------------------------------


# "version" and "ca" have their own tests (an old version; the pin)
@pytest.mark.parametrize("field", sorted(set(BUNDLE_FIELDS) - {"version", "ca"}))
def test_every_field_altered_in_transit_is_refused_by_name(fleet, attacker, case, tmp_path, capsys, field):
    directory, bundle = case
    evil = copy.deepcopy(bundle)
    if field == "cert":  # another device's genuine certificate
        evil[field] = _sign(fleet, tmp_path / "other", f"gen-{os.urandom(3).hex()}")["cert"]
    else:
        evil[field] = {
            "fleet": "acme-fleet2",
            "device_id": "robot-evil",
            "labels": {**bundle["labels"], "customer": "globex"},
            "ssh_host_cert": attacker.ssh_ca_public("host"),
            "ssh_user_ca": attacker.ssh_ca_public("user"),
            "ssh_host_ca": attacker.ssh_ca_public("host"),
            "proxy": {"address": "evil.example:443", "server_name": "proxy.test"},
        }[field]
    refused(directory, evil, pin(fleet), capsys, f"bundle field {field!r} differs from what the fleet CA signed",
            tmp_path)


def test_user_ca_swapped_with_recomputed_digests_fails_the_signature(fleet, attacker, case, tmp_path, capsys):
    directory, bundle = case
    evil = copy.deepcopy(bundle)
    evil["ssh_user_ca"] = attacker.ssh_ca_public("user")
    evil["signature"]["digests"]["ssh_user_ca"] = field_digest(evil["ssh_user_ca"])
    refused(directory, evil, pin(fleet), capsys, "signature does not verify against the pinned fleet CA", tmp_path)


def test_bundle_re_signed_by_another_ca_fails_the_pin(fleet, attacker, case, tmp_path, capsys):
    directory, bundle = case
    evil = resign(bundle, attacker.ca_key, ssh_user_ca=attacker.ssh_ca_public("user"),
                  ca=certs.cert_pem(attacker.ca_cert).decode())
    refused(directory, evil, pin(fleet), capsys, "CA pin mismatch", tmp_path)
    # the attacker's CA in the bundle, the genuine signature kept: still the pin
    evil = copy.deepcopy(bundle)
    evil["ca"] = certs.cert_pem(attacker.ca_cert).decode()
    refused(directory, evil, pin(fleet), capsys, "CA pin mismatch", tmp_path)


def test_signature_stripped_or_forged_is_refused(fleet, case, tmp_path, capsys):
    directory, bundle = case
    evil = {k: v for k, v in bundle.items() if k != "signature"}
    refused(directory, evil, pin(fleet), capsys, "the bundle is not signed", tmp_path)
    evil = copy.deepcopy(bundle)
    evil["signature"]["value"] = base64.b64encode(b"\x00" * 72).decode()
    refused(directory, evil, pin(fleet), capsys, "signature does not verify", tmp_path)
    evil["signature"]["value"] = "not base64!"
    refused(directory, evil, pin(fleet), capsys, "not base64", tmp_path)
    evil = copy.deepcopy(bundle)
    del evil["signature"]["digests"]["proxy"]  # a signature that does not cover every field
    refused(directory, evil, pin(fleet), capsys, "signature does not verify", tmp_path)


def test_old_unsigned_format_and_extra_fields_are_refused(fleet, case, tmp_path, capsys):
    directory, bundle = case
    old = {k: v for k, v in bundle.items() if k != "signature"}
    old["version"] = 1
    refused(directory, old, pin(fleet), capsys, "unsigned bundle (version 1)", tmp_path)
    evil = {**bundle, "authorized_keys": "ssh-ed25519 AAAA attacker"}
    refused(directory, evil, pin(fleet), capsys, "'authorized_keys' is not part of the format", tmp_path)


# --- sizes: refused before parsing, never written -------------------------------------------------


def test_a_50_mb_field_is_refused_without_writing(fleet, case, tmp_path, capsys):
    directory, bundle = case
    evil = copy.deepcopy(bundle)
    evil["ssh_user_ca"] = "ssh-ed25519 " + "A" * BIG
    before = snapshot(directory)
    with pytest.raises(device.InstallError, match=r"bundle field 'ssh_user_ca' is \d+ bytes, more than the 1024"):
        device.install(directory, evil, pin(fleet))  # the online path hands install() a parsed dict
    assert snapshot(directory) == before
    # as a file the whole bundle is over the cap: refused before json.loads
    refused(directory, json.dumps(evil), pin(fleet), capsys, f"larger than {MAX_BUNDLE_BYTES} bytes", tmp_path)


def test_a_50_mb_file_is_refused_before_parsing(fleet, case, tmp_path, capsys):
    directory, bundle = case
    text = json.dumps(bundle) + " " * BIG  # valid JSON, genuine signature, absurd size
    refused(directory, text, pin(fleet), capsys, f"larger than {MAX_BUNDLE_BYTES} bytes", tmp_path)
    refused(directory, b"\xff" * 100, pin(fleet), capsys, "not JSON", tmp_path)


def test_too_many_labels_are_refused_by_size(fleet, case, tmp_path, capsys):
    directory, bundle = case
    evil = copy.deepcopy(bundle)
    evil["labels"] = {f"k{i}": "v" * 200 for i in range(200)}
    with pytest.raises(device.InstallError, match="bundle field 'labels' is"):
        device.install(directory, evil, pin(fleet))


# --- signed by the real CA but wrong: the SSH host certificate is checked on its own ---------------


def test_host_cert_from_another_ssh_ca_is_refused(fleet, attacker, case, tmp_path, capsys):
    directory, bundle = case
    host_key = certs.load_ssh_public(json.loads((directory / "request.json").read_text())["ssh_host_key"])
    forged = certs.ssh_certificate(attacker.ssh_host_ca_key, host_key, host=True, key_id="x",
                                   principals=[bundle["device_id"]], lifetime=dt.timedelta(days=1))
    evil = resign(bundle, fleet.ca_key, ssh_host_cert=forged)
    refused(directory, evil, pin(fleet), capsys, "signed by another CA than the fleet's SSH host CA", tmp_path)


def test_host_cert_for_another_device_or_key_is_refused(fleet, case, tmp_path, capsys):
    directory, bundle = case
    other = _sign(fleet, tmp_path / "other", f"gen-{os.urandom(3).hex()}")
    evil = resign(bundle, fleet.ca_key, ssh_host_cert=other["ssh_host_cert"])
    refused(directory, evil, pin(fleet), capsys, f"not for {bundle['device_id']}", tmp_path)
    # right principal, but it certifies another key than this device's sshd key
    stranger = certs.new_ssh_ca_key().public_key()
    cert = certs.ssh_certificate(fleet.ssh_host_ca_key, stranger, host=True, key_id="x",
                                 principals=[bundle["device_id"]], lifetime=dt.timedelta(days=1))
    evil = resign(bundle, fleet.ca_key, ssh_host_cert=cert)
    refused(directory, evil, pin(fleet), capsys, "certifies another key", tmp_path)
    # a user certificate where the host certificate belongs
    host_key = certs.load_ssh_public(json.loads((directory / "request.json").read_text())["ssh_host_key"])
    cert = certs.ssh_certificate(fleet.ssh_host_ca_key, host_key, host=False, key_id="x",
                                 principals=[bundle["device_id"]], lifetime=dt.timedelta(days=1))
    evil = resign(bundle, fleet.ca_key, ssh_host_cert=cert)
    refused(directory, evil, pin(fleet), capsys, "is a user certificate", tmp_path)


def test_signed_fields_that_disagree_with_the_certificate_are_refused(fleet, case, tmp_path, capsys):
    directory, bundle = case
    evil = resign(bundle, fleet.ca_key, labels={**bundle["labels"], "customer": "globex"})
    refused(directory, evil, pin(fleet), capsys, "disagree with its certificate", tmp_path)
    evil = resign(bundle, fleet.ca_key, proxy={"address": "no port here", "server_name": "proxy.test"})
    refused(directory, evil, pin(fleet), capsys, "address must be HOST:PORT", tmp_path)
    evil = resign(bundle, fleet.ca_key, ssh_user_ca="ssh-ed25519 AAAA\nssh-ed25519 BBBB")
    refused(directory, evil, pin(fleet), capsys, "must be a single line", tmp_path)


# --- the online path goes through the same check ----------------------------------------------------


def test_online_enrollment_refuses_an_altered_bundle(fleet, attacker, tmp_path):
    """The proxy is pinned, but the bundle it relays is checked like an offline one all the same."""
    directory = tmp_path / "online"
    genuine = _sign(fleet, tmp_path / "genuine", "online-x")

    async def relay(proxy, kind, args, **kw):
        request = json.loads(args["request"])
        with fleet.registry() as reg:
            token, _ = tokens.create(reg, fleet.fleet, labels={"customer": "acme"})
            bundle = enroll(fleet, reg, request, token)
        bundle["ssh_user_ca"] = attacker.ssh_ca_public("user")
        return bundle

    with pytest.raises(device.InstallError, match="'ssh_user_ca' differs"):
        asyncio.run(online.enroll_online(directory, "127.0.0.1:9", "ft1.x", pin(fleet), exchange=relay))
    assert not (directory / "device.crt").exists() and not (directory / "user_ca.pub").exists()
    assert genuine["version"] == 2
