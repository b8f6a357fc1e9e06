"""Pure planning for the network lab: names, addresses, commands and nft rulesets as data.

Nothing here touches the system, so the whole topology can be unit-tested without root
(``tests/test_lab.py`` does).  ``tests/lab/netns.py`` executes what this module plans.

Addressing (device index ``i`` = 1..63; every router namespace is private to one device, so
devices never share NAT state and a test can break one device's network without side effects):

=========  ===========================  =====================================================
uplink     hop                           addresses
=========  ===========================  =====================================================
wifi       device ``wifi`` <-> home      203.0.113.(4i+2)/30  <->  203.0.113.(4i+1)
           home ``wan`` <-> internet     198.18.i.2/30        <->  198.18.i.1 (``w<i>``)
cellular   device ``cellular`` <-> carr  198.51.100.(4i+2)/30 <->  198.51.100.(4i+1)
           carrier <-> cgnat             100.64.i.2/30        <->  100.64.i.1   (NAT #1 here)
           cgnat ``wan`` <-> internet    198.19.i.2/30        <->  198.19.i.1 (``c<i>``) (NAT #2)
satellite  device ``satellite`` <-> sat  100.96.i.2/30        <->  100.96.i.1
           sat ``wan`` <-> ground        192.0.2.(4i+2)/30    <->  192.0.2.(4i+1) (``g<i>``)
=========  ===========================  =====================================================

The proxy's addresses live on the internet namespace's loopback: 198.18.0.1 (public) and
192.0.2.1 (ground station).  The ground links (``g<i>``) are firewalled off from everything but
192.0.2.0/24 in both directions, and the satellite router only has a route for 192.0.2.0/24, so
a satellite device reaches the ground address but never the public one.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field

PREFIX = "ftlab-"
MARKER_DIR = "/run/fleet-tunnel-lab"
UPLINKS = ("wifi", "cellular", "satellite")
PROXY_PUBLIC = "198.18.0.1"
PROXY_GROUND = "192.0.2.1"
GROUND_NET = "192.0.2.0/24"
MAX_DEVICES = 63
IFNAMSIZ = 15
TABLE = "ftlab"
# Alternating masquerade port ranges for NAT rebinding.  Both are below Linux's default
# ephemeral range (32768-60999), so the first rebinding also moves a port-preserved mapping.
REBIND_RANGES = ((10000, 19999), (20000, 29999))
# Ranges the lab may ever put on an interface (see the hard rules in the task brief).
ALLOWED_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("198.18.0.0/15", "203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24", "100.64.0.0/10")
)

_RUN_ID = re.compile(r"^[0-9a-f]{4}$")
_DEV_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id must be 4 lowercase hex chars, got {run_id!r}")
    return run_id


def check_device_name(name: str) -> str:
    """Device names become part of namespace names; no dashes so names parse unambiguously."""
    if not _DEV_NAME.match(name):
        raise ValueError(f"device name must match {_DEV_NAME.pattern}, got {name!r}")
    return name


def ns_name(run_id: str, *parts: str) -> str:
    return PREFIX + "-".join((check_run_id(run_id), *parts))


def run_id_of(ns: str) -> str | None:
    """The run id of a lab namespace name, or None if the name is not one of ours."""
    if not ns.startswith(PREFIX):
        return None
    rid = ns[len(PREFIX) :].split("-", 1)[0]
    return rid if _RUN_ID.match(rid) else None


def marker_path(run_id: str) -> str:
    return f"{MARKER_DIR}/{check_run_id(run_id)}.pid"


def format_marker(pid: int, start_time: int) -> str:
    """Marker = owner pid + its start time, so a recycled pid is not mistaken for the owner."""
    return f"{pid} {start_time}\n"


def parse_marker(text: str) -> tuple[int, int] | None:
    try:
        pid, start = text.split()
        return int(pid), int(start)
    except ValueError:
        return None


def stale_run_ids(ns_names, markers: dict, alive) -> set[str]:
    """Run ids whose namespaces may be deleted: prefix matches and the owner is dead or unknown.

    ``markers`` maps run id -> parsed marker (or None when unreadable); a run without a marker is
    an orphan because markers are written before and removed after the namespaces.
    ``alive(pid, start_time)`` says whether the recorded owner still runs.
    """
    stale = set()
    for ns in ns_names:
        rid = run_id_of(ns)
        if rid is None:
            continue
        marker = markers.get(rid)
        if marker is None or not alive(*marker):
            stale.add(rid)
    for rid, marker in markers.items():
        if marker is None or not alive(*marker):
            stale.add(rid)
    return stale


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Veth:
    """One veth pair, created directly inside both namespaces with its final names.

    ``ip link add A netns X type veth peer name B netns Y`` registers each end in its target
    namespace, so no temporary name ever exists in the host namespace (nothing to collide with
    a concurrent run, nothing to leak if we are killed mid-way).
    """

    a_ns: str
    a_if: str
    a_addr: str
    b_ns: str
    b_if: str
    b_addr: str
    # Preferred source for the b end's subnet route.  The internet side uses the proxy's
    # address here: a server bound to 0.0.0.0 then answers from the address the device
    # dialled, not from the link address (which the NAT would drop as a new inbound flow).
    b_src: str | None = None

    def host_batch_line(self) -> str:
        return f"link add {self.a_if} netns {self.a_ns} type veth peer name {self.b_if} netns {self.b_ns}"

    def ends(self):
        return ((self.a_ns, self.a_if, self.a_addr), (self.b_ns, self.b_if, self.b_addr))


@dataclass(frozen=True)
class NsPlan:
    name: str
    role: str
    sysctls: tuple[tuple[str, str], ...] = ()
    ip_batch: tuple[str, ...] = ()  # lines for `ip -n NAME -batch -`, run after links exist
    nft: str = ""


@dataclass(frozen=True)
class UplinkPlan:
    """Everything a test needs to know about one uplink of one device."""

    name: str
    device_addr: str  # the device's private address on this uplink
    gateway: str  # next hop (first-hop router's LAN address)
    first_hop_ns: str  # loss / rate / UDP block / delay relay live here
    first_hop_lan_addr: str
    nat_ns: str  # outermost NAT: the one the proxy sees, rebound by Lab.rebind_nat
    public_addr: str  # source address the proxy sees for this uplink
    proxy_addr: str  # where the proxy is reachable over this uplink
    namespaces: tuple[str, ...]  # router namespaces of this uplink, device side first


@dataclass(frozen=True)
class DevicePlan:
    name: str
    index: int
    ns: str
    active: str | None
    uplinks: dict = field(default_factory=dict)  # name -> UplinkPlan
    namespaces: tuple[NsPlan, ...] = ()  # namespaces to create (device first)
    veths: tuple[Veth, ...] = ()
    internet_ip_batch: tuple[str, ...] = ()  # lines for the (existing) internet namespace
    internet_nft: str = ""  # extra rules for the internet namespace (``nft -f``)


# Set before the veths exist: new links get no IPv6 (no ND/RS noise in counters), while the
# loopback, which predates the setting, keeps ::1 for servers that bind "localhost" or "::".
SYSCTL_COMMON = (("net.ipv6.conf.default.disable_ipv6", "1"),)
SYSCTL_ROUTER = SYSCTL_COMMON + (
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),  # a connected UDP socket may keep its old source
    ("net.ipv4.conf.default.rp_filter", "0"),  # address after a switch; the NAT fixes it up
)


def _ip_lines_for(ns: str, veths) -> list[str]:
    addrs, ups, routes = [], [], []
    for v in veths:
        for k, (ens, eif, eaddr) in enumerate(v.ends()):
            if ens != ns:
                continue
            if k == 1 and v.b_src:
                addrs.append(f"addr add {eaddr} dev {eif} noprefixroute")
                net = ipaddress.ip_interface(eaddr).network
                routes.append(f"route add {net} dev {eif} src {v.b_src}")
            else:
                addrs.append(f"addr add {eaddr} dev {eif}")
            ups.append(f"link set {eif} up")
    return addrs + ups + routes


def _host(addr: str) -> str:
    return addr.split("/")[0]


def internet_plan(run_id: str) -> NsPlan:
    ns = ns_name(run_id, "inet")
    nft = f"""table ip {TABLE} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "g*" ip daddr != {GROUND_NET} drop
        iifname "w*" ip daddr {GROUND_NET} drop
        iifname "c*" ip daddr {GROUND_NET} drop
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname "g*" drop
        oifname "g*" drop
    }}
}}
"""
    return NsPlan(
        name=ns,
        role="internet",
        sysctls=SYSCTL_COMMON + (("net.ipv4.ip_forward", "1"),),
        ip_batch=(
            "link set lo up",
            f"addr add {PROXY_PUBLIC}/32 dev lo",
            f"addr add {PROXY_GROUND}/32 dev lo",
        ),
        nft=nft,
    )


def device_nft(uplinks) -> str:
    """Named byte counters per uplink and direction, and no new inbound connections."""
    counters = "".join(f"    counter {u}_tx {{ }}\n    counter {u}_rx {{ }}\n" for u in uplinks)
    rx = "".join(f'        iifname "{u}" counter name "{u}_rx"\n' for u in uplinks)
    tx = "".join(f'        oifname "{u}" counter name "{u}_tx"\n' for u in uplinks)
    ifs = ", ".join(f'"{u}"' for u in uplinks)
    return f"""table ip {TABLE} {{
{counters}    chain input {{
        type filter hook input priority 0; policy accept;
{rx}        iifname {{ {ifs} }} ct state new drop
        iifname {{ {ifs} }} ct state invalid drop
    }}
    chain output {{
        type filter hook output priority 0; policy accept;
{tx}    }}
}}
"""


def router_nft(nat: bool = True) -> str:
    """A router between ``lan`` (device side) and ``wan``.

    The ``knobs_*``, ``delay`` and ``masq`` chains are empty hooks that the lab rewrites
    atomically (``flush chain`` + ``add rule`` in one ``nft -f``) to apply loss, UDP blocking,
    the delay relay's DNAT and NAT rebinding without touching the rest of the ruleset.
    """
    masq = '        oifname "wan" masquerade\n' if nat else ""
    return f"""table ip {TABLE} {{
    chain knobs_pre {{
    }}
    chain knobs_post {{
    }}
    chain delay {{
    }}
    chain masq {{
{masq}    }}
    chain raw_pre {{
        type filter hook prerouting priority -300; policy accept;
        iifname "lan" jump knobs_pre
    }}
    chain filter_post {{
        type filter hook postrouting priority 300; policy accept;
        oifname "lan" jump knobs_post
    }}
    chain nat_pre {{
        type nat hook prerouting priority -100; policy accept;
        iifname "lan" jump delay
    }}
    chain nat_post {{
        type nat hook postrouting priority 100; policy accept;
        jump masq
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname "wan" ct state new drop
        iifname "wan" ct state invalid drop
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "wan" ct state new drop
    }}
}}
"""


def device_plan(
    run_id: str,
    name: str,
    index: int,
    uplinks=UPLINKS,
    active: str | None = None,
    satellite_public: bool = False,
) -> DevicePlan:
    """Plan one device with its own router namespaces for each requested uplink.

    ``satellite_public=True``: this device's satellite network also carries the proxy's public
    address (a ground station with an internet breakout), instead of the ground address.  The
    internet end of its ground link then answers from the public address, so the satellite
    uplink reaches 198.18.0.1 (and no longer the ground address): a device can migrate one
    QUIC connection between cellular and satellite.
    """
    check_device_name(name)
    if not 1 <= index <= MAX_DEVICES:
        raise ValueError(f"device index must be 1..{MAX_DEVICES}")
    uplinks = tuple(uplinks)
    if not uplinks or len(set(uplinks)) != len(uplinks) or not set(uplinks) <= set(UPLINKS):
        raise ValueError(f"uplinks must be distinct names from {UPLINKS}, got {uplinks!r}")
    active = uplinks[0] if active is None else active
    if active not in uplinks:
        raise ValueError(f"active uplink {active!r} not in {uplinks!r}")
    i = index
    inet = ns_name(run_id, "inet")
    dev = ns_name(run_id, name)
    veths: list[Veth] = []
    routers: list[NsPlan] = []
    plans: dict[str, UplinkPlan] = {}
    router_routes: dict[str, list[str]] = {}
    inet_ifs: list[str] = []
    internet_nft: list[str] = []

    if "wifi" in uplinks:
        home = ns_name(run_id, name, "home")
        veths += [
            Veth(
                dev, "wifi", f"203.0.113.{4 * i + 2}/30", home, "lan", f"203.0.113.{4 * i + 1}/30"
            ),
            Veth(home, "wan", f"198.18.{i}.2/30", inet, f"w{i}", f"198.18.{i}.1/30", PROXY_PUBLIC),
        ]
        router_routes[home] = [f"route add default via 198.18.{i}.1"]
        inet_ifs.append(f"w{i}")
        plans["wifi"] = UplinkPlan(
            "wifi", f"203.0.113.{4 * i + 2}", f"203.0.113.{4 * i + 1}", home,
            f"203.0.113.{4 * i + 1}", home, f"198.18.{i}.2", PROXY_PUBLIC, (home,),
        )  # fmt: skip
    if "cellular" in uplinks:
        carrier = ns_name(run_id, name, "carrier")
        cgnat = ns_name(run_id, name, "cgnat")
        veths += [
            Veth(
                dev,
                "cellular",
                f"198.51.100.{4 * i + 2}/30",
                carrier,
                "lan",
                f"198.51.100.{4 * i + 1}/30",
            ),
            Veth(carrier, "wan", f"100.64.{i}.2/30", cgnat, "lan", f"100.64.{i}.1/30"),
            Veth(cgnat, "wan", f"198.19.{i}.2/30", inet, f"c{i}", f"198.19.{i}.1/30", PROXY_PUBLIC),
        ]
        router_routes[carrier] = [f"route add default via 100.64.{i}.1"]
        router_routes[cgnat] = [f"route add default via 198.19.{i}.1"]
        inet_ifs.append(f"c{i}")
        plans["cellular"] = UplinkPlan(
            "cellular", f"198.51.100.{4 * i + 2}", f"198.51.100.{4 * i + 1}", carrier,
            f"198.51.100.{4 * i + 1}", cgnat, f"198.19.{i}.2", PROXY_PUBLIC, (carrier, cgnat),
        )  # fmt: skip
    if "satellite" in uplinks:
        sat = ns_name(run_id, name, "sat")
        veths += [
            Veth(dev, "satellite", f"100.96.{i}.2/30", sat, "lan", f"100.96.{i}.1/30"),
            Veth(
                sat,
                "wan",
                f"192.0.2.{4 * i + 2}/30",
                inet,
                f"g{i}",
                f"192.0.2.{4 * i + 1}/30",
                PROXY_PUBLIC if satellite_public else PROXY_GROUND,
            ),
        ]
        # Only the ground network: the public internet is unreachable over satellite.
        router_routes[sat] = [f"route add {GROUND_NET} via 192.0.2.{4 * i + 1}"]
        if satellite_public:
            router_routes[sat].append(f"route add {PROXY_PUBLIC}/32 via 192.0.2.{4 * i + 1}")
            internet_nft.append(
                f'insert rule ip {TABLE} input iifname "g{i}" ip daddr {PROXY_PUBLIC} accept'
            )
        inet_ifs.append(f"g{i}")
        plans["satellite"] = UplinkPlan(
            "satellite", f"100.96.{i}.2", f"100.96.{i}.1", sat,
            f"100.96.{i}.1", sat, f"192.0.2.{4 * i + 2}",
            PROXY_PUBLIC if satellite_public else PROXY_GROUND, (sat,),
        )  # fmt: skip

    for u in uplinks:
        for r in plans[u].namespaces:
            routers.append(
                NsPlan(
                    name=r,
                    role=r.rsplit("-", 1)[1],
                    sysctls=SYSCTL_ROUTER,
                    ip_batch=tuple(["link set lo up", *_ip_lines_for(r, veths), *router_routes[r]]),
                    nft=router_nft(),
                )
            )
    dev_lines = ["link set lo up", *_ip_lines_for(dev, veths)]
    dev_lines.append(f"route add default via {plans[active].gateway} dev {active}")
    device = NsPlan(
        name=dev,
        role="device",
        sysctls=SYSCTL_COMMON + (("net.ipv4.ip_forward", "0"),),
        ip_batch=tuple(dev_lines),
        nft=device_nft(uplinks),
    )
    return DevicePlan(
        name=name,
        index=i,
        ns=dev,
        active=active,
        uplinks=plans,
        namespaces=(device, *routers),
        veths=tuple(veths),
        internet_ip_batch=tuple(_ip_lines_for(inet, veths)),
        internet_nft="".join(line + "\n" for line in internet_nft),
    )


def host_batch(namespaces, veths) -> list[str]:
    """Lines for `ip -batch -` in the host namespace: create namespaces, then veths.

    The executor splits this in two (namespaces, then sysctls, then veths) so the sysctls
    apply to the new links.
    """
    return [f"netns add {n}" for n in namespaces] + [v.host_batch_line() for v in veths]


def all_addresses(plan: DevicePlan) -> list[str]:
    out = []
    for v in plan.veths:
        out += [v.a_addr, v.b_addr]
    return out


# --------------------------------------------------------------------------- runtime knobs


def switch_lines(uplink: str, gateway: str) -> list[str]:
    """`ip -batch` lines that bring an uplink up and point the default route at it."""
    return [f"link set {uplink} up", f"route replace default via {gateway} dev {uplink}"]


def knobs_nft(loss_up: float = 0, loss_down: float = 0, block_udp: bool = False) -> str:
    """Rewrite the first-hop router's knob chains: random loss per direction and UDP blocking.

    ``numgen random mod 100 < N`` drops N % of packets; "up" is device -> network (prerouting
    on ``lan``), "down" is network -> device (postrouting on ``lan``).
    """
    for v in (loss_up, loss_down):
        if not 0 <= v <= 100:
            raise ValueError("loss must be 0..100 percent")
    lines = [f"flush chain ip {TABLE} knobs_pre", f"flush chain ip {TABLE} knobs_post"]
    if block_udp:
        lines.append(f"add rule ip {TABLE} knobs_pre meta l4proto udp drop")
    if loss_up:
        lines.append(f"add rule ip {TABLE} knobs_pre numgen random mod 100 < {round(loss_up)} drop")
    if loss_down:
        lines.append(
            f"add rule ip {TABLE} knobs_post numgen random mod 100 < {round(loss_down)} drop"
        )
    return "\n".join(lines) + "\n"


def masq_nft(generation: int) -> str:
    """Masquerade rules for NAT generation N: 0 preserves ports, N>0 alternates port ranges.

    Alternating between two disjoint ranges guarantees that a rebinding yields a new port.
    """
    lines = [f"flush chain ip {TABLE} masq"]
    if generation > 0:
        lo, hi = REBIND_RANGES[(generation - 1) % 2]
        lines.append(
            f'add rule ip {TABLE} masq oifname "wan" meta l4proto {{ tcp, udp }} '
            f"masquerade to :{lo}-{hi} random"
        )
    lines.append(f'add rule ip {TABLE} masq oifname "wan" masquerade')
    return "\n".join(lines) + "\n"


RELAY_BASE_PORT = 47000


def relay_port_map(ports) -> dict[int, int]:
    """Proxy port -> local relay port on the first-hop router."""
    return {p: RELAY_BASE_PORT + k for k, p in enumerate(sorted(set(ports)))}


def delay_nft(proxy_addr: str, lan_addr: str, port_map: dict[int, int] | None) -> str:
    """DNAT the device's UDP to the proxy into the local delay relay (empty map = no delay).

    conntrack reverses the DNAT on replies, so the device still sees the proxy's address.
    """
    lines = [f"flush chain ip {TABLE} delay"]
    for port, local in sorted((port_map or {}).items()):
        lines.append(
            f"add rule ip {TABLE} delay ip daddr {proxy_addr} udp dport {port} "
            f"dnat to {lan_addr}:{local}"
        )
    return "\n".join(lines) + "\n"


def tbf_args(ifname: str, kbit: int | None) -> list[str]:
    """`tc` arguments for a token bucket limit on an interface's egress (None = remove).

    Bucket ~50 ms of traffic (at least 2 MTUs) and a 200 ms queue: enough to shape smoothly
    without hiding the limit behind a huge burst.
    """
    if not kbit:
        return ["qdisc", "del", "dev", ifname, "root"]
    burst = max(3200, kbit * 1000 // 8 // 20)
    return [
        "qdisc", "replace", "dev", ifname, "root", "tbf",
        "rate", f"{int(kbit)}kbit", "burst", str(burst), "latency", "200ms",
    ]  # fmt: skip


def parse_counters(nft_json: str) -> dict[str, dict[str, int]]:
    """`nft -j list counters` output -> {counter name: {"packets", "bytes"}}."""
    out = {}
    for item in json.loads(nft_json).get("nftables", []):
        c = item.get("counter")
        if c:
            out[c["name"]] = {"packets": int(c["packets"]), "bytes": int(c["bytes"])}
    return out


def uplink_counters(parsed: dict, uplink: str) -> dict[str, int]:
    tx = parsed.get(f"{uplink}_tx", {"packets": 0, "bytes": 0})
    rx = parsed.get(f"{uplink}_rx", {"packets": 0, "bytes": 0})
    return {
        "tx_bytes": tx["bytes"],
        "rx_bytes": rx["bytes"],
        "tx_packets": tx["packets"],
        "rx_packets": rx["packets"],
    }


def sshd_config(
    *, port: int, host_keys, pid_file: str, authorized_keys: str, extra: str = ""
) -> str:
    """A self-contained sshd config: loopback only, keys only, no PAM, no system files.

    sshd keeps the *first* value of a keyword, so ``extra`` goes before the defaults (letting a
    test override them); a ``Match`` block in ``extra`` is moved to the end, where it must be.
    """
    lines = extra.splitlines()
    cut = next(
        (k for k, ln in enumerate(lines) if ln.strip().lower().startswith("match ")), len(lines)
    )
    head = "".join(ln + "\n" for ln in lines[:cut])
    tail = "".join(ln + "\n" for ln in lines[cut:])
    keys = "".join(f"HostKey {k}\n" for k in host_keys)
    return (
        head + f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"{keys}"
        f"PidFile {pid_file}\n"
        f"AuthorizedKeysFile {authorized_keys}\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PrintMotd no\n"
        "UseDNS no\n"
        "Subsystem sftp internal-sftp\n" + tail
    )
