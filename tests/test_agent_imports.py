"""What an idle agent has loaded: only what it runs (issue 14, the idle agent's RSS ≤ 42 MiB).

A device's agent spends most of its life connected and idle, and every module it has loaded
stays in its memory for that life. These are structural checks, not timings: a real proxy, a
real ``tunnel agent`` process, online (its hello accepted), then the modules it holds. Each
module named here is loaded on first use instead, and the tests that use it (resume, splice,
the TLS/TCP fallback) show it still works then:

* ``tunnel.agent_sessions`` / ``tunnel.resume`` / ``tunnel.resumable`` / ``tunnel.splice``:
  with the first session (``Agent.held``, ``Agent._session``);
* ``encodings.idna`` (and ``stringprep``): never for an ASCII proxy name
  (``quic._resolve`` hands the resolver bytes);
* ``ctypes``: never where cffi's backend is loaded (``quic.release_free_heap``);
* ``tunnel.transport.tcp`` and h2: with the TLS/TCP fallback;
* ``enroll.secret_input`` (getpass, termios): with ``tunnel login``'s parser, never the
  agent's (``tunnel.cli.build_parser(agent_only=True)``).

The agent here runs QUIC only: with the default race, a handshake slower than the 0.3 s head
start (a loaded CI machine) lets TLS/TCP join and load h2 rightly; ``tests/transport/
test_imports.py`` checks that ``tunnel.agent`` itself does not import the fallback.
"""

from __future__ import annotations

import os
import signal

import pytest
from fleet_harness import PY, Fleet, wait_until

#: runs ``tunnel agent`` (the same ``main`` as ``python -m tunnel.cli``); SIGUSR1 writes the
#: names of the loaded modules to argv[1] (asyncio wakes up for any signal once it handles
#: SIGTERM, so the handler runs while the agent idles)
AGENT_WITH_DUMP = """\
import os, signal, sys

def dump(*_):
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])

signal.signal(signal.SIGUSR1, dump)
from tunnel.cli import main
sys.exit(main(sys.argv[2:]))
"""

NOT_WHILE_IDLE = {
    "tunnel.agent_sessions", "tunnel.resume", "tunnel.resumable", "tunnel.splice",
    "encodings.idna", "stringprep", "ctypes", "enroll.secret_input", "getpass", "termios",
    "tunnel.transport.tcp", "tunnel.transport.h2session", "h2", "hpack",
    "aioquic.asyncio", "tunnel.client", "tunnel.engineer", "tunnel.proxy",
}


@pytest.fixture(scope="module")
def idle_agent_modules(tmp_path_factory) -> set[str]:
    fleet = Fleet(tmp_path_factory.mktemp("idle-agent"))
    dump = fleet.root / "modules.txt"
    try:
        config = fleet.enroll_device("idle-1", {"customer": "acme"}, {"ssh": "127.0.0.1:22"},
                                     transport="quic")
        fleet.start_proxy()
        agent = fleet.start([PY, "-c", AGENT_WITH_DUMP, str(dump), "agent", "--config", str(config),
                             "--log-format", "json"], config.parent / "agent.log")
        fleet.wait_online(fleet.user("ops", ["admin"]), "idle-1", timeout=30)
        assert agent.poll() is None, (config.parent / "agent.log").read_text()
        os.kill(agent.pid, signal.SIGUSR1)
        wait_until(dump.exists, 10, 0.05, "the agent's module list")
        return set(dump.read_text().split())
    finally:
        fleet.close()


def test_the_idle_agent_is_the_real_one(idle_agent_modules):
    assert {"tunnel.cli", "tunnel.agent", "tunnel.transport.quic", "tunnel.transport.pmtu"} \
        <= idle_agent_modules


def test_an_idle_agent_has_not_loaded_what_only_a_session_or_the_fallback_runs(idle_agent_modules):
    loaded = {m for m in idle_agent_modules if m in NOT_WHILE_IDLE or m.split(".")[0] in NOT_WHILE_IDLE}
    assert not loaded, f"an idle agent loaded {sorted(loaded)}"
