"""enroll: fleet init, tokens, offline enrollment, admin actions, and every kind of bad input."""

import datetime as dt
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from fleet_harness import table_rows

from enroll import audit, certs, device, tokens
from enroll.cli import main
from enroll.enrollment import enroll
from enroll.repositories import Tokens
from enroll.request import EnrollError, make_request, sign_bundle
from enroll.state import FleetState


@pytest.fixture
def fleet(tmp_path):
    return FleetState.create(tmp_path / "state", fleet="acme-fleet", proxy_name="proxy.test",
                             proxy_ips=["198.18.0.1"])


@pytest.fixture
def cli(fleet, capsys):
    """Run the enroll CLI in-process against the fixture fleet; return (status, stdout, stderr)."""

    def run(*args):
        status = main(["--state", str(fleet.root), *map(str, args)])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def snapshot(fleet):
    return table_rows(fleet, "devices", "tokens", "certs")


def new_token(fleet, **kw):
    kw.setdefault("labels", {"customer": "acme", "site": "dal"})
    with fleet.registry() as reg:
        return tokens.create(reg, fleet.fleet, **kw)[0]


def request_for(tmp_path, name=None, sub="dev"):
    return device.prepare(tmp_path / sub, name)


def sign(fleet, request, token):
    with fleet.registry() as reg:
        return enroll(fleet, reg, request, token)


# --- the happy path ------------------------------------------------------------------------


def test_init_layout_modes_and_pin(fleet, cli):
    root = fleet.root
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    for key in ("ca.key", "proxy.key", "ssh_user_ca", "ssh_host_ca", "registry.db"):
        assert stat.S_IMODE(os.stat(root / key).st_mode) == 0o600, key
    status, out, err = cli("init", "--fleet", "other", "--proxy-name", "p", "--format", "json")
    assert status == 1 and "refusing to overwrite" in err
    assert certs.ca_pin(fleet.ca_cert).startswith("sha256:")
    proxy = x509.load_pem_x509_certificate((root / "proxy.crt").read_bytes())
    assert certs.identity_of(proxy).kind == "proxy"
    certs.verify_issued_by(proxy, fleet.ca_cert)


def test_offline_enrollment_end_to_end(fleet, cli, tmp_path):
    status, token, _ = cli("token", "create", "--label", "customer=acme", "--label", "site=dal",
                           "--name-prefix", "robot-")
    assert status == 0
    dev_dir = tmp_path / "device"
    assert cli("device", "--dir", dev_dir, "--csr-only")[0] == 0
    bundle_path = tmp_path / "bundle.json"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    status, _, err = cli("sign", "--csr", dev_dir / "request.json", "--token-file", token_file,
                         "--out", bundle_path)
    assert status == 0, err
    pin = certs.ca_pin(fleet.ca_cert)
    assert cli("device", "--dir", dev_dir, "--install", bundle_path, "--ca-pin", pin)[0] == 0

    cert = x509.load_pem_x509_certificate((dev_dir / "device.crt").read_bytes())
    ident = certs.identity_of(cert, "acme-fleet")
    assert ident.kind == "device" and ident.name.startswith("robot-")
    assert ident.labels == {"customer": "acme", "lifecycle": "active", "site": "dal"}
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30, minutes=5)
    assert stat.S_IMODE(os.stat(dev_dir / "device.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dev_dir).st_mode) == 0o700
    host_cert = (dev_dir / "ssh_host_ed25519_key-cert.pub").read_text()
    assert host_cert.startswith("ssh-ed25519-cert-v01@openssh.com ")
    assert (dev_dir / "user_ca.pub").read_text() == fleet.path("ssh_user_ca.pub").read_text()
    config = (dev_dir / "agent.yaml").read_text()
    assert ident.name in config and "proxy.test:443" in config

    status, out, _ = cli("devices", "customer=acme", "--format", "json")
    assert [d["id"] for d in json.loads(out)] == [ident.name]
    with fleet.registry() as reg:
        types = [e.type for e in audit.events(reg)]
        assert types == ["role.apply", "token.create", "device.enroll", "cert.issue"]
        assert audit.verify(reg) is None


def test_host_certificate_is_accepted_by_ssh_keygen(fleet, tmp_path):
    import shutil
    import subprocess

    if not shutil.which("ssh-keygen"):
        from fleet_harness import missing_peer

        missing_peer("ssh-keygen is not installed (scripts/test installs openssh-client)")
    bundle = sign(fleet, request_for(tmp_path, "gen-1"), new_token(fleet))
    path = tmp_path / "cert.pub"
    path.write_text(bundle["ssh_host_cert"])
    out = subprocess.run(["ssh-keygen", "-L", "-f", path], capture_output=True, text=True, check=True)
    assert "host certificate" in out.stdout and "gen-1" in out.stdout


def test_token_labels_win_and_names_are_unique(fleet, tmp_path):
    bundle = sign(fleet, request_for(tmp_path, "charger-1"), new_token(fleet, labels={"customer": "acme"}))
    assert bundle["device_id"] == "charger-1"
    before = snapshot(fleet)
    with pytest.raises(EnrollError, match="already enrolled"):
        sign(fleet, request_for(tmp_path, "charger-1", "dev2"), new_token(fleet))
    after = snapshot(fleet)
    assert after["devices"] == before["devices"] and after["certs"] == before["certs"]
    # the refused enrollment did not burn the second token's use
    assert [t["uses_left"] for t in after["tokens"]] == [0, 1]


def test_admin_relabel_decommission_lock(fleet, cli, tmp_path):
    name = sign(fleet, request_for(tmp_path, "gen-7"), new_token(fleet))["device_id"]
    assert cli("relabel", name, "customer=globex", "--remove", "site")[0] == 0
    with fleet.registry() as reg:
        assert reg.device(name).labels == {"customer": "globex", "lifecycle": "active"}
    status, _, err = cli("relabel", name, "--remove", "lifecycle")
    assert status == 1 and "cannot be removed" in err
    status, _, err = cli("relabel", name, "lifecycle=retired")
    assert status == 1 and "bad lifecycle" in err
    assert cli("lock", name, "--ttl", "1h", "--message", "incident 42")[0] == 0
    with fleet.registry() as reg:
        assert reg.device(name).locked(dt.datetime.now(dt.UTC))
    assert cli("unlock", name)[0] == 0
    assert cli("decommission", name)[0] == 0
    with fleet.registry() as reg:
        dev = reg.device(name)
        assert dev.lifecycle == "decommissioned" and reg.cert_revoked(dev.cert_serial)
        types = [e.type for e in audit.events(reg)][-4:]
        assert types == ["device.relabel", "device.lock", "device.unlock", "device.decommission"]
    status, _, err = cli("lock", "nope")
    assert status == 1 and "unknown device 'nope'" in err


def test_token_ls_and_revoke_never_show_secrets(fleet, cli):
    status, token, _ = cli("token", "create", "--label", "customer=acme", "--uses", "3", "--ttl", "2h")
    token_id = token.strip().split(".")[2]
    status, out, _ = cli("token", "ls", "--format", "json")
    rows = json.loads(out)
    assert rows[0]["id"] == token_id and rows[0]["status"] == "valid" and rows[0]["uses_left"] == 3
    assert token.strip().split(".")[3] not in out
    with fleet.registry() as reg:
        stored = Tokens(reg).all()[0]
        assert stored.hash != token.strip().split(".")[3] and len(stored.hash) == 64
    assert cli("token", "revoke", token_id)[0] == 0
    assert json.loads(cli("token", "ls", "--format", "json")[1])[0]["status"] == "revoked"


# --- bad input: a clear error and nothing changed --------------------------------------------


def _bad_csr(kind):
    if kind == "rsa":
        key = rsa.generate_private_key(65537, 2048)
        return x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
            key, hashes.SHA256()).public_bytes(Encoding.PEM)
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        return x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
            key, None).public_bytes(Encoding.PEM)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder()
    if kind == "asks-name":
        builder = builder.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")]))
    else:
        builder = builder.subject_name(x509.Name([]))
    if kind == "asks-labels":
        builder = builder.add_extension(
            x509.UnrecognizedExtension(certs.OID_LABELS, b'\x0c\x02{}'), critical=False)
    pem = builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM)
    if kind == "bad-signature":
        der = x509.load_pem_x509_csr(pem).public_bytes(Encoding.DER)
        der = der[:-4] + bytes(b ^ 0xFF for b in der[-4:])
        pem = x509.load_der_x509_csr(der).public_bytes(Encoding.PEM)
    if kind == "garbage":
        pem = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    return pem


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("reused", "already used"),
        ("expired", "expired"),
        ("revoked", "revoked"),
        ("malformed", "malformed join token"),
        ("truncated", "malformed join token"),
        ("other-fleet", "belongs to fleet 'globex-fleet'"),
        ("wrong-secret", "unknown join token"),
        ("csr-bad-signature", "signature is invalid"),
        ("csr-rsa", "unsupported key"),
        ("csr-ed25519", "unsupported key"),
        ("csr-asks-name", "decides those"),
        ("csr-asks-labels", "decides those"),
        ("csr-garbage", "malformed CSR"),
        ("bad-name", "bad device name"),
        ("bad-host-key", "malformed SSH public key"),
    ],
)
def test_bad_enrollment_is_refused_and_changes_nothing(fleet, tmp_path, case, fragment):
    token = new_token(fleet)
    request = request_for(tmp_path)
    if case == "reused":
        sign(fleet, request, token)
        request = request_for(tmp_path, sub="dev2")
    elif case == "expired":
        token = new_token(fleet, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    elif case == "revoked":
        with fleet.registry() as reg:
            tokens.revoke(reg, token.split(".")[2])
    elif case == "malformed":
        token = "hello"
    elif case == "truncated":
        token = token[:-5]
    elif case == "other-fleet":
        token = token.replace(".acme-fleet.", ".globex-fleet.")
    elif case == "wrong-secret":
        token = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    elif case.startswith("csr-"):
        request = make_request(_bad_csr(case[4:]), request["ssh_host_key"])
    elif case == "bad-name":
        request = {**request, "name": "Robot_1"}
    elif case == "bad-host-key":
        request = {**request, "ssh_host_key": "ssh-ed25519 not-base64"}
    before = snapshot(fleet)
    with fleet.registry() as reg:
        seq_before = len(audit.events(reg))
    with pytest.raises(EnrollError, match=fragment):
        sign(fleet, request, token)
    assert snapshot(fleet) == before
    with fleet.registry() as reg:
        new = audit.events(reg)[seq_before:]
        assert [e.type for e in new] == ["device.enroll.denied"]
        assert fragment.split("'")[0] in new[0].reason
        assert audit.verify(reg) is None


def test_ca_pin_mismatch_installs_nothing(fleet, tmp_path):
    other = FleetState.create(tmp_path / "other", fleet="acme-fleet", proxy_name="proxy.test", proxy_ips=[])
    request = request_for(tmp_path, "gen-1")
    bundle = sign(fleet, request, new_token(fleet))
    with pytest.raises(device.InstallError, match="CA pin mismatch"):
        device.install(tmp_path / "dev", bundle, certs.ca_pin(other.ca_cert))
    assert not (tmp_path / "dev" / "device.crt").exists()
    with pytest.raises(device.InstallError, match="bad --ca-pin"):
        device.install(tmp_path / "dev", bundle, "sha256:1234")
    # a bundle for another device's key
    bundle2 = sign(fleet, request_for(tmp_path, "gen-2", "dev2"), new_token(fleet))
    with pytest.raises(device.InstallError, match="another device's key"):
        device.install(tmp_path / "dev", bundle2, certs.ca_pin(fleet.ca_cert))


def test_unwritable_state_dir_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    status = main(["--state", str(blocker / "state"), "init", "--fleet", "f", "--proxy-name", "p"])
    assert status == 1
    assert "cannot write the state directory" in capsys.readouterr().err


def test_missing_state_says_run_init(tmp_path, capsys):
    assert main(["--state", str(tmp_path / "none"), "devices"]) == 1
    assert "run 'enroll init' first" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["token", "create", "--label", "Customer=acme"], "bad label key"),
        (["token", "create", "--ttl", "forever"], "bad duration"),
        (["token", "create", "--uses", "0"], "at least 1"),
        (["devices", "site in (a"], "missing ')'"),
        (["token", "revoke", "nope"], "no token with id"),
        (["sign", "--csr", "/nonexistent.json", "--token-file", "/nonexistent.token"], "no such file"),
    ],
)
def test_cli_bad_input(cli, fleet, args, fragment):
    before = snapshot(fleet)
    status, _, err = cli(*args)
    assert status == 1 and fragment in err and err.startswith("enroll: error:")
    assert snapshot(fleet) == before


@pytest.mark.parametrize("entry", ["SSH=127.0.0.1:22", "ssh=127.0.0.1:２２", "ssh", "４３=127.0.0.1:5432",
                                   "ssh=127.0.0.1:0"])
def test_device_refuses_a_service_the_agent_would_refuse(cli, tmp_path, entry):
    """A service name or port the agent cannot load is refused before anything is written (no
    token spent, no agent.yaml that makes the agent exit at start)."""
    dev_dir = tmp_path / "dev"
    status, _, err = cli("device", "--dir", dev_dir, "--csr-only", "--service", entry)
    assert status == 1 and "--service" in err
    assert not dev_dir.exists()


@pytest.mark.parametrize(("field", "value"), [
    ("server_name", "robot-1\n"),
    ("server_name", "proxy.test\nca_pin: forged"),
    ("address", "robot-1\n:443"),
])
def test_a_signed_bundle_with_a_newline_in_its_proxy_host_installs_nothing(fleet, tmp_path, field, value):
    """Even signed by the pinned CA, a proxy host with a newline (which would land in the
    agent's YAML config) is refused before anything is written."""
    directory = tmp_path / "dev"
    with fleet.registry() as reg:
        token, _ = tokens.create(reg, fleet.fleet, labels={"customer": "acme"})
        bundle = enroll(fleet, reg, device.prepare(directory, "robot-1"), token)
    body = {k: v for k, v in bundle.items() if k != "signature"}
    evil = sign_bundle({**body, "proxy": {**body["proxy"], field: value}}, fleet.ca_key)
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(device.InstallError, match="bundle field 'proxy'"):
        device.install(directory, json.loads(json.dumps(evil)), certs.ca_pin(fleet.ca_cert))
    assert sorted(p.name for p in directory.iterdir()) == before
