"""The device side of enrollment: make keys locally, ask, check the answer, write identity files.

Keys never leave the device: only the CSR and the sshd host *public* key are sent. Before a
bundle is installed its CA must match the pin the manufacturing line was given, its certificate
must chain to that CA, and the certificate must be for this device's key.

Files in the device directory::

    device.key                  0600  the device's TLS key (made here, never sent)
    ssh_host_ed25519_key[.pub]  0600  sshd host key, unless --ssh-host-key names an existing one
    request.json                      the enrollment request (CSR + host public key)
    device.crt  ca.crt                the device certificate and the fleet CA
    ssh_host_ed25519_key-cert.pub     host certificate (principal: the device id) for sshd
    user_ca.pub                       the fleet user CA, for sshd's TrustedUserCAKeys
    agent.yaml                        configuration for 'tunnel agent'
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from enroll import certs
from enroll.files import make_private_dir, write_file, write_private
from enroll.request import BUNDLE_VERSION, make_request

HOST_KEY = "ssh_host_ed25519_key"


class InstallError(ValueError):
    """A bundle cannot be installed; the message says why."""


def check_pin(pin: str) -> str:
    pin = (pin or "").strip().lower()
    if not (pin.startswith("sha256:") and len(pin) == 71 and all(c in "0123456789abcdef" for c in pin[7:])):
        raise InstallError(
            "bad --ca-pin: expected sha256:<64 hex digits> as printed by 'enroll init'"
        )
    return pin


def prepare(directory: Path, name: str | None = None, ssh_host_key: Path | None = None) -> dict:
    """Make (or reuse) the device key and sshd host key; return the enrollment request."""
    directory = make_private_dir(directory)
    key_path = directory / "device.key"
    if key_path.exists():
        key = certs.load_key(key_path.read_bytes())
    else:
        key = certs.new_key()
        write_private(key_path, certs.key_pem(key))
    if ssh_host_key is None:
        ssh_host_key = directory / f"{HOST_KEY}.pub"
        if not ssh_host_key.exists():
            host = certs.new_ssh_ca_key()  # an Ed25519 key, like sshd's own
            write_private(directory / HOST_KEY, certs.ssh_private_pem(host))
            write_file(ssh_host_key, certs.ssh_public_line(host) + "\n")
    host_line = Path(ssh_host_key).read_text().strip()
    certs.load_ssh_public(host_line)
    request = make_request(certs.csr_pem(key).encode(), host_line, name)
    write_file(directory / "request.json", json.dumps(request, indent=2) + "\n")
    return request


def verify_bundle(directory: Path, bundle: dict, ca_pin: str):
    """Check a bundle against the pin and this device's key; return (cert, ca, identity)."""
    if not isinstance(bundle, dict) or bundle.get("version") != BUNDLE_VERSION:
        raise InstallError(f"unsupported bundle: expected version {BUNDLE_VERSION}")
    try:
        ca = certs.load_cert(bundle["ca"].encode())
        cert = certs.load_cert(bundle["cert"].encode())
    except (KeyError, AttributeError, certs.CertError) as exc:
        raise InstallError(f"malformed bundle: {exc}") from None
    got = certs.ca_pin(ca)
    if got != check_pin(ca_pin):
        raise InstallError(
            f"CA pin mismatch: the bundle's CA is {got}, but this line expects {ca_pin}. "
            "It was signed by a different fleet; nothing was installed."
        )
    try:
        certs.verify_issued_by(cert, ca)
        ident = certs.identity_of(cert, bundle.get("fleet"))
    except certs.CertError as exc:
        raise InstallError(str(exc)) from None
    if ident.kind != "device":
        raise InstallError(f"the bundle holds a {ident.kind} certificate, not a device certificate")
    key = certs.load_key((Path(directory) / "device.key").read_bytes())
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise InstallError("the bundle's certificate is for another device's key; nothing was installed")
    return cert, ca, ident


def install(directory: Path, bundle: dict, ca_pin: str, services: dict[str, str] | None = None,
            proxy: str | None = None) -> dict:
    """Verify the bundle, then write the identity files and agent config. Returns a summary.

    ``proxy`` is the address the device reached the proxy at (online enrollment), which the
    agent then uses too; else the fleet's configured proxy name.
    """
    directory = Path(directory)
    cert, ca, ident = verify_bundle(directory, bundle, ca_pin)
    write_file(directory / "device.crt", certs.cert_pem(cert))
    write_file(directory / "ca.crt", certs.cert_pem(ca))
    write_file(directory / f"{HOST_KEY}-cert.pub", bundle["ssh_host_cert"].strip() + "\n")
    write_file(directory / "user_ca.pub", bundle["ssh_user_ca"].strip() + "\n")
    bundle_proxy, proxy_address = bundle["proxy"], proxy
    config = {
        "device_id": ident.name,
        "fleet": ident.fleet,
        "identity": {"cert": "device.crt", "key": "device.key", "ca": "ca.crt"},
        "proxies": [{"address": proxy_address or bundle_proxy["address"],
                     "server_name": bundle_proxy["server_name"]}],
        "services": services or {"ssh": "127.0.0.1:22"},
        "keepalive": "25s",
    }
    config_path = directory / "agent.yaml"
    if not config_path.exists():  # keep an operator's edits on re-enrollment
        write_file(config_path, "# fleet-tunnel agent configuration\n" + yaml.safe_dump(config, sort_keys=False))
    return {
        "device_id": ident.name,
        "fleet": ident.fleet,
        "labels": ident.labels,
        "not_after": ident.not_after.isoformat(),
        "directory": str(directory),
    }
