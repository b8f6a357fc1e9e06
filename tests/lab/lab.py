"""The network lab: namespaces that imitate devices behind NAT, CGNAT and satellite links.

``Lab`` owns one run (run id, namespaces, spawned processes, sockets, temp dir) and tears all
of it down in ``close()`` (also registered with ``atexit``).  ``Device`` is one device
namespace with its uplinks and the knobs a test turns: switch uplinks, outages, loss, rate,
delay, UDP blocking, NAT rebinding, byte counters, and a real sshd on its loopback.

Routers are per device (see ``plan.py`` for the address table): a device's home router,
carrier + CGNAT pair and satellite terminal are its own namespaces, so a NAT rebinding or a
loss setting on one device never disturbs another and no shared state needs locking.
The one shared namespace is ``internet``, which holds the proxy's public address and its
ground-station address.
"""

from __future__ import annotations

import atexit
import contextlib
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import netns, plan
from .netns import LabError

RELAY_SCRIPT = Path(__file__).with_name("relay.py")


class Lab:
    """One lab run.  Build with ``Lab()`` (or the ``lab`` fixture); always ``close()`` it."""

    def __init__(self, proxy_ports=(443,)):
        self.run_id = netns.new_run_id()  # also writes the owner marker
        self.proxy_public = plan.PROXY_PUBLIC
        self.proxy_ground = plan.PROXY_GROUND
        #: UDP ports to the proxy that ``Device.set_delay`` delays (DNAT is per port).
        self.proxy_ports = tuple(proxy_ports)
        self.devices: dict[str, Device] = {}
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"ftlab-{self.run_id}-"))
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._lock = threading.RLock()
        atexit.register(self.close)
        try:
            inet = plan.internet_plan(self.run_id)
            self.internet = inet.name
            self._build([inet], [], {})
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ building

    def _build(self, namespaces, veths, extra_ip: dict) -> None:
        names = [n.name for n in namespaces]
        self._namespaces += names  # recorded first: close() cleans up a half-built device
        netns.ip_batch(None, plan.host_batch(names, []))
        for n in namespaces:
            netns.write_sysctls(n.name, n.sysctls)
        netns.ip_batch(None, plan.host_batch([], veths))
        for n in namespaces:
            netns.ip_batch(n.name, n.ip_batch)
        for ns, lines in extra_ip.items():
            netns.ip_batch(ns, lines)
        for n in namespaces:
            if n.nft:
                netns.nft(n.name, n.nft)

    def add_device(
        self,
        name: str,
        uplinks=plan.UPLINKS,
        active: str | None = None,
        satellite_public: bool = False,
    ) -> Device:
        """Create a device namespace with its uplinks; default route via ``active`` (first).

        ``satellite_public``: its satellite uplink reaches the public proxy address instead of
        the ground address (see ``plan.device_plan``).
        """
        with self._lock:
            if name in self.devices:
                raise ValueError(f"device {name!r} exists")
            p = plan.device_plan(
                self.run_id, name, len(self.devices) + 1, uplinks, active, satellite_public
            )
            self._build(p.namespaces, p.veths, {self.internet: p.internet_ip_batch})
            if p.internet_nft:
                netns.nft(self.internet, p.internet_nft)
            dev = Device(self, p)
            self.devices[name] = dev
            return dev

    # ------------------------------------------------------------------ running things

    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def run(
        self, ns: str, argv, *, check: bool = True, input: str | None = None, timeout: float = 30
    ):
        """Run a short command inside ``ns`` (``ip netns exec``); returns CompletedProcess."""
        return netns.sh(netns.ns_argv(ns, argv), input=input, check=check, timeout=timeout)

    def spawn(self, ns: str, argv, **popen_kwargs) -> subprocess.Popen:
        """Start a long-running process inside ``ns``; it is killed (with its group) on close()."""
        popen_kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(netns.ns_argv(ns, argv), **popen_kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def socket(self, ns: str, family=socket.AF_INET, type=socket.SOCK_DGRAM) -> socket.socket:
        """A socket that lives in ``ns`` (created there by a helper thread); closed on close()."""
        s = netns.ns_socket(ns, family, type)
        with self._lock:
            self._sockets.append(s)
        return s

    def call_in(self, ns: str, fn):
        """Run ``fn()`` in a thread inside ``ns`` and return its result (for in-process setup).

        Sockets ``fn`` creates are not tracked: close them, or they keep the namespace alive
        (invisibly) after ``close()``.  Prefer ``socket()`` for sockets.
        """
        return netns.in_netns(ns, fn)

    def _background(self, fn) -> threading.Thread:
        t = threading.Thread(target=fn, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()
        return t

    # ------------------------------------------------------------------ NAT

    def rebind_nat(self, dev: Device | str, uplink: str, proto: str = "udp") -> None:
        """NAT rebinding: the outermost NAT of the uplink maps live flows to new ports.

        Switches the masquerade to the other of two disjoint port ranges and deletes that
        router's conntrack entries for ``proto``; the next packet of a flow gets a new mapping.
        Replies the proxy sends to the old port are dropped (no entry, and new inbound is
        refused), exactly like a real NAT timeout-and-rebind.
        """
        dev = self.devices[dev] if isinstance(dev, str) else dev
        u = dev.plan.uplinks[uplink]
        with self._lock:
            gen = dev._nat_gen.get(uplink, 0) + 1
            dev._nat_gen[uplink] = gen
            netns.nft(u.nat_ns, plan.masq_nft(gen))
            self.run(u.nat_ns, ["conntrack", "-D", "-p", proto], check=False)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop everything this run started and delete its namespaces.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors = []
        for t in self._threads:
            t.join(timeout=30)
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
        for d in self.devices.values():
            for r in d._relays.values():
                with contextlib.suppress(OSError):
                    r.stdin.close()
        for p in reversed(self._procs):
            try:
                netns.stop_process(p)
            except Exception as e:  # keep tearing down
                errors.append(e)
        try:
            netns.delete_namespaces(self._namespaces)
        except Exception as e:
            errors.append(e)
        else:
            netns.remove_marker(self.run_id)  # only once nothing is left for a sweep to find
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if errors:
            raise LabError(f"lab teardown errors: {errors}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class SshServer:
    """A real OpenSSH server running in a device namespace (see ``Device.start_sshd``)."""

    lab: Lab
    ns: str
    port: int
    config_path: Path
    host_keys: list[Path]
    client_key: Path  # private key whose public half is in authorized_keys
    authorized_keys: Path
    log_path: Path
    process: subprocess.Popen
    pid_file: Path = field(default=None)

    def ssh_argv(self, *command: str, user: str = "root") -> list[str]:
        """ssh client argv that logs in with ``client_key`` (run it inside the same namespace)."""
        return [
            "ssh", "-i", str(self.client_key), "-p", str(self.port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
            f"{user}@127.0.0.1", *command,
        ]  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        netns.stop_process(self.process)


class Device:
    """One device namespace.  Uplink interfaces are named ``wifi``/``cellular``/``satellite``."""

    def __init__(self, lab: Lab, p: plan.DevicePlan):
        self.lab = lab
        self.plan = p
        self.name = p.name
        self.ns = p.ns
        self.uplinks = tuple(p.uplinks)
        self._active: str | None = p.active
        self._up = dict.fromkeys(self.uplinks, True)
        self._loss: dict[str, tuple[float, float]] = {}
        self._blocked: dict[str, bool] = {}
        self._nat_gen: dict[str, int] = {}
        self._relays: dict[str, subprocess.Popen] = {}
        self._relay_ports: dict[str, dict[int, int]] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ addresses

    def address(self, uplink: str) -> str:
        """The device's private address on ``uplink`` (never visible to the proxy)."""
        return self.plan.uplinks[uplink].device_addr

    def public_address(self, uplink: str) -> str:
        """The source address the proxy sees for traffic over ``uplink`` (outermost NAT)."""
        return self.plan.uplinks[uplink].public_addr

    def proxy_address(self, uplink: str) -> str:
        """The proxy address reachable over ``uplink`` (ground address for satellite)."""
        return self.plan.uplinks[uplink].proxy_addr

    @property
    def active_uplink(self) -> str | None:
        """Uplink the default route belongs to; None during outage() or a break-before-make gap.

        ``down(active)`` keeps the name (the kernel drops the route; ``up`` restores it).
        """
        return self._active

    def is_up(self, uplink: str) -> bool:
        return self._up[uplink]

    # ------------------------------------------------------------------ running things

    def run(self, argv, **kw):
        return self.lab.run(self.ns, argv, **kw)

    def spawn(self, argv, **kw) -> subprocess.Popen:
        return self.lab.spawn(self.ns, argv, **kw)

    def socket(self, family=socket.AF_INET, type=socket.SOCK_DGRAM) -> socket.socket:
        return self.lab.socket(self.ns, family, type)

    # ------------------------------------------------------------------ links and routes

    def _check(self, uplink: str) -> plan.UplinkPlan:
        if uplink not in self.plan.uplinks:
            raise ValueError(f"{self.name} has no uplink {uplink!r} (has {self.uplinks})")
        return self.plan.uplinks[uplink]

    def up(self, uplink: str) -> None:
        """Bring an uplink's link up; if it is the active uplink, restore the default route."""
        u = self._check(uplink)
        with self._lock:
            lines = [f"link set {uplink} up"]
            if self._active == uplink:
                lines = plan.switch_lines(uplink, u.gateway)
            netns.ip_batch(self.ns, lines)
            self._up[uplink] = True

    def down(self, uplink: str) -> None:
        """Take an uplink's link down (the kernel drops its routes; no automatic failover)."""
        self._check(uplink)
        with self._lock:
            netns.ip_batch(self.ns, [f"link set {uplink} down"])
            self._up[uplink] = False

    def use(
        self,
        uplink: str,
        *,
        break_first: bool = False,
        outage: float = 0.0,
        keep_old: bool = False,
        block: bool = True,
    ):
        """Move the default route to ``uplink``.

        Make-before-break (default): new link up, route switched, then the old link down.
        ``break_first=True``: old link down, ``outage`` seconds with no route, then the new one.
        ``keep_old`` leaves the old link up.  ``block=False`` runs it in a background thread
        (returned) so an asyncio test can keep its event loop turning during the outage.
        """
        u = self._check(uplink)

        def do():
            with self._lock:
                old = self._active
                if break_first:
                    if old and old != uplink and not keep_old:
                        self.down(old)
                    elif old:
                        netns.ip_batch(self.ns, ["route del default"])
                    self._active = None
                    time.sleep(outage)
                    netns.ip_batch(self.ns, plan.switch_lines(uplink, u.gateway))
                    self._active = uplink
                    self._up[uplink] = True
                else:
                    netns.ip_batch(self.ns, plan.switch_lines(uplink, u.gateway))
                    self._active = uplink
                    self._up[uplink] = True
                    if old and old != uplink and not keep_old:
                        self.down(old)

        if block:
            do()
            return None
        return self.lab._background(do)

    def outage(self, seconds: float, *, block: bool = True):
        """All uplinks down for ``seconds``, then the previous state (and route) comes back."""

        def do():
            with self._lock:
                was_up = [u for u in self.uplinks if self._up[u]]
                active = self._active
                netns.ip_batch(self.ns, [f"link set {u} down" for u in self.uplinks])
                for u in self.uplinks:
                    self._up[u] = False
                self._active = None
                time.sleep(seconds)
                lines = [f"link set {u} up" for u in was_up]
                if active in was_up:
                    lines += plan.switch_lines(active, self.plan.uplinks[active].gateway)
                netns.ip_batch(self.ns, lines)
                for u in was_up:
                    self._up[u] = True
                self._active = active if active in was_up else None

        if block:
            do()
            return None
        return self.lab._background(do)

    # ------------------------------------------------------------------ impairments

    def _apply_knobs(self, uplink: str) -> None:
        u = self._check(uplink)
        up, down = self._loss.get(uplink, (0, 0))
        netns.nft(u.first_hop_ns, plan.knobs_nft(up, down, self._blocked.get(uplink, False)))

    def set_loss(self, uplink: str, percent: float, direction: str = "both") -> None:
        """Drop ``percent`` % of packets at the first-hop router ("up", "down" or "both")."""
        if direction not in ("up", "down", "both"):
            raise ValueError("direction must be up, down or both")
        with self._lock:
            up, down = self._loss.get(uplink, (0, 0))
            if direction in ("up", "both"):
                up = percent
            if direction in ("down", "both"):
                down = percent
            self._loss[uplink] = (up, down)
            self._apply_knobs(uplink)

    def block_udp(self, uplink: str, on: bool = True) -> None:
        """Silently drop all UDP from the device at the first-hop router (TCP still works)."""
        with self._lock:
            self._blocked[uplink] = on
            self._apply_knobs(uplink)

    def set_rate(self, uplink: str, kbit: int | None) -> None:
        """Token-bucket limit both ways: device egress and first-hop router's egress to it.

        Counters are taken before the device's qdisc, so packets the bucket drops still count
        as sent (like a modem's usage meter would not, but the app did pay for the send).
        """
        u = self._check(uplink)
        with self._lock:
            for ns, ifname in ((self.ns, uplink), (u.first_hop_ns, "lan")):
                self.lab.run(ns, ["tc", *plan.tbf_args(ifname, kbit)], check=bool(kbit))

    def set_delay(self, uplink: str, rtt_ms: float, ports=None) -> None:
        """Add ``rtt_ms`` of round-trip delay to UDP from the device to the proxy's ``ports``.

        A userspace relay on the first-hop router forwards each datagram after rtt/2 in each
        direction (netem is unavailable).  Turning delay on or off moves existing flows onto or
        off the relay: their conntrack entries are flushed, so the proxy sees a new source port
        (like a NAT rebinding).  Changing a non-zero delay keeps flows where they are.  Only
        UDP is delayed; the relay's own socket adds the router as the hop the proxy sees, which
        is the same address masquerade would show.
        """
        u = self._check(uplink)
        ports = tuple(ports or self.lab.proxy_ports)
        with self._lock:
            relay = self._relays.get(uplink)
            port_map = plan.relay_port_map(ports)
            if relay and rtt_ms and self._relay_ports[uplink] == port_map and relay.poll() is None:
                relay.stdin.write(f"delay {rtt_ms / 2}\n")
                relay.stdin.flush()
                return
            if relay:
                self._stop_relay(uplink)
            if not rtt_ms:
                self._flush_proxy_flows(u)
                return
            argv = [sys.executable, str(RELAY_SCRIPT), "--bind", u.first_hop_lan_addr,
                    "--delay-ms", str(rtt_ms / 2)]  # fmt: skip
            for port, local in port_map.items():
                argv += ["--map", f"{local}={u.proxy_addr}:{port}"]
            proc = self.lab.spawn(
                u.first_hop_ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            if not ready or proc.stdout.readline().strip() != "ready":
                netns.stop_process(proc)
                raise LabError(f"delay relay on {u.first_hop_ns} did not start")
            self._relays[uplink] = proc
            self._relay_ports[uplink] = port_map
            netns.nft(u.first_hop_ns, plan.delay_nft(u.proxy_addr, u.first_hop_lan_addr, port_map))
            self._flush_proxy_flows(u)

    def _stop_relay(self, uplink: str) -> None:
        u = self.plan.uplinks[uplink]
        netns.nft(u.first_hop_ns, plan.delay_nft(u.proxy_addr, u.first_hop_lan_addr, None))
        proc = self._relays.pop(uplink)
        self._relay_ports.pop(uplink, None)
        with contextlib.suppress(OSError):
            proc.stdin.close()
        netns.stop_process(proc)

    def _flush_proxy_flows(self, u: plan.UplinkPlan) -> None:
        self.lab.run(
            u.first_hop_ns,
            ["conntrack", "-D", "-p", "udp", "--orig-dst", u.proxy_addr],
            check=False,
        )

    # ------------------------------------------------------------------ observation

    def counters(self, uplink: str) -> dict[str, int]:
        """Bytes/packets on ``uplink`` as the device's nftables saw them (IP length, both ways)."""
        self._check(uplink)
        r = self.lab.run(self.ns, ["nft", "-j", "list", "counters", "table", "ip", plan.TABLE])
        return plan.uplink_counters(plan.parse_counters(r.stdout), uplink)

    # ------------------------------------------------------------------ sshd

    def start_sshd(
        self, config_extra: str = "", host_key_dir=None, port: int = 22, timeout: float = 10
    ) -> SshServer:
        """Run a real OpenSSH ``sshd -D -e`` on the device's 127.0.0.1 with its own config/keys.

        Host keys are generated (ed25519) unless ``host_key_dir`` holds ``ssh_host_*_key`` files;
        a client key pair is generated and authorized for root.  Returns once sshd listens.
        """
        d = Path(tempfile.mkdtemp(prefix=f"sshd-{self.name}-", dir=self.lab.tmpdir))
        if host_key_dir is None:
            host_keys = [d / "ssh_host_ed25519_key"]
            netns.sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_keys[0]])
        else:
            host_keys = sorted(p for p in Path(host_key_dir).glob("ssh_host_*_key"))
            if not host_keys:
                raise LabError(f"no ssh_host_*_key files in {host_key_dir}")
        client_key = d / "client_ed25519"
        netns.sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ftlab", "-f", client_key])
        authorized = d / "authorized_keys"
        authorized.write_text(Path(f"{client_key}.pub").read_text())
        pid_file = d / "sshd.pid"
        config = d / "sshd_config"
        config.write_text(
            plan.sshd_config(
                port=port, host_keys=host_keys, pid_file=str(pid_file),
                authorized_keys=str(authorized), extra=config_extra,
            )
        )  # fmt: skip
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        log = d / "sshd.log"
        with open(log, "wb") as logf:
            proc = self.spawn(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while "Server listening on" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                netns.stop_process(proc)
                raise LabError(f"sshd did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.02)
        return SshServer(
            lab=self.lab, ns=self.ns, port=port, config_path=config, host_keys=host_keys,
            client_key=client_key, authorized_keys=authorized, log_path=log, process=proc,
            pid_file=pid_file,
        )  # fmt: skip
