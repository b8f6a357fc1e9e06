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
        via: [satellite]           # per-uplink endpoint: used (only) while the route goes
                                   # out of one of these interfaces; endpoints without 'via'
                                   # serve every uplink that has no endpoint of its own
    services:                      # the only things reachable through the tunnel (at most 32;
      ssh: 127.0.0.1:22            # names lowercase ASCII: engineers and roles use exactly these,
      postgres: 127.0.0.1:5432     # and the proxy resolves a port to the one name listed on it)
    keepalive: 25s                 # below the 30 s UDP NAT timeout many carriers use
    probe_interval: 1s             # route re-check (besides netlink) and probe cadence while
                                   # sessions are open or a keepalive went unanswered
    probe_timeout: 1s              # a probe unanswered this long (or 2 RTT) counts as a miss
    dead_after: 3                  # misses before the path counts as dead (~3 s by default)
    reconnect_backoff: 0.5s        # first reconnect delay (full jitter, doubling ...)
    reconnect_backoff_max: 30s     # ... up to this; a change of network retries at once
    transport: auto                # QUIC, racing TLS over TCP 443 when UDP is blocked; or quic/tcp
    quic_retry: 30s                # while on TCP, try to get back onto QUIC this often
    resume_hold: 10m               # how long a session whose tunnel was lost is held for the
                                   # engineer to re-attach (0: sessions are not resumable)
    resume_buffer: 4MiB            # replay buffer per direction per resumable session

Every problem is reported as one ConfigError naming the field.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from enroll.addresses import AddressError, split_host_port
from enroll.durations import parse_duration
from enroll.errors import FleetError
from enroll.labels import MAX_SERVICES, SERVICE_NAME_RULE, valid_service_name


class ConfigError(FleetError, ValueError, code="config"):
    """agent.yaml is missing or wrong; the message names the file and the field."""


def _address(text, what: str) -> tuple[str, int]:
    try:
        return split_host_port(text, what)
    except AddressError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    server_name: str
    #: uplink interface names this endpoint is reached through (empty: any uplink that has no
    #: endpoint of its own)
    via: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def serves(self, uplink: str | None, others: tuple[Endpoint, ...]) -> bool:
        """May this endpoint be used while the route toward it leaves through ``uplink``?"""
        if self.via:
            return uplink in self.via
        return not any(uplink is not None and uplink in e.via for e in others)


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
    probe_interval: float = 1.0
    probe_timeout: float = 1.0
    reconnect_backoff: float = 0.5
    reconnect_backoff_max: float = 30.0
    #: "auto": QUIC, with TLS over TCP raced after a short head start (networks that block
    #: UDP); "quic" or "tcp" to force one
    transport: str = "auto"
    #: while on TCP, how often to try getting back onto QUIC
    quic_retry: float = 30.0
    #: seconds a resumable session is held after its tunnel stream was lost (0: no resuming)
    resume_hold: float = 600.0
    #: bytes of replay buffer (and send window) per direction per resumable session
    resume_buffer: int = 4 * 1024 * 1024

    @property
    def transports(self) -> tuple[str, ...]:
        return ("quic", "tcp") if self.transport == "auto" else (self.transport,)

    def endpoints_for(self, uplink: str | None) -> tuple[Endpoint, ...]:
        """The endpoints to use over ``uplink``, per-uplink ones first, in config order."""
        own = tuple(e for e in self.proxies if e.via and uplink in e.via)
        return own + tuple(e for e in self.proxies if not e.via and e.serves(uplink, self.proxies))

    def service_for(self, requested: str) -> tuple[str, tuple[str, int]] | None:
        """The listed service of exactly this name, or None.

        Never a port number: the proxy turns a port into the service's name before it
        authorizes and audits the session (from the table the agent reports in its hello), so
        the name the agent serves is the name the roles were checked against.
        """
        if requested in self.services:
            return requested, self.services[requested]
        return None

    def service_ports(self) -> dict[str, int]:
        """Name → port of each listed service, as the agent reports it in its hello."""
        return {name: addr[1] for name, addr in self.services.items()}


def _seconds(value, what: str) -> float:
    """A positive number of seconds, or a duration: ``500ms``, ``1.5s``, ``25s``, ``2m``."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    text = str(value).strip()
    for unit, scale in (("ms", 0.001), ("s", 1.0)):
        number = text[: -len(unit)]
        if text.endswith(unit) and number.replace(".", "", 1).isdigit() and float(number) > 0:
            return float(number) * scale
    try:
        return parse_duration(text) / dt.timedelta(seconds=1)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _hold(value, what: str) -> float:
    """Like :func:`_seconds`, but 0 is allowed (it turns resuming off)."""
    if value == 0 and not isinstance(value, bool) or str(value).strip() in ("0", "0s"):
        return 0.0
    return _seconds(value, what)


_SIZE_UNITS = (("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3), ("B", 1))
MIN_RESUME_BUFFER = 64 * 1024


def _size(value, what: str) -> int:
    """A size in bytes: a whole number, or ``512KiB``, ``4MiB``; at least MIN_RESUME_BUFFER."""
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        text = str(value).strip()
        for unit, scale in _SIZE_UNITS:
            number = text[: -len(unit)].strip()
            if text.endswith(unit) and number.isascii() and number.isdigit():
                size = int(number) * scale
                break
    if size is None or size < MIN_RESUME_BUFFER:
        raise ConfigError(f"{what}: expected a size of at least 64KiB (e.g. 4MiB), got {value!r}")
    return size


def _count(value, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(f"{what}: expected a whole number >= 1, got {value!r}")


def _choice(value, what: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{what}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


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
        host, port = _address(p["address"], f"proxies[{i}].address")
        via = p.get("via") or ()
        via = (via,) if isinstance(via, str) else via
        if not isinstance(via, list | tuple) or not all(isinstance(v, str) and v for v in via):
            raise ConfigError(f"{path}: proxies[{i}].via: expected an interface name or a list of them")
        proxies.append(Endpoint(host, port, p.get("server_name") or host, tuple(via)))
    if not proxies:
        raise ConfigError(f"{path}: list at least one proxy endpoint under 'proxies'")
    services_raw = raw.get("services") or {}
    if not isinstance(services_raw, dict):
        raise ConfigError(f"{path}: 'services' must map service names to HOST:PORT")
    if len(services_raw) > MAX_SERVICES:
        raise ConfigError(f"{path}: {len(services_raw)} services listed; at most {MAX_SERVICES} "
                          "(list only what engineers must reach)")
    services = {}
    for name, addr in services_raw.items():
        if not valid_service_name(name):
            raise ConfigError(f"{path}: services.{name}: a service name is {SERVICE_NAME_RULE}; "
                              "rename it (engineers and roles use this name)")
        services[name] = _address(addr, f"services.{name}")
    return AgentConfig(
        path=path,
        device_id=need("device_id", str),
        fleet=need("fleet", str),
        proxies=tuple(proxies),
        services=services,
        keepalive=_seconds(raw.get("keepalive", "25s"), "keepalive"),
        dead_after=_count(raw.get("dead_after", 3), "dead_after"),
        probe_interval=_seconds(raw.get("probe_interval", "1s"), "probe_interval"),
        probe_timeout=_seconds(raw.get("probe_timeout", "1s"), "probe_timeout"),
        reconnect_backoff=_seconds(raw.get("reconnect_backoff", "0.5s"), "reconnect_backoff"),
        reconnect_backoff_max=_seconds(raw.get("reconnect_backoff_max", "30s"), "reconnect_backoff_max"),
        transport=_choice(raw.get("transport", "auto"), "transport", ("auto", "quic", "tcp")),
        quic_retry=_seconds(raw.get("quic_retry", "30s"), "quic_retry"),
        resume_hold=_hold(raw.get("resume_hold", "10m"), "resume_hold"),
        resume_buffer=_size(raw.get("resume_buffer", "4MiB"), "resume_buffer"),
        **files,
    )
