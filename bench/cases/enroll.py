"""Enrollment: CSRs signed per second by the CA step (``enroll.enrollment.enroll``), one core.

A fresh fleet state, one multi-use join token, and N enrollment requests made beforehand (the
device side: its key, CSR and SSH host key are not part of the CA's cost). Then N sequential
``enroll()`` calls in this process, pinned to one CPU: token check and use, device certificate,
SSH host certificate, registry rows and two audit events, one ``synchronous=FULL`` transaction
each, as ``enroll sign`` and the proxy's enrollment endpoint run it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import case_main, paths  # noqa: E402

paths()


def requests(n: int) -> list[dict]:
    from cryptography.hazmat.primitives.serialization import Encoding

    from enroll import certs
    from enroll.request import make_request

    out = []
    for _ in range(n):
        csr = certs.make_csr(certs.new_key()).public_bytes(Encoding.PEM)
        host = certs.ssh_public_line(certs.new_ssh_ca_key())
        out.append(make_request(csr, host, None))
    return out


def run(quick: bool = False) -> list[dict]:
    from enroll import tokens
    from enroll.enrollment import enroll
    from enroll.state import FleetState

    n = 100 if quick else 1000
    tmp = Path(tempfile.mkdtemp(prefix="bench-enroll-"))
    old_affinity = os.sched_getaffinity(0)
    try:
        state = FleetState.create(tmp / "state", fleet="bench-fleet", proxy_name="proxy.test",
                                  proxy_ips=["127.0.0.1"])
        with state.registry() as reg:
            token, _ = tokens.create(reg, state.fleet, labels={"customer": "bench"}, uses=n + 10,
                                     name_prefix="bench-")
        reqs = requests(n + 10)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {min(old_affinity)})
        with state.registry() as reg:
            for r in reqs[:10]:  # warm-up
                enroll(state, reg, r, token)
            t0 = time.perf_counter()
            c0 = time.process_time()
            for r in reqs[10:]:
                enroll(state, reg, r, token)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0
            enrolled = len(reg.devices())
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, old_affinity)
        shutil.rmtree(tmp, ignore_errors=True)
    assert enrolled == n + 10, enrolled
    return [
        {"metric": "enrollment CSRs signed per second (CA step, one core)", "value": round(n / wall, 1),
         "unit": "CSRs/s", "target": ">= 200/s",
         "note": f"{n} sequential enroll() calls, {wall:.2f} s wall, {cpu * 1000 / n:.2f} CPU-ms each"},
        {"metric": "enrollment CA step, wall time per CSR", "value": round(wall * 1000 / n, 2),
         "unit": "ms", "target": "-"},
    ]


if __name__ == "__main__":
    case_main("enroll", run)
