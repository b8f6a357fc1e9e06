"""Self-tests of the network lab (tests/lab/), with plain sockets.

The ``lab``-marked tests build real namespaces (root); the rest test the pure planner and run
anywhere.  Numbers printed with ``-s`` (build time, delay accuracy) are what the lab delivers
on the CI machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lab import Lab, netns, plan
from lab.echo import TcpEcho, UdpEcho, drain, udp_ping

PORT = 443
ALL = plan.UPLINKS


# =========================================================================== pure planning


@given(
    st.integers(1, plan.MAX_DEVICES),
    st.lists(st.sampled_from(ALL), min_size=1, max_size=3, unique=True),
)
def test_plan_addresses_names_and_interfaces(index, uplinks):
    p = plan.device_plan("beef", "dev", index, uplinks)
    addrs = plan.all_addresses(p)
    for a in addrs:  # only documentation / benchmark / CGNAT ranges
        ip = ipaddress.ip_interface(a).ip
        assert any(ip in n for n in plan.ALLOWED_NETS), a
    assert len(set(addrs)) == len(addrs)
    per_ns: dict = {}
    for v in p.veths:
        for ns, ifname, _ in v.ends():
            assert len(ifname) <= plan.IFNAMSIZ
            assert ifname not in per_ns.setdefault(ns, set()), (ns, ifname)
            per_ns[ns].add(ifname)
    assert all(n.name.startswith("ftlab-beef-") for n in p.namespaces)
    assert p.active == uplinks[0]
    assert set(p.uplinks) == set(uplinks)
    assert p.namespaces[0].ip_batch[-1].startswith("route add default via ")


def test_plan_devices_do_not_overlap():
    a = plan.device_plan("beef", "a", 1)
    b = plan.device_plan("beef", "b", 2)
    nets_a = {ipaddress.ip_interface(x).network for x in plan.all_addresses(a)}
    nets_b = {ipaddress.ip_interface(x).network for x in plan.all_addresses(b)}
    assert not any(x.overlaps(y) for x in nets_a for y in nets_b)
    assert not set(n.name for n in a.namespaces) & set(n.name for n in b.namespaces)


def test_plan_uplink_facts():
    p = plan.device_plan("beef", "d", 3)
    sat = p.uplinks["satellite"]
    assert sat.proxy_addr == plan.PROXY_GROUND
    assert ipaddress.ip_address(sat.public_addr) in ipaddress.ip_network(plan.GROUND_NET)
    cell = p.uplinks["cellular"]
    assert cell.first_hop_ns.endswith("-carrier") and cell.nat_ns.endswith("-cgnat")
    assert cell.public_addr == "198.19.3.2"
    # the satellite router only routes the ground network
    sat_ns = next(n for n in p.namespaces if n.name == sat.nat_ns)
    assert [ln for ln in sat_ns.ip_batch if ln.startswith("route")] == [
        f"route add {plan.GROUND_NET} via 192.0.2.13"
    ]
    # the internet end of each link prefers the proxy's address as source
    inet_routes = [ln for ln in p.internet_ip_batch if ln.startswith("route")]
    assert "route add 192.0.2.12/30 dev g3 src 192.0.2.1" in inet_routes
    assert "route add 198.18.3.0/30 dev w3 src 198.18.0.1" in inet_routes


@pytest.mark.parametrize(
    "bad",
    [dict(name="Dev"), dict(name="a-b"), dict(index=0), dict(index=64), dict(uplinks=("lte",)),
     dict(uplinks=()), dict(uplinks=("wifi", "wifi")), dict(active="satellite", uplinks=("wifi",))],
)  # fmt: skip
def test_plan_rejects_bad_input(bad):
    kw = dict(run_id="beef", name="dev", index=1, uplinks=ALL) | bad
    with pytest.raises(ValueError):
        plan.device_plan(**kw)


def test_host_batch_creates_veths_inside_namespaces():
    p = plan.device_plan("beef", "d", 1, ("wifi",))
    lines = plan.host_batch([n.name for n in p.namespaces], p.veths)
    assert lines[0] == "netns add ftlab-beef-d"
    assert (
        "link add wifi netns ftlab-beef-d type veth peer name lan netns ftlab-beef-d-home" in lines
    )


def test_knobs_and_masq_rules():
    assert plan.knobs_nft() == "flush chain ip ftlab knobs_pre\nflush chain ip ftlab knobs_post\n"
    s = plan.knobs_nft(loss_up=10, loss_down=0, block_udp=True)
    assert "knobs_pre meta l4proto udp drop" in s
    assert "knobs_pre numgen random mod 100 < 10 drop" in s
    assert "knobs_post numgen" not in s
    with pytest.raises(ValueError):
        plan.knobs_nft(loss_up=101)
    assert "to :" not in plan.masq_nft(0)
    r1, r2, r3 = (plan.masq_nft(g) for g in (1, 2, 3))
    assert "to :10000-19999" in r1 and "to :20000-29999" in r2 and r1 == r3


def test_delay_and_rate_rules():
    m = plan.relay_port_map([443, 4433, 443])
    assert m == {443: 47000, 4433: 47001}
    s = plan.delay_nft("192.0.2.1", "100.96.1.1", m)
    assert "ip daddr 192.0.2.1 udp dport 443 dnat to 100.96.1.1:47000" in s
    assert plan.delay_nft("192.0.2.1", "100.96.1.1", None) == "flush chain ip ftlab delay\n"
    assert plan.tbf_args("lan", None) == ["qdisc", "del", "dev", "lan", "root"]
    assert plan.tbf_args("lan", 1000)[5:8] == ["tbf", "rate", "1000kbit"]


def test_parse_counters():
    js = (
        '{"nftables": [{"metainfo": {}}, {"counter": {"family": "ip", "name": "wifi_tx", '
        '"table": "ftlab", "handle": 1, "packets": 3, "bytes": 300}}]}'
    )
    parsed = plan.parse_counters(js)
    assert plan.uplink_counters(parsed, "wifi") == {
        "tx_bytes": 300, "rx_bytes": 0, "tx_packets": 3, "rx_packets": 0,
    }  # fmt: skip


def test_stale_run_ids_and_markers():
    alive = {(10, 1)}
    names = ["ftlab-aaaa-inet", "ftlab-bbbb-inet", "ftlab-cccc-d1", "other-ns", "ftlab-zz-x"]
    markers = {"aaaa": (10, 1), "bbbb": (11, 1), "dddd": None}
    stale = plan.stale_run_ids(names, markers, lambda pid, st: (pid, st) in alive)
    assert stale == {"bbbb", "cccc", "dddd"}
    assert plan.parse_marker(plan.format_marker(42, 7)) == (42, 7)
    assert plan.parse_marker("garbage") is None
    assert plan.run_id_of("ftlab-abcd-dev1-home") == "abcd"
    assert plan.run_id_of("ftlabx-abcd") is None


def test_sshd_config_extra_comes_first_and_match_last():
    cfg = plan.sshd_config(
        port=2222, host_keys=["/k"], pid_file="/p", authorized_keys="/a",
        extra="LogLevel DEBUG\nMatch User nobody\n  ForceCommand true",
    )  # fmt: skip
    lines = cfg.splitlines()
    assert lines[0] == "LogLevel DEBUG"
    assert lines[-2:] == ["Match User nobody", "  ForceCommand true"]
    assert "UsePAM no" in lines and "Port 2222" in lines


# =========================================================================== real lab


def ns_list() -> list[str]:
    return netns.list_namespaces()


@pytest.fixture
def echo(lab):
    """UDP echo 'proxy' on all addresses of the internet namespace, port 443."""
    srv = UdpEcho(lab.socket(lab.internet), ("0.0.0.0", PORT))
    yield srv
    srv.close()


@pytest.fixture
def dev(lab):
    t0 = time.monotonic()
    d = lab.add_device("dev1")
    build = time.monotonic() - t0
    print(f"\nbuilt device with 3 uplinks in {build * 1000:.0f} ms")
    assert build < 2.0
    return d


def bound_socket(d, port=0):
    s = d.socket()
    s.bind(("0.0.0.0", port))
    return s


@pytest.mark.lab
def test_reach_proxy_over_each_uplink(lab, dev, echo):
    s = bound_socket(dev)
    for u in ALL:
        dev.use(u)
        assert dev.active_uplink == u
        assert udp_ping(s, (dev.proxy_address(u), PORT)) is not None, u
    # satellite reaches the ground address only, never the public one
    assert dev.proxy_address("satellite") == lab.proxy_ground
    assert udp_ping(s, (lab.proxy_public, PORT), timeout=0.3) is None
    # and the internet uplinks cannot reach the ground network
    dev.use("wifi")
    assert udp_ping(s, (lab.proxy_ground, PORT), timeout=0.3) is None
    assert udp_ping(s, (lab.proxy_public, PORT)) is not None


@pytest.mark.lab
def test_proxy_sees_nat_address_only(lab, dev, echo):
    s = bound_socket(dev)
    expected = {"wifi": "198.18.1.2", "cellular": "198.19.1.2", "satellite": "192.0.2.6"}
    for u in ALL:
        dev.use(u)
        echo.seen.clear()
        assert udp_ping(s, (dev.proxy_address(u), PORT)) is not None
        assert {a for a, _ in echo.seen} == {dev.public_address(u)} == {expected[u]}
    private = {dev.address(u) for u in ALL}
    carrier_outer = "100.64.1.2"  # NAT #1's outside address: hidden behind the CGNAT
    dev.use("cellular")
    echo.seen.clear()
    udp_ping(s, (lab.proxy_public, PORT))
    assert not {a for a, _ in echo.seen} & (private | {carrier_outer})


@pytest.mark.lab
def test_inbound_to_device_is_impossible(lab, dev):
    udp_srv = UdpEcho(dev.socket(), ("0.0.0.0", 7000))
    tcp_srv = TcpEcho(dev.socket(type=socket.SOCK_STREAM), ("0.0.0.0", 7001))
    try:
        targets = [dev.address(u) for u in ALL] + [dev.public_address(u) for u in ALL]
        # an attacker's ISP that even routes the private addresses towards the NATs
        lab.run(lab.internet, ["ip", "route", "add", "203.0.113.6/32", "via", "198.18.1.2"])
        lab.run(lab.internet, ["ip", "route", "add", "198.51.100.6/32", "via", "198.19.1.2"])
        for target in targets:
            u = lab.socket(lab.internet)
            with contextlib.suppress(OSError):  # "network unreachable" is a fine outcome too
                u.sendto(b"hello", (target, 7000))
            t = lab.socket(lab.internet, type=socket.SOCK_STREAM)
            t.settimeout(0.3)
            with pytest.raises(OSError):
                t.connect((target, 7001))
        time.sleep(0.2)
        assert udp_srv.seen == [] and tcp_srv.seen == []
    finally:
        udp_srv.close()
        tcp_srv.close()


@pytest.mark.lab
def test_switch_changes_address_make_and_break(lab, dev, echo):
    s = bound_socket(dev)
    target = (lab.proxy_public, PORT)
    assert udp_ping(s, target) is not None
    assert echo.seen[-1][0] == dev.public_address("wifi")

    dev.use("cellular")  # make-before-break
    assert not dev.is_up("wifi") and dev.is_up("cellular")
    assert udp_ping(s, target) is not None
    assert echo.seen[-1][0] == dev.public_address("cellular")

    t0 = time.monotonic()
    worker = dev.use("wifi", break_first=True, outage=0.6, block=False)
    time.sleep(0.2)
    assert dev.active_uplink is None
    assert udp_ping(s, target, timeout=0.2) is None  # nothing gets through in the gap
    worker.join(5)
    assert time.monotonic() - t0 >= 0.6
    assert dev.active_uplink == "wifi" and not dev.is_up("cellular")
    drain(s, 0.1)
    assert udp_ping(s, target) is not None
    assert echo.seen[-1][0] == dev.public_address("wifi")

    dev.down("wifi")
    assert udp_ping(s, target, timeout=0.2) is None
    dev.up("wifi")
    assert udp_ping(s, target) is not None

    t0 = time.monotonic()
    dev.outage(0.3)
    assert time.monotonic() - t0 >= 0.3 and dev.active_uplink == "wifi"
    assert udp_ping(s, target) is not None


@pytest.mark.lab
@pytest.mark.parametrize("uplink", ALL)
def test_nat_rebinding_changes_port(lab, dev, echo, uplink):
    dev.use(uplink)
    s = bound_socket(dev, 40000)
    target = (dev.proxy_address(uplink), PORT)
    ports = []
    for _ in range(3):
        echo.seen.clear()
        assert udp_ping(s, target) is not None
        ports.append(echo.seen[-1])
        lab.rebind_nat(dev, uplink)
    assert len({p for _, p in ports}) == 3, ports  # a new external port each time
    assert {a for a, _ in ports} == {dev.public_address(uplink)}  # same address


@pytest.mark.lab
def test_counters_count_bytes(lab, dev, echo):
    s = bound_socket(dev)
    before = {u: dev.counters(u) for u in ALL}
    payload, n = b"x" * 1000, 20
    for _ in range(n):
        s.sendto(payload, (lab.proxy_public, PORT))
    got = drain(s)
    after = {u: dev.counters(u) for u in ALL}
    w0, w1 = before["wifi"], after["wifi"]
    assert w1["tx_bytes"] - w0["tx_bytes"] >= n * len(payload)
    assert w1["tx_packets"] - w0["tx_packets"] >= n
    assert w1["rx_bytes"] - w0["rx_bytes"] >= len(got) * len(payload)
    assert len(got) == n
    for u in ("cellular", "satellite"):  # idle uplinks stay (almost) idle
        assert after[u]["tx_bytes"] - before[u]["tx_bytes"] < 1000


@pytest.mark.lab
def test_loss(lab, dev, echo):
    s = bound_socket(dev)
    dev.set_loss("wifi", 50)
    n = 200
    for k in range(n):
        s.sendto(b"%d" % k, (lab.proxy_public, PORT))
        time.sleep(0.001)
    back = len(drain(s))
    print(f"\nloss 50% both ways: server got {len(echo.seen)}/{n}, client got {back}/{n}")
    assert 0.3 * n < len(echo.seen) < 0.7 * n
    assert 0.1 * n < back < 0.45 * n
    dev.set_loss("wifi", 0)
    echo.seen.clear()
    for k in range(50):
        s.sendto(b"%d" % k, (lab.proxy_public, PORT))
    assert len(drain(s)) == 50


@pytest.mark.lab
def test_rate_limit(lab, dev, echo):
    s = bound_socket(dev)
    kbit = 2000
    dev.set_rate("wifi", kbit)
    payload = b"r" * 1000
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:  # offer ~8 Mbit/s for one second
        s.sendto(payload, (lab.proxy_public, PORT))
        time.sleep(0.001)
    elapsed = time.monotonic() - t0
    time.sleep(0.4)  # let the bucket's 200 ms queue drain
    # what may arrive: the rate over the send window, plus the queue and the bucket
    burst = int(plan.tbf_args("x", kbit)[9])
    ceiling = kbit * 1000 / 8 * (elapsed + 0.2) + burst
    got_kbit = echo.received_bytes * 8 / 1000 / (elapsed + 0.2)
    print(f"\nrate limit {kbit} kbit/s: measured {got_kbit:.0f} kbit/s of UDP payload")
    assert 0.7 * kbit * 1000 / 8 * elapsed < echo.received_bytes < ceiling * 1.05
    dev.set_rate("wifi", None)
    echo.received_bytes = 0
    drain(s, 0.2)
    for _ in range(100):
        s.sendto(payload, (lab.proxy_public, PORT))
        time.sleep(0.0005)
    time.sleep(0.2)
    assert echo.received_bytes == 100 * len(payload)


@pytest.mark.lab
@pytest.mark.parametrize("uplink,rtt_ms", [("satellite", 600), ("cellular", 200)])
def test_delay(lab, dev, echo, uplink, rtt_ms):
    dev.use(uplink)
    s = bound_socket(dev)
    target = (dev.proxy_address(uplink), PORT)
    base = udp_ping(s, target)
    assert base is not None and base < 0.05
    dev.set_delay(uplink, rtt_ms)
    rtts = [udp_ping(s, target, payload=b"d%d" % k, timeout=3) for k in range(3)]
    assert None not in rtts
    print(f"\n{uplink} delay {rtt_ms} ms: measured RTTs {[round(r * 1000) for r in rtts]} ms")
    assert all(rtt_ms / 1000 <= r < rtt_ms / 1000 + 0.15 for r in rtts)
    assert echo.seen[-1][0] == dev.public_address(uplink)  # still the NAT's address
    dev.set_delay(uplink, rtt_ms / 2)  # live change, same flow
    r = udp_ping(s, target, timeout=3)
    # a wider margin here: the first packet after a live change may still be in the relay's queue
    assert r is not None and rtt_ms / 2000 <= r < rtt_ms / 2000 + 0.3
    dev.set_delay(uplink, 0)
    r = udp_ping(s, target)
    assert r is not None and r < 0.05


@pytest.mark.lab
def test_block_udp_keeps_tcp(lab, dev, echo):
    tcp = TcpEcho(lab.socket(lab.internet, type=socket.SOCK_STREAM), ("0.0.0.0", PORT))
    try:
        s = bound_socket(dev)
        assert udp_ping(s, (lab.proxy_public, PORT)) is not None
        dev.block_udp("wifi", True)
        assert udp_ping(s, (lab.proxy_public, PORT), timeout=0.3) is None
        c = dev.socket(type=socket.SOCK_STREAM)
        c.settimeout(2)
        c.connect((lab.proxy_public, PORT))
        c.sendall(b"tcp works")
        assert c.recv(100) == b"tcp works"
        c.close()
        dev.block_udp("wifi", False)
        assert udp_ping(s, (lab.proxy_public, PORT)) is not None
    finally:
        tcp.close()


@pytest.mark.lab
def test_real_sshd_login(lab, dev):
    t0 = time.monotonic()
    srv = dev.start_sshd()
    r = dev.run(srv.ssh_argv("echo", "ok"), check=False, timeout=20)
    print(f"\nsshd start + login took {(time.monotonic() - t0) * 1000:.0f} ms")
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.stderr, srv.log())
    assert srv.config_path.is_file() and all(k.is_file() for k in srv.host_keys)
    # an unauthorized key is refused: the server really checks our AuthorizedKeysFile
    other = lab.tmpdir / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other], check=True)
    argv = srv.ssh_argv("true")
    argv[argv.index(str(srv.client_key))] = str(other)
    assert dev.run(argv, check=False, timeout=20).returncode != 0
    srv.stop()
    assert srv.process.poll() is not None


@pytest.mark.lab
def test_teardown_leaves_nothing(lab_env):
    lab = Lab()
    d = lab.add_device("dev1")
    rid = lab.run_id
    sleeper = d.spawn(["sleep", "300"])
    # a process started behind the lab's back is found through `ip netns pids`
    lab.run(d.ns, ["sh", "-c", "setsid sleep 301 >/dev/null 2>&1 < /dev/null &"])
    hidden = netns.ns_pids(d.ns)
    assert sleeper.pid in hidden and len(hidden) == 2
    sock = d.socket()
    lab.close()
    assert not [n for n in ns_list() if plan.run_id_of(n) == rid]
    assert sleeper.poll() is not None
    assert all(netns.proc_start_time(p) is None for p in hidden)
    assert sock.fileno() == -1
    assert not os.path.exists(plan.marker_path(rid))
    lab.close()  # idempotent


@pytest.mark.lab
def test_sweep_removes_only_dead_owners(lab_env):
    dead = subprocess.Popen(["true"])
    dead.wait()
    rids = []
    for owner in (dead.pid, os.getpid()):
        rid = netns.new_run_id()  # writes a marker owned by us ...
        rids.append(rid)
        with open(plan.marker_path(rid), "w") as f:  # ... which we point at the owner
            f.write(plan.format_marker(owner, netns.proc_start_time(os.getpid())))
        subprocess.run(["ip", "netns", "add", plan.ns_name(rid, "x")], check=True)
    dead_rid, live_rid = rids
    try:
        netns.sweep_stale()
        names = ns_list()
        assert plan.ns_name(dead_rid, "x") not in names
        assert not os.path.exists(plan.marker_path(dead_rid))
        assert plan.ns_name(live_rid, "x") in names
    finally:
        netns.delete_namespaces(
            [plan.ns_name(r, "x") for r in rids if plan.ns_name(r, "x") in ns_list()]
        )
        for r in rids:
            netns.remove_marker(r)
