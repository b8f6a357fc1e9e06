"""The engineer's side: one connection to the proxy (QUIC, or TLS over TCP), a stream per session.

Used by ``tunnel proxy-command`` (ssh's ProxyCommand), ``tunnel forward`` (kubectl, psql, a
browser), ``tunnel ls`` and ``tunnel status``. The engineer's identity lives in one directory
(``--identity``, ``$FLEET_IDENTITY``, else ``~/.config/fleet-tunnel``)::

    user.crt  user.key (0600)  ca.crt  client.yaml   (proxy: HOST:PORT, server_name: NAME)

(About 720 lines: the client connection, the engineer's entry points and the resumable session
they share (:class:`ResumableSession`, issue 17). The session dials through :class:`Client`
and the entry points run sessions, so moving either out would make an import circle.)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from enroll import certs
from enroll.addresses import split_host_port
from enroll.errors import EXIT_CUT, EXIT_REFUSED, EXIT_UNAVAILABLE, FleetError
from tunnel import wire
from tunnel.protocol import ALPN_USER, CLOSE_NAMES, read_header, read_reply
from tunnel.splice import (
    Ends,
    SocketEnds,
    SpliceResult,
    StdioEnds,
    StreamEnds,
    describe,
    reset_on_close,
    splice,
)
from tunnel.transport import Connection, ErrorCode, Stream, TLSIdentity, TransportError, dial

if TYPE_CHECKING:  # loaded with the first resumable session
    from collections.abc import Callable

    from tunnel.resumable import ResumableEnds

#: engineer-side liveness while sessions are open (see ``Client.watch``)
PING_INTERVAL, DEAD_AFTER = 2.0, 10.0
#: how long a dial may take, from opening its stream to the proxy's answer. Above the proxy's
#: own worst case, so the proxy's answer (with its reason) comes first: a dial waits at most
#: HELLO_WAIT 2 s + AGENT_REPLY_TIMEOUT 10 s + START_AUDIT_WAIT 3 s there (tunnel/proxy_sessions.py),
#: a resume 3 s more to find its session; raise this with them
DIAL_TIMEOUT = 20.0


class ClientError(FleetError, RuntimeError):
    """Something the engineer must fix or know: printed as one line.

    ``exit_status`` follows ``code``: ``unreachable`` → 3, ``cut`` (an open session did not
    end cleanly) → 4, anything else → 1.
    """

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code
        self.exit_status = {"unreachable": EXIT_UNAVAILABLE, "cut": EXIT_CUT}.get(code, EXIT_REFUSED)


def default_identity_dir() -> Path:
    if env := os.environ.get("FLEET_IDENTITY"):
        return Path(env)
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "fleet-tunnel"


@dataclass(frozen=True)
class UserIdentity:
    directory: Path
    proxy: tuple[str, int]
    server_name: str

    @classmethod
    def load(cls, directory: str | Path | None = None, proxy: str | None = None) -> UserIdentity:
        directory = Path(directory or default_identity_dir())
        try:
            config = yaml.safe_load((directory / "client.yaml").read_text()) or {}
        except FileNotFoundError:
            raise ClientError(
                f"no engineer identity in {directory}: log in first, or pass --identity DIR "
                "(or set FLEET_IDENTITY)"
            ) from None
        address = proxy or config.get("proxy")
        if not address:
            raise ClientError(f"{directory}/client.yaml names no proxy; pass --proxy HOST:PORT")
        host, port = split_host_port(address, "proxy")
        return cls(directory, (host, port), config.get("server_name") or host)

    def tls(self) -> TLSIdentity:
        d = self.directory
        try:
            cert = certs.load_cert((d / "user.crt").read_bytes())
            key = certs.load_key((d / "user.key").read_bytes())
            ca = certs.load_cert((d / "ca.crt").read_bytes())
        except FileNotFoundError as exc:
            raise ClientError(f"identity file missing: {exc.filename}") from None
        if cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
            raise ClientError(
                f"your certificate expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z: log in again",
                "expired",
            )
        return TLSIdentity([cert], key, ca)


def preferred_transports() -> tuple[str, ...]:
    """TLS over TCP raced with QUIC, unless ``FLEET_TRANSPORT`` says quic or tcp.

    The engineer's side tries TLS/TCP first (QUIC starts after the race's head start, or at
    once when TCP is refused): on the engineer's hop the kernel does segmentation and ACKs and
    OpenSSL the crypto, which costs the proxy about half the CPU per MB of a QUIC hop (issue
    14's measurements in ``bench/RESULTS.md``). The engineer needs none of QUIC's migration: a
    session survives a reconnect by re-attaching. The agent keeps its own order (QUIC first).
    """
    choice = os.environ.get("FLEET_TRANSPORT", "auto")
    if choice not in ("auto", "quic", "tcp"):
        raise ClientError(f"FLEET_TRANSPORT={choice!r}: use auto, quic or tcp")
    return ("tcp", "quic") if choice == "auto" else (choice,)


class Refusal(ClientError):
    """The proxy or the device refused a dial or request."""


def closed_error(exc: TransportError) -> ClientError:
    """Why the proxy closed the connection (or, stopping, reset a new stream), as the engineer
    should read it."""
    if exc.code == "reset" and CLOSE_NAMES.get(exc.wire_code) == "shutdown":  # see proxy_sessions' serve
        return Refusal("the proxy is shutting down: retry in a moment", "shutdown")
    if exc.application and exc.wire_code in CLOSE_NAMES:
        return ClientError(f"the proxy refused this identity: {exc.reason}", CLOSE_NAMES[exc.wire_code])
    return ClientError(f"the connection to the proxy ended: {exc.reason or exc}", "unreachable")


class Client:
    def __init__(self, conn: Connection):
        self.conn = conn
        #: why ``watch`` closed the connection, if it did
        self.dead: str | None = None

    @classmethod
    async def connect(cls, identity: UserIdentity, timeout: float = 10.0) -> Client:
        host, port = identity.proxy
        try:
            conn = await dial(
                host, port, transports=preferred_transports(), identity=identity.tls(), server_name=identity.server_name,
                alpn=ALPN_USER, keepalive=15.0, handshake_timeout=timeout,
            )
        except TransportError as exc:
            if exc.application and exc.wire_code in CLOSE_NAMES:
                raise closed_error(exc) from None
            raise ClientError(f"cannot connect to the proxy {host}:{port}: {exc.reason or exc}",
                              "unreachable") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to the proxy {host}:{port}: {exc.strerror or exc}",
                              "unreachable") from None
        return cls(conn)

    def close(self) -> None:
        self.conn.close(0, "done")

    async def watch(self, interval: float = PING_INTERVAL, dead_after: float = DEAD_AFTER) -> None:
        """Close the connection when the proxy has not answered a PING for ``dead_after`` s.

        Run while sessions are open: a proxy that vanished without a close (kill -9, power,
        a dead path) would otherwise leave them hanging until the 60 s idle timeout. Closing
        makes every open stream raise, so each session is cut (a reset, never a clean end).
        """
        silent = 0.0
        loop = asyncio.get_running_loop()
        while True:
            started, started_loop = time.monotonic(), loop.time()
            try:
                await self.conn.ping(interval)
                silent = 0.0
            except TimeoutError:
                # a PING answer can queue behind bulk data (HTTP/2 over TCP): data heard counts
                if getattr(self.conn, "last_received", 0.0) >= started_loop:
                    silent = 0.0
                    continue
                silent += time.monotonic() - started
                if silent >= dead_after:
                    self.dead = f"the proxy did not answer for {silent:.0f}s"
                    self.conn.close(ErrorCode.INTERNAL, self.dead)
                    return
                continue
            except TransportError:
                return
            await asyncio.sleep(interval)

    async def dial(self, device: str, service: str, login: str | None = None) -> tuple[Stream, bytes]:
        """Open a session to ``service`` on ``device``; raise Refusal with the reason if refused."""
        stream, rest, _ = await self.dial_reply(device, service, login)
        return stream, rest

    async def dial_reply(self, device: str, service: str, login: str | None = None,
                         **resume) -> tuple[Stream, bytes, wire.Message]:
        """:meth:`dial`, with the resume fields of the dial header (``resume_secret``, and on a
        re-attach ``resume``, ``received``, ``sent``, ``away``) and the proxy's reply returned.

        A dial that does not become a session closes its stream here, both ways: the proxy's
        refusal came with its FIN, so ours completes the stream (a failure resets it). A stream
        left half-open keeps its slot in the proxy's stream limit (128 a QUIC connection, 512 on
        HTTP/2) for the life of the connection; a warm helper connection, or a session retrying
        its resume through a long outage (a refused dial every 2 s), then ran out of streams and
        every later dial on that connection hung."""
        stream: Stream | None = None
        try:
            # the whole dial is bounded: a stream that cannot open (no slot left) fails it too
            async with asyncio.timeout(DIAL_TIMEOUT):
                stream = await self.conn.open_stream()
                await stream.write(wire.encode("dial", device=device, service=service, login=login, **resume))
                reply, rest = await read_header(stream, timeout=DIAL_TIMEOUT)
        except (wire.HeaderError, TimeoutError) as exc:
            _drop(stream)
            raise ClientError(f"no answer from the proxy: {str(exc) or 'timeout'}") from None
        except TransportError as exc:
            _drop(stream)
            raise closed_error(exc) from None
        except OSError as exc:
            _drop(stream)
            raise ClientError(f"the connection to the proxy failed: {describe(exc)}", "unreachable") from None
        except BaseException:  # cancelled (a re-attach's deadline): no half-open stream either
            _drop(stream)
            raise
        assert stream is not None  # opened, or the timeout above raised
        if not reply["ok"]:
            with contextlib.suppress(TransportError, OSError):
                stream.write_eof()
            raise Refusal(reply.get("reason", "refused"), reply.get("code", "refused"))
        return stream, rest, reply

    async def request(self, op: str, **args) -> dict:
        try:
            return await exchange(self.conn, op, args, timeout=20.0)
        except (wire.HeaderError, TimeoutError) as exc:
            raise ClientError(f"no answer from the proxy: {str(exc) or 'timeout'}") from None
        except TransportError as exc:
            raise closed_error(exc) from None


def _drop(stream: Stream | None) -> None:
    """Reset a stream that will not be used (see ``Client.dial_reply``), whatever its state."""
    if stream is not None:
        with contextlib.suppress(TransportError, OSError, ValueError):
            stream.reset(0)


async def exchange(conn: Connection, op: str, args: dict, timeout: float) -> dict:
    """Send one request on a new stream; return the reply body or raise Refusal (TimeoutError
    when no stream could be opened, or no answer came, within ``timeout``)."""
    stream = None
    try:
        async with asyncio.timeout(timeout):  # no stream slot free must not wait for ever either
            stream = await conn.open_stream()
            await stream.write(wire.encode("request", op=op, args={k: v for k, v in args.items() if v is not None}))
    except BaseException:
        _drop(stream)  # opened but not written in time: its slot must come back
        raise
    stream.write_eof()
    reply, body = await read_reply(stream, timeout)
    if not reply["ok"]:
        raise Refusal(reply.get("reason", "refused by the proxy"), reply.get("code", "refused"))
    return body


async def anonymous_request(
    proxy: str, op: str, args: dict, *, ca=None, ca_pin: str | None = None,
    server_name: str | None = None, timeout: float = 15.0,
) -> dict:
    """One request on the proxy's anonymous ALPN (enrollment, login), before we have a certificate.

    The proxy is checked against ``ca`` or, for a first contact, the CA ``ca_pin`` before any
    secret is sent. Returns the reply body; raises Refusal or ClientError.
    """
    from tunnel.protocol import ALPN_ENROLL

    host, port = split_host_port(proxy, "--proxy")
    try:
        conn = await dial(host, port, transports=preferred_transports(), identity=None, ca=ca, ca_pin=None if ca else ca_pin,
                             server_name=server_name or host, alpn=ALPN_ENROLL, keepalive=None,
                             handshake_timeout=timeout)
    except TransportError as exc:
        raise ClientError(f"cannot reach the proxy at {proxy} safely: {exc.reason or exc}") from None
    except OSError as exc:
        raise ClientError(f"cannot connect to the proxy {proxy}: {exc.strerror or exc}", "unreachable") from None
    try:
        return await exchange(conn, op, args, timeout)
    except (TransportError, wire.HeaderError, TimeoutError) as exc:
        raise ClientError(f"{op} through {proxy} failed: {str(exc) or 'timeout'}") from None
    finally:
        conn.close(0, "done")


# --- resumable sessions (issue 17): the engineer's end ---------------------------------------

#: refusals of a re-attach worth retrying: the device has not reconnected yet, the proxy is
#: restarting or its audit log is busy; anything else ends the session
RESUME_RETRY = frozenset({"device_offline", "device_unreachable", "shutdown", "audit_unavailable",
                          "over_limit"})
#: failures to connect worth retrying (anything else is the proxy refusing this identity)
CONNECT_RETRY = frozenset({"unreachable", "error", "shutdown"})
#: reconnect backoff: from RESUME_FIRST_DELAY doubling to RESUME_MAX_DELAY, full jitter above half
RESUME_FIRST_DELAY, RESUME_MAX_DELAY = 0.05, 2.0
#: how long one reconnect attempt may take (a proxy that is down answers at once on TCP)
RESUME_CONNECT_TIMEOUT = 3.0
#: a silent proxy is given up after this long (not DEAD_AFTER): with resumable sessions a
#: false alarm costs a re-attach, not a cut, and a killed proxy's replacement is found sooner
RESUME_DEAD_AFTER = 5.0


def resume_hold() -> float:
    """Seconds this end holds a session whose tunnel was lost (``$FLEET_RESUME_HOLD``; 0: off)."""
    from tunnel.resume import DEFAULT_HOLD

    raw = os.environ.get("FLEET_RESUME_HOLD")
    if raw is None or not raw.strip():
        return DEFAULT_HOLD
    try:
        hold = float(raw)
    except ValueError:
        hold = -1.0
    if not 0 <= hold < float("inf"):
        raise ClientError(f"FLEET_RESUME_HOLD={raw!r}: give the hold time in seconds (0 turns resuming off)")
    return hold


class ProxyLink:
    """The engineer's connection to the proxy, made again when it is lost (one at a time).

    What a resumable session re-attaches through: a proxy restart or a dead path closes the
    connection (``Client.watch`` closes a silent one), and the next :meth:`client` connects anew.
    """

    def __init__(self, identity: UserIdentity, client: Client | None = None):
        self.identity = identity
        self._client = client
        self._watch: asyncio.Task | None = (
            asyncio.create_task(client.watch(dead_after=RESUME_DEAD_AFTER)) if client else None)
        self._connecting = asyncio.Lock()

    @property
    def current(self) -> Client | None:
        return self._client

    def alive(self) -> bool:
        c = self._client
        return c is not None and c.dead is None and not c.conn.is_closed

    async def client(self, timeout: float = RESUME_CONNECT_TIMEOUT) -> Client:
        async with self._connecting:
            if not self.alive():
                self.close()
                self._client = await Client.connect(self.identity, timeout)
                self._watch = asyncio.create_task(self._client.watch(dead_after=RESUME_DEAD_AFTER))
            assert self._client is not None
            return self._client

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._client is not None:
            self._client.close()
            self._client = None


class ResumableSession:
    """One session from the engineer's end: raw bytes as before, or — when both ends agreed on
    ``resumable`` — framed through :class:`tunnel.resumable.ResumableEnds`, re-attached over a
    new stream (and a new connection if need be) whenever the old one is lost.

    :meth:`open` makes the first dial (a refusal raises :class:`Refusal`, as :meth:`Client.dial`
    does); :meth:`splice` then carries the session to its end. While the tunnel is away the local
    side (ssh's stdio, a forwarded socket) stays open; it is reset only when the session cannot
    go on: the hold time ran out (``SessionCut``, exit status 4) or a re-attach was refused (the
    :class:`Refusal`, with the proxy's reason: a lock or relabel issued during the outage).
    """

    def __init__(self, connect, device: str, service: str, login: str | None, hold: float,
                 tell: Callable[[str], None] | None = None):
        #: ``connect()`` → a live Client (ProxyLink.client, or the helper's warm connection)
        self._connect = connect
        #: where the engineer reads "lost; resuming" / "resumed" (stderr, or the helper's command)
        self._tell = tell or note
        self.device, self.service, self.login, self.hold = device, service, login, hold
        self.id: str | None = None
        self.resumes = 0
        self._secret: str | None = None
        self._first: tuple[Stream, bytes] | None = None
        self._ends: ResumableEnds | None = None
        #: why the session could not resume, once it could not
        self._ended: FleetError | None = None

    @classmethod
    async def open(cls, connect, device: str, service: str, login: str | None = None,
                   hold: float | None = None, tell: Callable[[str], None] | None = None) -> ResumableSession:
        from tunnel.resume import new_secret

        session = cls(connect, device, service, login, resume_hold() if hold is None else hold, tell)
        session._secret = new_secret() if session.hold > 0 else None
        client = await connect()
        try:
            stream, rest, reply = await client.dial_reply(device, service, login, resume_secret=session._secret)
        except Refusal as exc:
            if session._secret is None or exc.code != "bad_header" or "resume_secret" not in str(exc):
                raise
            # a proxy from before resumable sessions refuses a field it does not know: the
            # session goes on raw, as it did with that proxy before
            session._secret = None
            client = await connect()
            stream, rest, reply = await client.dial_reply(device, service, login)
        session.id = reply.get("session")
        session._first = (stream, rest)
        if session._secret is not None and reply.get("resumable") and session.id:
            from tunnel.resumable import ResumableEnds

            session._ends = ResumableEnds(session.id, hold=session.hold)
        return session

    @property
    def resumable(self) -> bool:
        return self._ends is not None

    async def splice(self, local: Ends) -> SpliceResult:
        """Splice to ``local`` until the session ends; raise SessionCut or Refusal when it could
        not resume (``local`` was reset first)."""
        assert self._first is not None, "open() first"
        stream, rest = self._first
        ends = self._ends
        if ends is None:
            return await splice(StreamEnds(stream, rest), local)
        from tunnel.resume import ResumeError, SessionCut

        await ends.attach(stream, rest, 0)
        spliced = asyncio.ensure_future(splice(ends, local))
        finishing: asyncio.Future | None = None
        try:
            try:
                await self._follow(ends, spliced)
                result = await spliced
                if not result.error:
                    # clean here; our last bytes and END may still need a re-attach to arrive
                    finishing = asyncio.ensure_future(ends.finished())
                    await self._follow(ends, finishing)
                    await finishing
                return result
            except SessionCut as exc:  # ours, or the ends' own hold timer ran out first
                raise self._ended or SessionCut(f"session {self.id} to {self.device} ended: {exc.reason}") from None
            except (ResumeError, FleetError, TransportError) as exc:  # framing broke, peer aborted
                raise self._ended or ClientError(f"session {self.id} to {self.device}/{self.service} cut: {exc}",
                                                 "cut") from None
        finally:
            for task in (spliced, finishing):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            await ends.close()  # its stream and tasks: a cut one is reset

    async def _follow(self, ends: ResumableEnds, work: asyncio.Future) -> None:
        """Until ``work`` is done, re-attach after each loss; give up (``self._ended`` says why)
        when that fails."""
        while not work.done():
            lost = asyncio.ensure_future(ends.lost())
            await asyncio.wait({lost, work}, return_when=asyncio.FIRST_COMPLETED)
            if not lost.done():
                lost.cancel()
                return
            self._ended = await self._reattach(ends, lost.result(), work)
            if self._ended is not None:
                ends.give_up(str(self._ended))
                return

    async def _reattach(self, ends: ResumableEnds, why: str, spliced: asyncio.Future) -> FleetError | None:
        """Dial again with ``resume`` until re-attached (None) or the session must end (the
        error to end it with). Backoff with jitter, capped at RESUME_MAX_DELAY, so a restarted
        proxy or a reconnected device is found within about that long."""
        import random

        from tunnel.resume import ResumeError, SessionCut, hold_expired_reason

        loop = asyncio.get_running_loop()
        lost_at, base = loop.time(), RESUME_FIRST_DELAY
        self._tell(f"session {self.id} to {self.device}: the tunnel was lost ({why}); resuming")
        while not spliced.done():
            away = loop.time() - lost_at
            if away >= self.hold:
                return SessionCut(f"session {self.id} to {self.device} ended: {hold_expired_reason(self.hold)}")
            stream = None
            try:
                client = await asyncio.wait_for(self._connect(), max(0.1, self.hold - away))
                stream, rest, reply = await client.dial_reply(
                    self.device, self.service, self.login, resume=self.id, resume_secret=self._secret,
                    received=ends.received, sent=ends.sent, away=round(away, 3))
                sent, received = ends.sent, ends.received
                await ends.attach(stream, rest, reply.get("received", 0))
            except Refusal as exc:
                if exc.code not in RESUME_RETRY:
                    return Refusal(f"session {self.id} to {self.device} could not resume: {exc}", exc.code)
            except (ResumeError, SessionCut) as exc:  # SessionCut: the hold ran out meanwhile
                if stream is not None:  # never left attached at the agent with nobody here
                    with contextlib.suppress(TransportError):
                        stream.reset(1)
                return SessionCut(f"session {self.id} to {self.device} ended: {exc}")
            except ClientError as exc:
                # the proxy refused this identity (locked, revoked, expired), at the connect or
                # by closing the connection: final; anything else (no proxy yet) is retried
                if exc.code not in CONNECT_RETRY:
                    return ClientError(f"session {self.id} to {self.device} could not resume: {exc}", exc.code)
            except (TransportError, OSError, TimeoutError):
                pass  # no proxy yet, or the new stream failed: try again
            else:
                self.resumes += 1
                to_device = max(0, sent - reply.get("received", 0))
                from_device = max(0, reply.get("sent", received) - received)
                self._tell(f"session {self.id} to {self.device} resumed after {loop.time() - lost_at:.1f}s "
                     f"(replayed: {to_device} B to the device, {from_device} B from it)")
                return None
            delay = base * (0.5 + random.random() / 2)
            base = min(RESUME_MAX_DELAY, base * 2)
            await asyncio.sleep(min(delay, max(0.0, self.hold - (loop.time() - lost_at))))
        return None


def note(line: str) -> None:
    """One line on stderr for the engineer (a session held or resumed: not an error)."""
    print(f"tunnel: {line}", file=sys.stderr, flush=True)


def service_from_port(target: str) -> str:
    """ssh's ``%p`` is a port: 22 means the ssh service; other values pass through unchanged."""
    return "ssh" if target == "22" else target


def device_from_host(host: str) -> str:
    """ssh's ``%h``/``%n`` may carry the ``.fleet`` suffix of ``tunnel config``."""
    return host[: -len(".fleet")] if host.endswith(".fleet") else host


def tell_ssh(exc: Exception, fd: int = 1) -> None:
    """Hand a refusal to the ssh client on our stdout, as an SSH server's disconnect.

    Only for ``tunnel proxy-command`` and only before a session is open: stdout then is ssh's
    end of the ProxyCommand, and nothing has been written to it yet. Under connection sharing
    OpenSSH discards our stderr, but it prints a server's disconnect reason itself
    (``Received disconnect from UNKNOWN port 65535:11: fleet-tunnel: REASON``), so the
    engineer — and Ansible, which shows ssh's stderr — reads why. See ``tunnel.sshwire``.
    """
    from tunnel import sshwire

    unreachable = isinstance(exc, ClientError) and exc.code == "unreachable"
    data = sshwire.refusal(str(exc), sshwire.SERVICE_NOT_AVAILABLE if unreachable else sshwire.BY_APPLICATION)
    with contextlib.suppress(OSError):  # ssh already gone: the stderr line is all we can do
        while data:
            data = data[os.write(fd, data):]


async def proxy_command(identity: UserIdentity, device: str, target: str, login: str | None = None) -> None:
    """Splice stdin/stdout to one session (for OpenSSH ``ProxyCommand``).

    Refused or unreachable before the session opens: the reason goes to ssh as an SSH
    disconnect on stdout (``tell_ssh``) and as one line on stderr, exit status 1 or 3.
    ``login`` (ssh's ``%r``) lets the proxy refuse a login no role allows at the dial, with
    its reason, instead of sshd's bare ``Permission denied``.

    A pipe cannot carry a reset, so a session that did not end cleanly raises
    ``ClientError(code="cut")``: one line on stderr and exit status 4, never a clean exit
    after truncated output.

    The session is resumable (issue 17) unless ``$FLEET_RESUME_HOLD`` is 0 or the device's
    agent is too old: when the tunnel is lost, stdin/stdout stay open (ssh sees nothing) while
    this end reconnects and re-attaches, for at most the hold time. A re-attach refused (a lock
    issued during the outage) ends it with the proxy's reason, the hold running out with
    ``SessionCut`` (exit status 4).
    """
    device, service = device_from_host(device), service_from_port(target)
    # OpenSSH sends its ProxyCommand SIGHUP as it exits, right after the session's last bytes:
    # a resumable session still has its closing handshake (END, the last ACKs) to finish, which
    # takes a round trip. Dying at once would leave both ends holding the session.
    loop, main = asyncio.get_running_loop(), asyncio.current_task()
    if main is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.call_later(HANGUP_GRACE, main.cancel))
    try:
        hold = resume_hold()
        link = ProxyLink(identity, await Client.connect(identity))
    except ClientError as exc:
        tell_ssh(exc)
        raise
    try:
        try:
            session = await ResumableSession.open(link.client, device, service, login, hold)
        except ClientError as exc:
            tell_ssh(exc)
            raise
        try:
            result = await session.splice(StdioEnds())
        except asyncio.CancelledError:
            raise ClientError(f"session to {device}/{service} cut: ssh hung up before it ended", "cut") from None
        if result.error:
            raise ClientError(f"session to {device}/{service} cut after {result.a_to_b} bytes "
                              f"received: {result.error}", "cut")
    finally:
        link.close()
        await asyncio.sleep(0)  # hand the close to the transport before the loop ends


#: after ssh's SIGHUP, how long proxy-command may take to finish the session's closing handshake
HANGUP_GRACE = 2.0

#: how long the preflight session may take to end cleanly before it is reset
PREFLIGHT_DRAIN = 2.0


async def preflight(client: Client, device: str, service: str) -> None:
    """Open one real session to ``device``/``service`` and end it at once; raise if refused.

    The proxy decides it exactly as it decides every later session (policy, device online,
    service known, the device's service accepting), audits it the same way, and a refusal
    raises ``Refusal`` with the proxy's reason: ``tunnel forward``/``db``/``kube`` then exit 1
    before they print an address, instead of printing one that can never work. The session
    is half-closed (the service sees an ordinary client that connected and left) and reset if
    the service does not end it within ``PREFLIGHT_DRAIN`` seconds.
    """
    stream, _ = await client.dial(device, service)
    try:
        stream.write_eof()
        async with asyncio.timeout(PREFLIGHT_DRAIN):
            while await stream.read():
                pass  # a banner or greeting: not ours to read
    except (TimeoutError, TransportError, OSError):
        with contextlib.suppress(TransportError, OSError):
            stream.reset(0)


async def forward(identity: UserIdentity, device: str, service: str, host: str, port: int,
                  ready=None, check: bool = True) -> None:
    """Listen on host:port; each accepted connection becomes one session over one connection.

    With ``check`` (the default) one ``preflight`` session runs first: an unknown or offline
    device, a forbidden or unknown service raises ``Refusal`` before anything listens and
    before ``ready`` is called.

    A local connection whose session is refused or cut gets a TCP reset (never a FIN, which
    would pass truncated data off as complete) and ``tunnel forward`` prints one line saying
    why. It returns — raising ``ClientError(code="unreachable")`` — when the connection to the
    proxy ends; cancelling it (SIGTERM, Ctrl-C) resets the sessions still open.

    With resumable sessions (the default; ``$FLEET_RESUME_HOLD=0`` turns them off) a lost
    connection is made again instead: each open session re-attaches (its local connection
    stays open, see :class:`ResumableSession`), new local connections dial through the new
    connection, and forward runs until it is cancelled.
    """
    hold = resume_hold()
    client = await Client.connect(identity)
    if check:
        try:
            await preflight(client, device, service)
        except BaseException:
            client.close()
            await asyncio.sleep(0)  # hand the close to the transport before the loop ends
            raise
    link = ProxyLink(identity, client) if hold > 0 else None
    open_sessions = 0
    watch: asyncio.Task | None = None
    handlers: set[asyncio.Task] = set()
    # Set when the connection is over for us before the transport has finished closing it (the
    # watch gave up on a silent proxy, or a dial found the connection failed): QUIC's closing
    # period (3 PTO, seconds under load) must not keep the listener accepting connections it
    # can only reset; forward returns now and its caller reconnects or exits.
    lost = asyncio.Event()

    def say(peer, what: str) -> None:
        who = "{}:{}".format(*peer[:2]) if peer else "a local connection"
        print(f"tunnel: forward {who} -> {device}/{service}: {what}", file=sys.stderr, flush=True)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_sessions, watch
        peer = writer.get_extra_info("peername")
        clean = False
        task = asyncio.current_task()
        assert task is not None  # asyncio runs each connection's handler as a task
        handlers.add(task)
        task.add_done_callback(handlers.discard)
        open_sessions += 1
        if link is None and (watch is None or watch.done()):
            watch = asyncio.create_task(client.watch())
            watch.add_done_callback(lambda _: lost.set() if client.dead else None)
        try:
            if link is not None:
                clean = await resumable(link, peer, reader, writer)
                return
            try:
                stream, rest = await client.dial(device, service)
            except ClientError as exc:
                say(peer, f"refused: {exc} (reset the local connection)")
                if getattr(client.conn, "is_closed", False):
                    lost.set()
                return
            result = await splice(StreamEnds(stream, rest), SocketEnds(reader, writer))
            if result.error:
                say(peer, f"session cut after {result.a_to_b} bytes from the device and "
                          f"{result.b_to_a} to it: {result.error} (reset the local connection)")
            clean = not result.error
        except asyncio.CancelledError:
            pass  # forward is ending: reset below; asyncio's server would print a cancelled handler
        finally:
            open_sessions -= 1
            if open_sessions == 0 and watch is not None:
                watch.cancel()
            if not clean:  # refused, cut, or we are shutting down: a reset, never a FIN
                reset_on_close(writer)
                writer.transport.abort()
            else:
                reset_on_close(writer, False)  # a clean end: a FIN after all
                with contextlib.suppress(OSError):
                    writer.close()

    async def resumable(link: ProxyLink, peer, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> bool:
        """One local connection as a resumable session; True when it ended cleanly."""
        try:
            session = await ResumableSession.open(link.client, device, service, None, hold)
        except ClientError as exc:
            say(peer, f"refused: {exc} (reset the local connection)")
            return False
        try:
            result = await session.splice(SocketEnds(reader, writer))
        except FleetError as exc:  # could not resume: the hold ran out, or a refusal
            say(peer, f"{exc} (reset the local connection)")
            return False
        if result.error:
            say(peer, f"session cut after {result.a_to_b} bytes from the device and "
                      f"{result.b_to_a} to it: {result.error} (reset the local connection)")
        return not result.error

    server = await asyncio.start_server(handle, host, port)
    # Accepted sockets inherit SO_LINGER 0 from the listener: one whose handler never ran (it
    # was cancelled while forward exits) still ends with a reset, not a FIN, when we exit.
    for sock in server.sockets:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    bound = server.sockets[0].getsockname()
    if ready:
        ready(bound)
    try:
        async with server:
            if link is not None:  # a lost connection is made again: serve until cancelled
                await server.serve_forever()
                return
            closed = asyncio.create_task(client.conn.wait_closed())
            ended = asyncio.create_task(lost.wait())
            serving = asyncio.create_task(server.serve_forever())
            done, _ = await asyncio.wait({closed, ended, serving}, return_when=asyncio.FIRST_COMPLETED)
            if closed in done or ended in done:
                server.close()  # new local connections are refused from here, not accepted and reset
                if handlers:  # their streams fail now: let each say why before we exit
                    await asyncio.wait(handlers, timeout=2.0)
                why = (closed.result() if closed.done() else None) or client.dead or "closed"
                raise ClientError(f"connection to the proxy ended: {why}", "unreachable")
    finally:
        if link is not None:
            link.close()
        client.close()
