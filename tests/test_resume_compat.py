"""Resumable sessions next to agents from before them (issue 17): a fleet upgrades its proxy first.

An agent from before issue 17 rejects an ``open`` header carrying fields it does not know, so
the proxy offers resuming only to an agent whose hello says ``resume``. Here an "older agent"
is a connection with a device's identity whose hello says nothing about resuming: the session
it is opened for must reach it as the plain ``open`` such an agent knows, and the engineer's
end must go on with raw bytes. A current agent's hello gets the resume secret passed on.
"""

from __future__ import annotations

import asyncio

import pytest
from fleet_harness import until

from tunnel import wire
from tunnel.agent import load_identity
from tunnel.agent_config import load
from tunnel.client import Client, ResumableSession, UserIdentity
from tunnel.protocol import ALPN_AGENT, read_header, read_reply
from tunnel.proxy import Proxy
from tunnel.transport import dial


@pytest.mark.resumable
@pytest.mark.parametrize("says_resume", [False, True], ids=["older-agent", "current-agent"])
def test_the_proxy_offers_resuming_only_to_an_agent_that_says_it_can(fleet, says_resume):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": "127.0.0.1:9"},
                                 transport="quic")
    ops = UserIdentity.load(fleet.user("ops", ["admin"]))
    agent_config = load(config)
    endpoint = agent_config.proxies[0]

    async def run() -> None:
        proxy = Proxy(fleet.state)
        proxy.trim_every = None
        await proxy.start(fleet.proxy_host, fleet.proxy_port)
        agent = client = None
        try:
            agent = await dial(endpoint.host, endpoint.port, transports=("quic",),
                               identity=load_identity(agent_config), server_name=endpoint.server_name,
                               alpn=ALPN_AGENT, keepalive=None)
            hello = {"services": {"echo": 9}, **({"resume": True} if says_resume else {})}
            stream = await agent.open_stream()
            await stream.write(wire.encode("request", op="hello", args=hello))
            stream.write_eof()
            reply, _ = await read_reply(stream)
            assert reply["ok"]
            await until(lambda: "robot-1" in proxy.agents and proxy.agents["robot-1"].hello.is_set(),
                         "the agent's hello handled")

            client = await Client.connect(ops)

            async def connect() -> Client:
                assert client is not None
                return client

            opening = asyncio.ensure_future(ResumableSession.open(connect, "robot-1", "echo"))
            served = await asyncio.wait_for(agent.accept_stream(), 10)
            header, _ = await read_header(served)
            assert header.kind == "open"
            # an older agent's wire check refuses unknown fields: none may reach it
            assert ("resume_secret" in header.fields) is says_resume, header.fields
            await served.write(wire.reply_ok(session=header["session"], resumable=True if says_resume else None))
            session = await asyncio.wait_for(opening, 10)
            assert session.resumable is says_resume
        finally:
            if client is not None:
                client.close()
            if agent is not None:
                agent.close(0, "test over")
            await proxy.stop()

    asyncio.run(run())
