"""The agent's configuration file (written by ``enroll device``, edited by ops).

Example::

    device_id: robot-05182e
    fleet: acme-fleet
    identity: {cert: device.crt, key: device.key, ca: ca.crt}   # relative to this file
    proxies:                       # tried in order; the first that answers wins
      - address: proxy.example.com:443
        server_name: proxy.example.com
      - address: 192.0.2.1:443     # e.g. a ground-station endpoint only satellite reaches
        server_name: proxy.example.com
    services:                      # the only things reachable through the tunnel
      ssh: 127.0.0.1:22
      postgres: 127.0.0.1:5432
    keepalive: 25s                 # below the 30 s UDP NAT timeout many carriers use
    dead_after: 3                  # unanswered keepalives before the path counts as dead

Every problem is reported as one ConfigError naming the field.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from enroll.state import parse_duration


class ConfigError(ValueError):
    pass


def split_host_port(text: str, what: str, allow_zero: bool = False) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not (0 if allow_zero else 1) <= int(port) < 65536:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    return host, int(port)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    server_name: str
    via: str | None = None  # an uplink interface name this endpoint is reached through


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    device_id: str
    fleet: str
    cert: Path
    key: Path
    ca: Path
    proxies: tuple[Endpoint, ...]
    services: dict[str, tuple[str, int]] = field(default_factory=dict)
    keepalive: float = 25.0
    dead_after: int = 3

    def service_for(self, requested: str) -> tuple[str, tuple[str, int]] | None:
        """A service by name, or by port number (``ssh`` for 22 when ssh listens on 22)."""
        if requested in self.services:
            return requested, self.services[requested]
        if requested.isdigit():
            for name, addr in self.services.items():
                if addr[1] == int(requested):
                    return name, addr
        return None


def _seconds(value, what: str) -> float:
    if isinstance(value, int | float) and value > 0:
        return float(value)
    try:
        return parse_duration(str(value)) / dt.timedelta(seconds=1)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def load(path: Path | str) -> AgentConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no agent config at {path}: run 'enroll device' first or pass --config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    base = path.parent

    def need(key, typ):
        if not isinstance(raw.get(key), typ):
            raise ConfigError(f"{path}: '{key}' is missing or not a {typ.__name__}")
        return raw[key]

    ident = need("identity", dict)
    files = {}
    for k in ("cert", "key", "ca"):
        if not isinstance(ident.get(k), str):
            raise ConfigError(f"{path}: identity.{k} is missing")
        files[k] = (base / ident[k]).resolve()
    proxies = []
    for i, p in enumerate(need("proxies", list)):
        if not isinstance(p, dict) or "address" not in p:
            raise ConfigError(f"{path}: proxies[{i}] needs an 'address: HOST:PORT'")
        host, port = split_host_port(p["address"], f"proxies[{i}].address")
        proxies.append(Endpoint(host, port, p.get("server_name") or host, p.get("via")))
    if not proxies:
        raise ConfigError(f"{path}: list at least one proxy endpoint under 'proxies'")
    services = {
        str(name): split_host_port(addr, f"services.{name}")
        for name, addr in (raw.get("services") or {}).items()
    }
    return AgentConfig(
        path=path,
        device_id=need("device_id", str),
        fleet=need("fleet", str),
        proxies=tuple(proxies),
        services=services,
        keepalive=_seconds(raw.get("keepalive", "25s"), "keepalive"),
        dead_after=int(raw.get("dead_after", 3)),
        **files,
    )
