"""Proxy metrics and health (issue 18): a real proxy, a real agent and a session; values move."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from fleet_harness import PY, free_udp_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from tunnel import metrics


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize("text, want", [
    ("9100", ("127.0.0.1", 9100)),
    (":9100", ("127.0.0.1", 9100)),
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("[::1]:9100", ("::1", 9100)),
])
def test_parse_listen_binds_loopback_unless_told(text, want):
    assert metrics.parse_listen(text) == want


@pytest.mark.parametrize("text", ["", "host:", "host:0", "host:70000", "host:http", "a:b:c"])
def test_parse_listen_refuses_bad_input(text):
    with pytest.raises(ValueError, match="--metrics-listen"):
        metrics.parse_listen(text)


def test_metrics_of_a_running_proxy(fleet, echo):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"})
    port = free_udp_port()
    log = fleet.root / "proxy.log"
    proxy = fleet.start([PY, "-m", "tunnel.cli", "proxy", "--state", str(fleet.state.root),
                         "--listen", fleet.address, "--log-format", "json",
                         "--metrics-listen", str(port)], log)
    wait_until(lambda: proxy.poll() is None and '"metrics listening"' in log.read_text(), 15,
               what="metrics listening")
    base = f"http://127.0.0.1:{port}"
    status, body = _get(base + "/healthz")
    assert status == 200, body
    health = json.loads(body)
    assert health["status"] == "ok" and health["registry_writer"] == "alive" and health["agents"] == 0

    before = _samples(_get(base + "/metrics")[1])
    assert before[("fleet_proxy_agents_connected", (("transport", "quic"),))] == 0
    assert before[("fleet_proxy_sessions_open", ())] == 0

    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    out = fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops, input=b"hello metrics\n")
    assert out.returncode == 0 and out.stdout == b"hello metrics\n", out.stderr
    denied = fleet.tunnel("proxy-command", "robot-1", "nonexistent", identity=ops, input=b"")
    assert denied.returncode != 0

    def moved():
        s = _samples(_get(base + "/metrics")[1])
        return s if s[("fleet_proxy_session_bytes_total", (("direction", "to_device"),))] >= 14 else None

    after = wait_until(moved, 10, 0.2, "session bytes counted")
    connected = sum(v for (n, _), v in after.items() if n == "fleet_proxy_agents_connected")
    assert connected == 1
    assert after[("fleet_proxy_session_bytes_total", (("direction", "from_device"),))] >= 14
    assert after[("fleet_proxy_connections_accepted_total", (("kind", "device"),))] >= 1
    assert after[("fleet_proxy_connections_accepted_total", (("kind", "user"),))] >= 2
    refusals = {labels: v for (n, labels), v in after.items() if n == "fleet_proxy_refusals_total"}
    assert sum(refusals.values()) >= 1 and all(dict(k)["stage"] for k in refusals)
    writes = after[("fleet_proxy_registry_write_seconds_count", ())]
    assert writes > before.get(("fleet_proxy_registry_write_seconds_count", ()), 0)
    assert ("fleet_proxy_agent_migrations_total", ()) in after
    assert ("fleet_proxy_agent_reconnects_total", ()) in after

    status, body = _get(base + "/healthz")
    assert status == 200 and json.loads(body)["agents"] == 1
    assert _get(base + "/nope")[0] == 404
    # a malformed request is answered, and the proxy stays up
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert _get(base + "/healthz")[0] == 200
    assert proxy.poll() is None
    # an engineer's connection is not an info line of its own (the audit log has it)
    assert not any(json.loads(line).get("msg") == "engineer connected"
                   for line in log.read_text().splitlines() if line.startswith("{"))


def test_health_is_503_when_the_writer_is_gone(fleet):
    """In-process: a proxy whose registry writer died answers 503 with the reason."""
    import asyncio

    from tunnel.proxy import Proxy

    async def run():
        proxy = Proxy(fleet.state)
        await proxy.start("127.0.0.1", fleet.proxy_port, tcp=False)
        try:
            ok, body = proxy.metrics.health()
            assert ok and body["status"] == "ok"
            await proxy.writer.close()  # the writer thread ends
            ok, body = proxy.metrics.health()
            assert not ok and body["registry_writer"] == "dead"
            status, _, data = metrics._answer(proxy.metrics, b"GET /healthz HTTP/1.1")
            assert status.startswith("503") and json.loads(data)["status"] == "unhealthy"
        finally:
            proxy.writer = None
            await proxy.stop()

    asyncio.run(run())


def test_metrics_off_by_default(fleet):
    proc = fleet.start_proxy()
    assert proc.poll() is None
    assert "metrics listening" not in (fleet.root / "proxy.log").read_text()


def test_metrics_port_in_use_is_a_clear_error(fleet):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = fleet.root / "proxy.log"
        proc = fleet.start([PY, "-m", "tunnel.cli", "proxy", "--state", str(fleet.state.root),
                            "--listen", fleet.address, "--metrics-listen", str(port)], log)
        assert proc.wait(timeout=30) == 1
    text = log.read_text()
    assert f"--metrics-listen 127.0.0.1:{port}: cannot listen" in text and "Traceback" not in text
    assert "listening" not in text  # the proxy never started


def test_metrics_listen_rejects_a_bad_value(fleet):
    log = fleet.root / "proxy.log"
    proc = fleet.start([PY, "-m", "tunnel.cli", "proxy", "--state", str(fleet.state.root),
                        "--listen", fleet.address, "--metrics-listen", "localhost:http"], log)
    assert proc.wait(timeout=30) == 1
    assert "--metrics-listen: expected PORT or HOST:PORT" in log.read_text()
