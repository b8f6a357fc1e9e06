#!/usr/bin/env python3
"""Does uvloop pay? Proxy, agent and ``tunnel forward`` CPU-ms per MB, asyncio vs uvloop, one run.

Usage (uvloop need not be in the venv; install it aside)::

    .venv/bin/pip install --target /tmp/uv uvloop
    .venv/bin/python bench/loopcompare.py --uvloop-path /tmp/uv [--rounds 2]

Each round starts the throughput rig (``bench/rig.py``: proxy, agent, forward, bulk service)
twice, once per event loop, in alternating order, and moves 2 x 16 MB each way. The processes
get uvloop through a ``sitecustomize`` in a temporary directory on ``PYTHONPATH`` that sets
uvloop's event loop policy when ``BENCH_UVLOOP=1`` (fleet-tunnel itself is unchanged, so the
only difference between the two is the loop). Prints each measurement and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds, paths  # noqa: E402

paths()

MB = 1_000_000
SITE = """import os
if os.environ.get("BENCH_UVLOOP") == "1":
    import asyncio
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
"""


def measure(loop: str) -> dict:
    from rig import Services, TunnelRig, transfer

    os.environ["BENCH_UVLOOP"] = "1" if loop == "uvloop" else "0"
    with Services() as svc, TunnelRig({"bulk": f"127.0.0.1:{svc.bulk_port}"}) as ft:
        fport, fwd = ft.forward("bulk")
        transfer(fport, "down", MB)
        uses = "uvloop" in Path(f"/proc/{ft.agent.pid}/maps").read_text()
        if uses != (loop == "uvloop"):
            raise RuntimeError(f"the agent {'runs' if uses else 'does not run'} uvloop in the {loop} round")
        out = {}
        for direction in ("down", "up"):
            pids = {"proxy": ft.proxy.pid, "agent": ft.agent.pid, "forward": fwd.pid}
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            n = 16 * MB
            secs = [transfer(fport, direction, n) for _ in range(2)]
            after = {k: cpu_seconds(p) for k, p in pids.items()}
            out[direction] = {k: (after[k] - before[k]) * 1000 / (2 * n / MB) for k in pids}
            out[direction]["MB/s"] = n / MB / statistics.median(secs)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--uvloop-path", required=True, help="directory where uvloop is importable")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as site:
        Path(site, "sitecustomize.py").write_text(SITE)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [site, args.uvloop_path, *filter(None, [os.environ.get("PYTHONPATH")])])
        results: dict[str, list[dict]] = {"asyncio": [], "uvloop": []}
        for r in range(args.rounds):
            for loop in ("asyncio", "uvloop") if r % 2 == 0 else ("uvloop", "asyncio"):
                m = measure(loop)
                results[loop].append(m)
                print(loop, json.dumps(m), flush=True)
    print("medians (CPU-ms/MB; MB/s):")
    for loop, ms in results.items():
        for d in ("down", "up"):
            med = {k: round(statistics.median(m[d][k] for m in ms), 1)
                   for k in ("proxy", "agent", "forward", "MB/s")}
            print(f"  {loop:8s} {d:5s} {med}  sum {med['proxy'] + med['agent'] + med['forward']:.1f}")


if __name__ == "__main__":
    main()
