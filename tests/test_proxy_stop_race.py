"""A stream that reaches the proxy while it stops never runs after the registry is closed.

Seen once in a soak: a resumable session re-dialled at once after a SIGTERM cut it, its stream
was accepted after ``Proxy.stop`` had cancelled its tasks, and the task then read the closed
registry (``sqlite3.ProgrammingError``, "Task exception was never retrieved" in the proxy's log).
Streams accepted once the proxy is stopping are refused at once, and ``stop`` cancels what was
started while its servers were still open. Real proxy in this process, real client over QUIC.
"""

import asyncio

from tunnel.client import Client, UserIdentity
from tunnel.proxy import Proxy
from tunnel.transport import TransportError


def test_dials_during_shutdown_are_refused_and_leave_no_task_behind(fleet, echo, monkeypatch):
    config = fleet.enroll_device("stop-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"},
                                 transport="quic")
    ops = UserIdentity.load(fleet.user("ops", ["admin"]))
    monkeypatch.setenv("FLEET_TRANSPORT", "quic")

    async def run() -> None:
        errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
        proxy = Proxy(fleet.state)
        await proxy.start(fleet.proxy_host, fleet.proxy_port, idle_timeout=5.0)
        agent = fleet.start_agent(config)
        try:
            for _ in range(300):
                if "stop-1" in proxy.agents:
                    break
                await asyncio.sleep(0.1)
            assert "stop-1" in proxy.agents, "the agent did not come online"
            client = await Client.connect(ops)  # admitted before the stop
            stopping = asyncio.create_task(proxy.stop())
            outcomes = []
            for _ in range(20):  # dials racing every phase of stop()
                try:
                    stream, _ = await asyncio.wait_for(client.dial("stop-1", "echo"), 10)
                    stream.reset(1)
                    outcomes.append("served")
                except (TransportError, OSError, TimeoutError) as exc:
                    outcomes.append(type(exc).__name__)
                except Exception as exc:  # a refusal of the client's own type
                    outcomes.append(getattr(exc, "code", type(exc).__name__))
                if stopping.done():
                    break
            await stopping
            client.close()
            assert not proxy._tasks, proxy._tasks
            assert "served" not in outcomes[1:], outcomes  # once stopping, nothing is served
            # and the engineer reads why: the proxy is stopping, not "refused this identity"
            assert set(outcomes[1:]) <= {"shutdown", "unreachable"}, outcomes
        finally:
            fleet.stop(agent)
        await asyncio.sleep(0.2)  # let a stray task's exception reach the handler
        assert not errors, errors

    asyncio.run(run())


def test_a_stream_reset_for_shutdown_reads_as_the_proxy_stopping():
    """What ``UserSessions.serve`` sends a stream accepted while stopping, as the engineer reads it."""
    from tunnel.admission import CODES
    from tunnel.client import Refusal, closed_error
    from tunnel.transport import StreamReset

    error = closed_error(StreamReset(CODES["shutdown"], remote=True))
    assert isinstance(error, Refusal) and error.code == "shutdown"
    assert "shutting down" in str(error)
