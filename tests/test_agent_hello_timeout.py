"""An agent whose hello goes unanswered reconnects; it does not exit (the 30-minute soak, issue 19).

Right after a proxy restart on a loaded machine, six of thirty agents waited more than 10 s for
the answer to their hello (the proxy's authorization queued behind its policy refresh); the
``TimeoutError`` escaped the agent's connection loop and the agent process exited with a
traceback, so those devices stayed offline until something restarted them. Here a real proxy
leaves the first hello unanswered: the agent must log the reason, reconnect, and come online on
its next connection, with no traceback in its log.
"""

from __future__ import annotations

import asyncio

from tunnel.proxy import Proxy
from tunnel.proxy_agents import AgentLinks


def test_an_unanswered_hello_makes_the_agent_reconnect_not_exit(fleet, echo, monkeypatch):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"},
                                 transport="quic")
    answer = AgentLinks._agent_request
    held: list[object] = []

    async def first_hello_unanswered(self, link, stream):
        if not held:  # the first request on the first connection is the hello: never answer it
            held.append(stream)
            await asyncio.Event().wait()
        await answer(self, link, stream)

    monkeypatch.setattr(AgentLinks, "_agent_request", first_hello_unanswered)

    async def run() -> None:
        proxy = Proxy(fleet.state)
        proxy.trim_every = None
        await proxy.start(fleet.proxy_host, fleet.proxy_port)
        agent = fleet.start_agent(config)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not ("robot-1" in proxy.agents and proxy.agents["robot-1"].hello.is_set()):
                assert agent.poll() is None, "the agent exited after its hello went unanswered"
                assert loop.time() < deadline, "the agent did not come online on its next connection"
                await asyncio.sleep(0.1)
            assert held, "the first hello was not held"
        finally:
            fleet.stop(agent)
            await proxy.stop()

    asyncio.run(run())
    log = (config.parent / "agent.log").read_text()
    assert "Traceback" not in log
    assert "the proxy did not answer in time" in log
