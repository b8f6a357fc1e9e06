"""What a device's agent loads: no h2 until the TLS/TCP fallback is used, no aioquic.asyncio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return set(out.split())


def test_agent_loads_no_h2_no_aioquic_asyncio_no_engineer_client():
    mods = _modules_after("import tunnel.agent")
    assert "tunnel.transport.quic" in mods
    unwanted = {m for m in mods if m.split(".")[0] in ("h2", "hpack", "hyperframe")}
    unwanted |= {m for m in mods if m.startswith(("aioquic.asyncio", "tunnel.transport.tcp"))}
    unwanted |= mods & {"tunnel.client", "tunnel.engineer", "tunnel.proxy", "tunnel.cli"}
    assert not unwanted


def test_the_tcp_fallback_loads_on_first_use():
    mods = _modules_after("from tunnel.transport import tcp_serve, tcp_connect")
    assert {"tunnel.transport.tcp", "h2.connection"} <= mods


def test_tunnel_agent_command_skips_the_ops_audit_commands():
    mods = _modules_after(
        "from tunnel import cli\ncli.build_parser(agent_only=True).parse_args(['agent', '--config', 'x'])"
    )
    assert not {m for m in mods if m.startswith(("sqlite_utils", "sqlite3", "tunnel.audit_cmd"))}


def test_tunnel_agent_command_loads_no_engineer_client():
    mods = _modules_after(
        "from tunnel import cli\ncli.build_parser(agent_only=True).parse_args(['agent', '--config', 'x'])"
    )
    assert "tunnel.cli" in mods
    assert not mods & {"tunnel.client", "tunnel.engineer", "tunnel.proxy", "enroll.state"}


def test_client_errors_still_reach_the_user_as_a_refusal():
    # an engineer command's refusal exits 1 with its text (ClientError's exit_status)
    out = subprocess.run(
        [sys.executable, "-m", "tunnel.cli", "status", "--identity", "/nonexistent-fleet-identity"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1, out
    assert out.stderr.startswith("tunnel: error: ") and "Traceback" not in out.stderr
