"""Idle cost: bytes on the wire per device per hour (and month) at several keepalive intervals.

In the network lab (tests/lab, root): the proxy in the ``internet`` namespace on UDP 443, one
device namespace per keepalive setting (25 s = the default, 30 s, 60 s, 120 s), each behind its
home-router NAT on a ``wifi`` uplink, all running at the same time. After the agent connected
and its hello went through, the device's nftables counters on the uplink (IP bytes, both
directions) are read over a window of exactly ``n`` keepalive periods, so the window holds ``n``
keepalive exchanges (plus whatever else the agent and proxy send, e.g. reconnects when the
proxy's idle timeout is shorter than the keepalive). Extrapolated: bytes/hour, MB per 30-day
month. ``--quick`` uses one to four periods per setting (about 2 minutes) instead of ~6 minutes.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import case_main, paths  # noqa: E402

paths()

KEEPALIVES = (25, 30, 60, 120)  # seconds; 25 s is the agent's default
SETTLE = 3.0  # after "connected": hello (and nothing else) done
MONTH_H = 24 * 30


def run(quick: bool = False) -> list[dict]:
    from fleet_harness import Fleet
    from lab import Lab

    tmp = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    lab = Lab()
    fleet = None
    results: dict[int, dict] = {}
    try:
        fleet = Fleet(tmp, proxy_host=lab.proxy_public, proxy_port=443)
        fleet.start_proxy(spawn=lambda argv, **kw: lab.spawn(lab.internet, argv, **kw),
                          listen="0.0.0.0:443")
        devs = {}
        for k in KEEPALIVES:
            dev = lab.add_device(f"idle{k}", uplinks=("wifi",))
            config = fleet.enroll_device(f"idle-{k}", {"customer": "bench"}, {}, keepalive=f"{k}s")
            fleet.start_agent(config, spawn=lambda argv, d=dev, **kw: d.spawn(argv, **kw))
            devs[k] = (dev, config.parent / "agent.log")

        def measure(k: int) -> None:
            dev, log = devs[k]
            deadline = time.monotonic() + 30
            while '"connected"' not in (log.read_text() if log.exists() else ""):
                if time.monotonic() > deadline:
                    results[k] = {"error": "agent did not connect within 30 s"}
                    return
                time.sleep(0.05)
            t_conn = time.monotonic()
            n = max(1, math.floor(100 / k)) if quick else max(2, round(360 / k))
            time.sleep(SETTLE)
            c0 = dev.counters("wifi")
            connects0 = log.read_text().count('"connected"')
            time.sleep(max(0.0, t_conn + SETTLE + n * k - time.monotonic()))
            c1 = dev.counters("wifi")
            window = n * k
            total = (c1["tx_bytes"] - c0["tx_bytes"]) + (c1["rx_bytes"] - c0["rx_bytes"])
            packets = (c1["tx_packets"] - c0["tx_packets"]) + (c1["rx_packets"] - c0["rx_packets"])
            results[k] = {"bytes": total, "packets": packets, "window": window, "periods": n,
                          "reconnects": log.read_text().count('"connected"') - connects0}

        threads = [threading.Thread(target=measure, args=(k,)) for k in KEEPALIVES]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        if fleet:
            fleet.close()
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for k in KEEPALIVES:
        r = results.get(k, {"error": "not measured"})
        name = f"idle traffic per device, keepalive {k} s" + (" (default)" if k == 25 else "")
        target = "<= 10 MB/month" if k == 30 else "-"
        if "error" in r:
            rows.append({"metric": name, "value": None, "unit": "MB/month", "target": target,
                         "note": r["error"]})
            continue
        per_hour = r["bytes"] / r["window"] * 3600
        note = (f"{r['bytes']} B / {r['packets']} packets in {r['window']} s ({r['periods']} keepalive "
                f"periods, {r['bytes'] / r['periods']:.0f} B per period); {per_hour / 1000:.1f} KB/hour")
        if r["reconnects"]:
            note += f"; {r['reconnects']} reconnect(s) in the window"
        rows.append({"metric": name, "value": round(per_hour * MONTH_H / 1e6, 2), "unit": "MB/month",
                     "target": target, "note": note, "bytes_per_hour": round(per_hour)})
    return rows


if __name__ == "__main__":
    case_main("idle", run)
