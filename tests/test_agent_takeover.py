"""A second agent connection takes the device over only once the agent says hello on it (issue 19).

The soaks saw sessions of agents nobody disrupted cut at once ("replaced: the device connected
again", "device … did not answer: connection attempt abandoned"), then the agent flapping for
seconds: under load a handshake the agent had already given up on (the losing side of its
QUIC/TCP race, or a QUIC retry that timed out on its side) still completed at the proxy, and
the proxy made it the device's connection at once, cutting (or draining) the one the agent
was using. Such a connection never says hello; the proxy now waits for the hello before it
replaces anything.

Here a real agent serves a session through a real proxy while a "ghost" connection with the
device's own identity is opened (over the same transport and over the other one) and never
says hello: the session must carry on to a clean, checksummed end, the agent's connection stay
the device's, and the agent never be told it was replaced. A ghost that does say hello takes
over as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from fleet_harness import until

from tunnel import wire
from tunnel.agent import load_identity
from tunnel.agent_config import load
from tunnel.client import Client, UserIdentity
from tunnel.protocol import ALPN_AGENT, read_reply
from tunnel.proxy import Proxy
from tunnel.transport import dial


@pytest.mark.parametrize("ghost_transport", ["quic", "tcp"])
def test_a_connection_without_hello_does_not_replace_the_agent(fleet, echo, monkeypatch, ghost_transport):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"},
                                 transport="quic")
    ops = UserIdentity.load(fleet.user("ops", ["admin"]))
    monkeypatch.setenv("FLEET_TRANSPORT", "quic")
    agent_config = load(config)
    endpoint = agent_config.proxies[0]

    async def ghost_dial():
        return await dial(endpoint.host, endpoint.port, transports=(ghost_transport,),
                          identity=load_identity(agent_config), server_name=endpoint.server_name,
                          alpn=ALPN_AGENT, keepalive=None)

    async def run() -> None:
        proxy = Proxy(fleet.state)
        proxy.trim_every = None
        await proxy.start(fleet.proxy_host, fleet.proxy_port)
        agent = fleet.start_agent(config)
        client = ghost = None
        try:
            await until(lambda: "robot-1" in proxy.agents and proxy.agents["robot-1"].hello.is_set(),
                         "the agent online")
            link = proxy.agents["robot-1"]
            client = await Client.connect(ops)
            stream, rest = await client.dial("robot-1", "echo")
            data = os.urandom(300_000)
            await stream.write(data[:100_000])
            got = bytearray(rest)
            while len(got) < 100_000:
                got += await stream.read(65536)

            ghost = await ghost_dial()  # the device's identity, but no hello: an abandoned attempt
            await until(lambda: sum(p.name == "robot-1" for p in proxy.peers.values()) == 2,
                         "the proxy to admit the ghost connection")
            await asyncio.sleep(0.5)
            assert proxy.agents["robot-1"] is link, "a connection that never said hello took over"
            ghost.close(0, "attempt abandoned")
            await until(lambda: sum(p.name == "robot-1" for p in proxy.peers.values()) == 1,
                         "the ghost connection to end")

            await stream.write(data[100_000:])
            stream.write_eof()
            while chunk := await stream.read(65536):
                got += chunk
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            assert proxy.agents["robot-1"] is link
            assert not link.conn.is_closed
            assert "replaced" not in (config.parent / "agent.log").read_text()

            # A connection that says hello is the device's new connection, as before.
            ghost = await ghost_dial()
            hello = await ghost.open_stream()
            await hello.write(wire.encode("request", op="hello", args={}))
            hello.write_eof()
            reply, _ = await read_reply(hello, 10.0)
            assert reply["ok"], reply
            await until(lambda: proxy.agents["robot-1"] is not link, "the hello to take over")
            await until(lambda: link.conn.is_closed, "the replaced connection to end")
        finally:
            if ghost is not None:
                ghost.close()
            if client is not None:
                client.close()
            fleet.stop(agent)
            await proxy.stop()

    asyncio.run(run())
