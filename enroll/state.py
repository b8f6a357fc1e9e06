"""The CA host's state directory: fleet settings, CA keys, the proxy's certificate, the registry.

Layout (directory 0700, private keys 0600)::

    fleet.yaml              fleet name, proxy name/addresses/port, default lifetimes
    ca.crt  ca.key          the fleet CA (X.509) for devices, users and the proxy
    ssh_user_ca[.pub]       OpenSSH CA that device sshds trust for engineers
    ssh_host_ca[.pub]       OpenSSH CA that signs device host keys (one @cert-authority line)
    proxy.crt  proxy.key    the proxy's TLS server certificate
    registry.db             devices, tokens, certificates, audit events
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

from enroll import certs
from enroll.durations import parse_duration
from enroll.errors import FleetError
from enroll.files import make_private_dir, write_file, write_private


class StateError(FleetError, RuntimeError, code="state"):
    """The state directory is missing, incomplete or not writable; the message says what to do."""

    code = "state"


def default_state_dir() -> Path:
    if env := os.environ.get("FLEET_STATE"):
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(data) / "fleet-tunnel"


@dataclass
class FleetState:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    @property
    def config_path(self) -> Path:
        return self.root / "fleet.yaml"

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.db"

    def path(self, name: str) -> Path:
        return self.root / name

    @cached_property
    def config(self) -> dict:
        try:
            return yaml.safe_load(self.config_path.read_text())
        except FileNotFoundError:
            raise StateError(
                f"no fleet state in {self.root}: run 'enroll init' first, or pass --state DIR "
                "(or set FLEET_STATE)"
            ) from None

    @property
    def fleet(self) -> str:
        return self.config["fleet"]

    @cached_property
    def ca_cert(self):
        return certs.load_cert(self.path("ca.crt").read_bytes())

    @cached_property
    def ca_key(self):
        return certs.load_key(self.path("ca.key").read_bytes())

    @cached_property
    def ssh_user_ca_key(self):
        return _load_ssh_private(self.path("ssh_user_ca"))

    @cached_property
    def ssh_host_ca_key(self):
        return _load_ssh_private(self.path("ssh_host_ca"))

    def ssh_ca_public(self, which: str) -> str:
        return self.path(f"ssh_{which}_ca.pub").read_text().strip()

    @property
    def proxy_address(self) -> str:
        return f"{self.config['proxy_name']}:{self.config['proxy_port']}"

    def lifetime(self, kind: str) -> dt.timedelta:
        return parse_duration(self.config["lifetimes"][kind])

    # --- creation ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        fleet: str,
        proxy_name: str,
        proxy_ips: list[str],
        proxy_port: int = 443,
        device_lifetime: str = "30d",
    ) -> FleetState:
        """Make a new fleet: CAs, the proxy certificate and an empty registry. Never overwrites."""
        certs.check_name(fleet, "fleet name")
        parse_duration(device_lifetime)
        root = Path(root)
        if (root / "fleet.yaml").exists() or (root / "ca.key").exists():
            raise StateError(
                f"{root} already holds a fleet; refusing to overwrite it. "
                "Use another --state directory, or remove this one if you really mean to."
            )
        try:
            make_private_dir(root)
            probe = root / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StateError(f"cannot write the state directory {root}: {exc.strerror}") from None
        ca_key = certs.new_key()
        ca_cert = certs.make_ca(fleet, ca_key)
        write_private(root / "ca.key", certs.key_pem(ca_key))
        write_file(root / "ca.crt", certs.cert_pem(ca_cert))
        for which in ("user", "host"):
            key = certs.new_ssh_ca_key()
            write_private(root / f"ssh_{which}_ca", certs.ssh_private_pem(key))
            write_file(root / f"ssh_{which}_ca.pub", certs.ssh_public_line(key, f"{fleet}-{which}-ca") + "\n")
        proxy_key = certs.new_key()
        proxy_cert = certs.issue(
            ca_cert,
            ca_key,
            proxy_key.public_key(),
            kind="proxy",
            fleet=fleet,
            name=certs.check_name(proxy_name.split(".")[0].lower(), "proxy name"),
            lifetime=dt.timedelta(days=365),
            dns_names=(proxy_name,),
            ips=tuple(proxy_ips),
        )
        write_private(root / "proxy.key", certs.key_pem(proxy_key))
        write_file(root / "proxy.crt", certs.cert_pem(proxy_cert))
        config = {
            "fleet": fleet,
            "proxy_name": proxy_name,
            "proxy_ips": list(proxy_ips),
            "proxy_port": proxy_port,
            "lifetimes": {"device": device_lifetime, "user": "8h", "ssh_host": "30d"},
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        # fleet.yaml last: its presence marks a complete state directory.
        write_file(root / "fleet.yaml", yaml.safe_dump(config, sort_keys=False))
        state = cls(root)
        from enroll.registry import Registry
        from enroll.roles import ADMIN_ROLE_YAML
        from enroll.users import apply_roles

        with Registry(state.registry_path) as reg:
            apply_roles(reg, ADMIN_ROLE_YAML, actor="init")
        os.chmod(state.registry_path, 0o600)
        return state

    def registry(self):
        from enroll.registry import Registry

        self.config  # noqa: B018 — fail with the clear "run enroll init" error first
        return Registry(self.registry_path)


def _load_ssh_private(path: Path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    return load_ssh_private_key(path.read_bytes(), password=None)
