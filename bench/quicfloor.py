"""aioquic's own cost per MB, in memory: the floor under any QUIC relay built on it.

Two ``aioquic.quic.connection.QuicConnection`` objects (client and server) in this process, no
sockets, no event loop: datagrams go straight from one's ``datagrams_to_send`` into the other's
``receive_datagram``. The client sends ``nbytes`` on one stream; the server reads it (events)
and answers with ACKs and credit. The clock is the real one (as for the transport, pacing and
RTT follow real time); when both sides wait for a timer, this process sleeps until it instead
of spinning, so the CPU counted is only aioquic's work.

Why this is the floor: the proxy *receives* a session's bytes on one QUIC hop and *sends* them
on the other, so per MB it must at least pay one receiving side plus one sending side of this
exchange, i.e. the whole pair. An agent or ``tunnel forward`` pays one side. Everything a real
process spends above that is ours (event loop, sockets, splice, buffers), which is what the
throughput case reports as a ratio to this floor, measured in the same run on the same machine.

CPU is ``time.process_time()`` over the data phase (the handshake is excluded); the split per
side is wall time spent in each side's calls (this process runs nothing else meanwhile).
Flow-control windows and the sender's unacknowledged-bytes bound are the transport's defaults.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time

MB = 1_000_000


def _self_signed():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())  # the fleet's key type (enroll.certs.new_key)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "floor.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("floor.test")]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def transport_datagram_size() -> int:
    """The datagram size ``tunnel.transport.quic`` gives its connections (aioquic's default
    unless the transport sets one)."""
    from aioquic.quic.configuration import QuicConfiguration

    import tunnel.transport.quic as tq

    return int(getattr(tq, "MAX_DATAGRAM_SIZE", QuicConfiguration().max_datagram_size))


def _windows() -> tuple[int, int]:
    try:
        from tunnel.transport.policy import DEFAULT_SEND_HIGH_WATER, DEFAULT_STREAM_WINDOW
    except ImportError:  # the transport moved them: aioquic-like defaults of ours (1 MiB each)
        return 1 << 20, 1 << 20
    return DEFAULT_STREAM_WINDOW, DEFAULT_SEND_HIGH_WATER


def one_run(nbytes: int, datagram_size: int) -> dict:
    """Move ``nbytes`` client -> server in memory; CPU-ms per MB (pair, sender, receiver)."""
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    window, high_water = _windows()
    cert, key = _self_signed()
    common = dict(alpn_protocols=["floor"], max_datagram_size=datagram_size,
                  max_stream_data=window, max_data=window * 16, idle_timeout=600.0)
    ccfg = QuicConfiguration(is_client=True, server_name="floor.test", **common)
    ccfg.verify_mode = 0  # ssl.CERT_NONE: the floor is the data phase, not chain checks
    scfg = QuicConfiguration(is_client=False, certificate=cert, private_key=key, **common)
    caddr, saddr = ("10.0.0.1", 1000), ("10.0.0.2", 443)
    now = time.monotonic()
    client = QuicConnection(configuration=ccfg)
    client.connect(saddr, now=now)
    server = None
    received = 0
    t_send = t_recv = 0.0

    def drain(conn) -> int:
        got = 0
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, events.StreamDataReceived):
                got += len(ev.data)
        return got

    def exchange() -> bool:
        """One round both ways; True when any datagram moved."""
        nonlocal server, received, t_send, t_recv, now
        now = time.monotonic()
        t0 = time.perf_counter()
        out = client.datagrams_to_send(now=now)
        t1 = time.perf_counter()
        t_send += t1 - t0
        if out and server is None:
            server = QuicConnection(configuration=scfg, original_destination_connection_id=client.original_destination_connection_id)
        for data, _ in out:
            server.receive_datagram(data, caddr, now=now)
        received += drain(server) if server else 0
        back = server.datagrams_to_send(now=now) if server else []
        t2 = time.perf_counter()
        t_recv += t2 - t1
        for data, _ in back:
            client.receive_datagram(data, saddr, now=now)
        drain(client)
        t_send += time.perf_counter() - t2
        return bool(out or back)

    def advance() -> None:
        """Nothing moved: sleep until the earliest timer and fire what is due."""
        nonlocal now
        timers = [t for t in (client.get_timer(), server.get_timer() if server else None) if t is not None]
        wait = (min(timers) if timers else now + 0.001) - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, 0.1))
        now = time.monotonic()
        for conn in (client, server):
            if conn is not None and (t := conn.get_timer()) is not None and t <= now:
                conn.handle_timer(now=now)

    for _ in range(1000):  # handshake
        if not exchange():
            advance()
        if server is not None and client._handshake_confirmed:  # noqa: SLF001 (bench only)
            break
    else:
        raise RuntimeError("in-memory QUIC handshake did not complete")

    sid = client.get_next_available_stream_id()
    block = bytes(range(256)) * 256  # 64 KiB, like a splice read
    sent = 0
    t_send = t_recv = 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    stalls = 0
    while received < nbytes:
        t0 = time.perf_counter()
        stream = client._streams.get(sid)  # noqa: SLF001 (bench only: unacked bytes, as quic.py's write)
        unacked = (stream.sender._buffer_stop - stream.sender._buffer_start) if stream else 0
        while sent < nbytes and unacked < high_water:
            k = min(len(block), nbytes - sent)
            client.send_stream_data(sid, block[:k], end_stream=sent + k == nbytes)
            sent += k
            unacked += k
        t_send += time.perf_counter() - t0
        if not exchange():
            stalls += 1
            if stalls > 100_000:
                raise RuntimeError(f"in-memory transfer stalled at {received} of {nbytes} bytes")
            advance()
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    per_mb = 1000 / (nbytes / MB)
    split = t_send + t_recv or 1.0
    return {"pair": cpu * per_mb, "sender": cpu * per_mb * t_send / split,
            "receiver": cpu * per_mb * t_recv / split, "wall_s": wall, "datagram_size": datagram_size}


def floor(nbytes: int = 16 * MB, runs: int = 3, datagram_size: int | None = None) -> dict:
    """Median of ``runs`` in-memory transfers (one warm-up first): CPU-ms per MB."""
    size = datagram_size or transport_datagram_size()
    one_run(MB, size)  # warm-up: imports, allocator
    results = [one_run(nbytes, size) for _ in range(runs)]
    return {k: statistics.median(r[k] for r in results) for k in ("pair", "sender", "receiver", "wall_s")} | {
        "datagram_size": size, "runs": runs, "nbytes": nbytes}


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import paths

    paths()
    for size in (1200, 1452):
        print(json.dumps(floor(datagram_size=size)))
