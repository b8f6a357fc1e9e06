"""Happy eyeballs between the two transports: QUIC first, TLS/TCP after a short head start.

Networks that block UDP make a QUIC handshake hang until its timeout; racing TLS/TCP after
``head_start`` seconds bounds the cost of that to the TCP handshake. Whichever connects first
is used; the other attempt is cancelled (and the race waits for its clean-up: a QUIC dial closes
its half-done connection, so it cannot complete later as a connection nobody uses), or closed if
it completed anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from .base import Connection, TransportError

Dial = Callable[[], Awaitable[Connection]]
#: how long the race waits for a cancelled attempt to finish its clean-up
LOSER_CLEANUP = 1.0


#: how much a failure of each kind tells the user (see ``error_rank``)
_RANK = {"refused": 3, "intercepted": 3, "tls": 2, "timeout": 0}


def error_rank(exc: BaseException) -> int:
    """How much an attempt's failure tells the user (higher: show this one), by its kind.

    3: the server (or a middlebox) answered and said no -- ``refused``, or ``intercepted``;
    2: ``tls`` (a TLS / certificate failure); 1: another transport error (``unreachable``,
    ``closed``, ``protocol``...); 0: a ``timeout`` or anything that is not a TransportError.
    """
    if isinstance(exc, TransportError):
        return _RANK.get(exc.code, 1)
    return 0


def _close_quietly(task: asyncio.Task[Connection]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    with contextlib.suppress(Exception):
        task.result().close(0, "lost the transport race")


async def happy_eyeballs(
    first: Dial,
    second: Dial,
    head_start: float = 0.25,
    *,
    labels: tuple[str, str] = ("quic", "tcp"),
) -> tuple[Connection, str]:
    """Start ``first``; start ``second`` too once ``first`` failed or ``head_start`` passed.

    Returns ``(connection, label)`` of the first attempt to succeed (``first`` wins a tie).
    The loser is cancelled, or closed if it connected anyway. If both fail, raises the more
    informative error (``error_rank``; a tie goes to ``first``) with the other one attached as
    a note.
    """
    tasks: list[asyncio.Task[Connection]] = [asyncio.ensure_future(first())]
    winner: asyncio.Task[Connection] | None = None
    try:
        await asyncio.wait(tasks, timeout=head_start)
        if tasks[0].done() and not tasks[0].cancelled() and tasks[0].exception() is None:
            winner = tasks[0]
            return tasks[0].result(), labels[0]
        tasks.append(asyncio.ensure_future(second()))
        while True:
            pending = [t for t in tasks if not t.done()]
            for i, t in enumerate(tasks):
                if t.done() and not t.cancelled() and t.exception() is None:
                    winner = t
                    return t.result(), labels[i]
            if not pending:
                break
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        # both attempts failed (a success returned above): each task holds its exception
        errors = [e for t in tasks if (e := t.exception()) is not None]
        best = max(range(2), key=lambda i: (error_rank(errors[i]), -i))
        exc = errors[best]
        other = errors[1 - best]
        exc.add_note(f"{labels[1 - best]} attempt failed too: {other}")
        raise exc
    finally:
        cancelled = []
        for t in tasks:
            if t is winner:
                continue
            if not t.done():
                t.cancel()
                t.add_done_callback(_close_quietly)
                cancelled.append(t)
            else:
                _close_quietly(t)
                if not t.cancelled():
                    t.exception()  # retrieved: no "never retrieved" warning
        if cancelled:
            # Let the loser run its clean-up (the QUIC dial closes its connection and socket)
            # before the caller goes on: an attempt left running could still complete later,
            # and the server would take a connection nobody uses for the device's.
            await asyncio.wait(cancelled, timeout=LOSER_CLEANUP)


async def dial(
    host: str, port: int, *, transports: tuple[str, ...] = ("quic", "tcp"), head_start: float = 0.25,
    **kwargs,
) -> Connection:
    """Connect with QUIC, racing TLS/TCP after ``head_start`` (or with just one of them).

    ``kwargs`` are the common ``connect()`` arguments of both transports. The connection's
    ``transport_name`` says which one won.
    """
    unknown = set(transports) - {"quic", "tcp"}
    if unknown or not 1 <= len(transports) <= 2:
        raise ValueError(f"transports must be one or two of quic, tcp (got {transports!r})")

    def maker(name: str) -> Dial:
        async def dial_one() -> Connection:
            # imported when the attempt starts: a device whose QUIC wins within the head start
            # never loads the TLS/TCP fallback and h2
            if name == "tcp":
                from . import tcp
                return await tcp.connect(host, port, **kwargs)
            from . import quic
            return await quic.connect(host, port, **kwargs)

        return dial_one

    if len(transports) == 1:
        return await maker(transports[0])()
    first, second = transports
    conn, _ = await happy_eyeballs(
        maker(first), maker(second), head_start, labels=(first, second)
    )
    return conn
