"""A path-MTU black hole on one uplink of a lab device (for tests/test_pmtu_lab.py).

The classic one: a router whose links carry less than the 1,500 bytes everyone assumes (a
tunnel, PPPoE, a carrier's GTP) and a firewall that drops the ICMP "fragmentation needed"
it sends back. The first-hop router's ``lan`` and ``wan`` links get a smaller MTU, so every
datagram over ``mtu`` IP bytes is dropped in both directions: a plain one where it enters
the router (the veth refuses a frame over its MTU), the segments of a GSO batch at the
forwarding MTU check (QUIC sets DF), whose ICMP error is dropped on the way out. Nobody is
told.

Why not ``meta length > N drop`` in nftables: a GSO send crosses the veth pairs as one
super-packet (up to 64 KB) and would be dropped whole whatever its segment size; the MTU
check looks at each segment, as a real link would.
"""

from __future__ import annotations

import socket
import struct

from . import netns

#: this helper's own nftables table in the router namespace (the lab's is ``ftlab``)
TABLE = "ftpmtu"
#: a path that carries exactly the 1,200-byte datagrams every QUIC path must (20 IP + 8 UDP)
SMALL_MTU = 1228
NORMAL_MTU = 1500


def black_hole(dev, uplink: str, mtu: int = SMALL_MTU) -> None:
    """Drop, silently, every datagram over ``mtu`` IP bytes on ``uplink``'s first-hop router."""
    ns = dev.plan.uplinks[uplink].first_hop_ns
    netns.nft(ns, f"""table ip {TABLE} {{
    chain output {{
        type filter hook output priority 0; policy accept;
        icmp type destination-unreachable icmp code frag-needed counter drop
    }}
}}
""")
    netns.ip_batch(ns, [f"link set lan mtu {mtu}", f"link set wan mtu {mtu}"])


def clear_black_hole(dev, uplink: str) -> None:
    ns = dev.plan.uplinks[uplink].first_hop_ns
    netns.ip_batch(ns, [f"link set lan mtu {NORMAL_MTU}", f"link set wan mtu {NORMAL_MTU}"])
    netns.nft(ns, f"delete table ip {TABLE}\n")


def carries(dev, uplink: str, size: int, timeout: float = 1.0) -> bool:
    """Whether a ``size``-byte UDP datagram with DF set gets from the device over ``uplink``
    to the internet namespace (the proxy's public address)."""
    lab = dev.lab
    rx = lab.socket(lab.internet)
    rx.bind((lab.proxy_public, 0))
    rx.settimeout(timeout)
    tx = dev.socket()
    tx.setsockopt(socket.IPPROTO_IP, 10, 3)  # IP_MTU_DISCOVER = IP_PMTUDISC_PROBE: DF, no frags
    tx.sendto(struct.pack("!I", size) * (size // 4), rx.getsockname())
    try:
        return len(rx.recv(65536)) == size
    except TimeoutError:
        return False
    finally:
        rx.close()
        tx.close()
