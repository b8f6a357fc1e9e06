"""``Connection.wait_close_sent``: what a process awaits after ``close()`` before it exits.

It replaced ``close()`` followed by a fixed ``sleep()``; the peer must hear the close itself
(its code and reason), never learn of it by its idle timeout.
"""

from __future__ import annotations

import asyncio

from transport_helpers import run


def test_the_peer_hears_the_close_once_wait_close_sent_returned(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, pki.device)
            server_conn = await h.connections.get()
            client.close(0, "done")
            assert await client.wait_close_sent(5.0)
            ended = await asyncio.wait_for(server_conn.wait_closed(), 10)
            assert ended is not None and ended.remote and "done" in ended.reason, ended
            assert await client.wait_close_sent(0)  # sent already: no wait at all

    run(main())
