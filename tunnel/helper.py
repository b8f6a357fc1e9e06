"""The per-user helper: one warm, authenticated connection to the proxy per identity directory.

Why: ``tunnel proxy-command`` pays for importing aioquic, cryptography and YAML and for a full
handshake on every ssh (0.3–0.6 s to the banner). The helper pays that once; ssh's ProxyCommand
becomes ``tunnel/helper_client.py``, which imports only the standard library and asks the helper
for a stream over a Unix socket (``tunnel.helper_protocol`` says what goes over it).

- Started on demand, detached (a new session, stdio on a log file), by the first client that
  finds none; or by a systemd user unit (``scripts/fleet-tunnel-helper.service``).
- Serves ``helper_protocol.socket_path(identity)``: ``$XDG_RUNTIME_DIR/fleet-tunnel/`` or the
  identity directory, socket mode 0600, and each peer's uid checked with ``SO_PEERCRED``
  (the mode alone is not enough: root, or a directory made too wide, would let others in).
- Binds a temporary name and renames it over the socket path, atomically: a stale socket file,
  one owned by another user, or an older helper's socket is simply replaced, and a helper whose
  socket was replaced (or removed) notices within a second and *retires*.
- Retires — stops taking new clients, lets open sessions finish, then exits — when its code is
  older or newer than a client's (``version_mismatch``), when the identity's certificate file
  changed or went away (``tunnel login`` again, ``tunnel logout``), and when its certificate
  expires. Exits after ``idle`` seconds without sessions or requests (default 30 minutes).
- The proxy sees the same identity, policy and audit as from ``tunnel proxy-command``: each
  session is one dial on the helper's connection, refused or not by the proxy alone.
- Serves the engineer's other commands the same way: ``request`` (``tunnel ls``, ``whoami``,
  ``status``, the inventory plugin's listing) is one request on the warm connection, ``cert``
  (``tunnel ssh-cert``, ssh_config's ``Match exec``) one certificate, and ``forward``
  (``tunnel forward``/``db``/``kube``) takes the command's listening socket and splices each
  connection it accepts, for as long as the command stays attached.
- Every session — ssh's stream or a forwarded TCP connection — goes through
  ``Helper.splice_session``, the one place a tunnel stream meets a local end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import struct
import time
from pathlib import Path

from enroll.addresses import AddressError, split_host_port
from enroll.errors import FleetError
from tunnel import helper_protocol as hp
from tunnel.client import (
    Client,
    ClientError,
    ResumableSession,
    UserIdentity,
    device_from_host,
    preflight,
    resume_hold,
    service_from_port,
)
from tunnel.splice import Ends, SocketEnds, SpliceResult, reset_on_close
from tunnel.transport import TransportError

log = logging.getLogger("tunnel.helper")

#: default idle period before the helper exits
IDLE = 30 * 60.0
#: how often the helper looks at its socket, the identity and the clock
WATCH_EVERY = 0.5
#: a warm connection silent this long (its watch pings every 2 s) is pinged before it is used
SILENT = 5.0
#: a request unanswered this long makes the helper ping the connection it went on
PROBE_AFTER = 1.0
#: how long such a ping may take before the connection counts as dead
PROBE_TIMEOUT = 2.0
#: how long a ``forward`` client may take to send its listening socket after the ack
FD_WAIT = 5.0
#: a dial renews the LOGIN@DEVICE certificate when the cached one is older than this, so the
#: next ssh finds it fresh (ssh_config's ``Match exec`` skips while it is < 3 minutes old)
RENEW_AFTER = 60.0


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return uid


def private_dir(path: str) -> None:
    """Make ``path`` (0700) or check it is ours and closed to others; raise ClientError if not."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(path):
        raise ClientError(f"{path} must be a directory of yours that only you can open "
                          f"(mode 0700): fix it or unset XDG_RUNTIME_DIR")


class FramedEnds(Ends):
    """The local client's side of a session: frames over the Unix socket (see helper_protocol).

    A DATA frame is data, END a clean end of that direction; CUT, a malformed frame, or the
    connection ending without END (the client was killed) is a cut: ``recv`` raises, and
    ``splice`` resets the tunnel stream rather than pass a truncated session off as complete.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.ended = False

    async def recv(self) -> bytes:
        if self.ended:
            return b""
        try:
            head = await self.reader.readexactly(hp.FRAME_HEAD.size)
            kind, length = hp.check_head(head)
            payload = await self.reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError:
            raise ConnectionError("the local client went away without ending the session") from None
        except hp.ProtocolError as exc:
            raise ConnectionError(f"the local client sent a bad frame: {exc}") from None
        if kind == hp.END:
            self.ended = True
            return b""
        if kind == hp.CUT:
            raise ConnectionError(f"the local client cut the session: {payload.decode(errors='replace')}")
        if not payload:
            return await self.recv()  # an empty data frame is no end
        return payload

    async def send(self, data: bytes) -> None:
        self.writer.write(hp.data_frames(data))
        await self.writer.drain()

    def eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.write(hp.frame(hp.END))

    def abort(self) -> None:
        pass  # the helper sends CUT with the reason once splice returns (see Helper._dial)

    def cut(self, why: str) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.write(hp.frame(hp.CUT, why.encode()[:1000]))
        self.writer.close()


def _hold(req: dict) -> float:
    """The command's resume hold (its ``$FLEET_RESUME_HOLD``), else this helper's own."""
    hold = hp.hold_seconds(req["hold"]) if "hold" in req else None
    return resume_hold() if hold is None else hold


class _SaidFirst(SocketEnds):
    """A forwarded TCP connection whose reset waits until the command was told why.

    ``splice`` aborts both ends when a session is cut; here that is left to the forward's
    handler, which sends the command its line first and resets right after: the engineer who
    sees the reset finds the reason already on its way (as in ``tunnel.client.forward``, where
    one process does both in that order).
    """

    def abort(self) -> None:
        pass


class Helper:
    def __init__(self, identity: UserIdentity, *, idle: float | None = IDLE, path: str | None = None):
        self.identity = identity
        self.directory = str(identity.directory)
        self.path = path or hp.socket_path(self.directory)
        self.idle = idle
        self.version = hp.code_version()
        self.stamp = hp.identity_stamp(self.directory)
        self.started = time.time()
        self.expires = self._expiry()
        self._client: Client | None = None
        # made again by run(), fresh for its loop; here so that they are never None
        self._connecting = asyncio.Lock()
        self._watch: asyncio.Task | None = None
        self.sessions = 0
        self.handlers: set[asyncio.Task] = set()
        self.last_active = time.monotonic()
        self.retiring: str | None = None
        self.stopping: str | None = None
        self.server: asyncio.AbstractServer | None = None
        self.inode: int | None = None
        self.done = asyncio.Event()

    def _expiry(self) -> float | None:
        from enroll import certs

        try:
            cert = certs.load_cert((Path(self.directory) / "user.crt").read_bytes())
        except (OSError, ValueError):
            return None
        return cert.not_valid_after_utc.timestamp()

    # --- the connection to the proxy ---------------------------------------------------------

    def _connected(self) -> bool:
        c = self._client
        return c is not None and c.dead is None and not getattr(c.conn, "is_closed", False)

    async def client(self) -> Client:
        """The warm connection, made (again) if there is none: the race, keepalive and PING
        watch of ``tunnel.client.Client``; a dead one is replaced at the next request, and one
        silent for SILENT seconds is pinged first (a proxy killed without a close leaves a
        connection that looks open until the watch gives up on it)."""
        async with self._connecting:
            client = self._client
            if client is not None and self._connected() and not await self._answers(client, SILENT):
                self._drop(client, "the proxy stopped answering")
            if client is None or not self._connected():
                if self._watch:
                    self._watch.cancel()
                if client:
                    client.close()
                client = self._client = await Client.connect(self.identity)
                self._watch = asyncio.create_task(client.watch())
                log.info("connected to the proxy %s:%s", *self.identity.proxy)
            return client

    @staticmethod
    async def _answers(client: Client, silent: float = 0.0) -> bool:
        """False if ``client``'s connection, silent for ``silent`` seconds or more, does not
        answer a ping within PROBE_TIMEOUT."""
        loop = asyncio.get_running_loop()
        if loop.time() - getattr(client.conn, "last_received", 0.0) < silent:
            return True
        try:
            await client.conn.ping(PROBE_TIMEOUT)
        except (TimeoutError, TransportError, OSError):
            return False
        return True

    def _drop(self, client: Client, why: str) -> None:
        log.info("dropping the connection to the proxy: %s", why)
        client.dead = client.dead or why
        client.close()

    async def _ask(self, call):
        """``await call(client)`` on the warm connection. If it has no answer within PROBE_AFTER
        and the connection does not answer a ping either (the proxy went away without a close),
        once more on a new connection: only for requests that read (asking twice is harmless),
        so the engineer gets today's quick "cannot connect", not a 20 s timeout."""
        client = await self.client()
        first = asyncio.ensure_future(call(client))
        done, _ = await asyncio.wait({first}, timeout=PROBE_AFTER)
        if done or await self._answers(client):
            return await first
        first.cancel()
        self._drop(client, "the proxy stopped answering")
        return await call(await self.client())

    async def _warm(self) -> None:
        with contextlib.suppress(ClientError):
            await self.client()

    # --- serving -----------------------------------------------------------------------------

    async def serve(self) -> None:
        """Bind under a temporary name and rename over ``path``: atomic, replaces whatever was
        there (a stale file, a foreign socket, an older helper's) without a window."""
        directory = os.path.dirname(self.path)
        private_dir(directory)
        if len(self.path.encode()) > hp.MAX_SOCKET_PATH:
            raise ClientError(f"socket path {self.path} is too long for a Unix socket: set "
                              "XDG_RUNTIME_DIR to a short directory")
        tmp = os.path.join(directory, f".helper-{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._handle, path=tmp, limit=hp.MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)
        os.rename(tmp, self.path)
        self.inode = os.stat(self.path).st_ino

    async def run(self) -> int:
        self.done = asyncio.Event()
        self._connecting = asyncio.Lock()
        await self.serve()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stop, f"signal {signal.Signals(sig).name}")
        log.info("helper %s serving %s for %s (version %s)", os.getpid(), self.path, self.directory, self.version)
        warm = asyncio.create_task(self._warm())
        watcher = asyncio.create_task(self._watch_loop())
        await self.done.wait()
        log.info("helper exiting: %s", self.stopping or self.retiring)
        watcher.cancel()
        warm.cancel()
        self._unlisten()
        for task in list(self.handlers):  # cut what is still open: each client gets CUT
            task.cancel()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=2.0)
        if self._watch:
            self._watch.cancel()
        if self._client:
            self._client.close()
            await asyncio.sleep(0.05)  # let the CONNECTION_CLOSE leave
        return 0

    def _unlisten(self) -> None:
        if self.server:
            self.server.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)

    def retire(self, why: str) -> None:
        """No new clients from now on; exit once the open sessions end."""
        if self.retiring:
            return
        self.retiring = why
        log.info("helper retiring: %s", why)
        self._unlisten()
        self._maybe_done()

    def stop(self, why: str) -> None:
        """Exit now; open sessions are cut (their clients see CUT, never a clean end)."""
        self.stopping = self.stopping or why
        self.done.set()

    def _maybe_done(self) -> None:
        if self.retiring and not self.handlers:
            self.done.set()

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY)
            stamp = hp.identity_stamp(self.directory)
            if stamp != self.stamp:
                self.retire("the identity was logged out" if stamp == "none" else "the identity's certificate changed")
            try:
                inode = os.stat(self.path).st_ino
            except OSError:
                inode = None
            if inode != self.inode and not self.retiring:
                self.retire("the socket was removed or taken over by another helper")
            now = time.time()
            if self.expires and self.expires < now and self.expires > self.started:
                self.retire("the identity's certificate expired")
            if (self.idle and not self.handlers
                    and time.monotonic() - self.last_active > self.idle):
                self.stop(f"idle for {self.idle:.0f}s")
            self._maybe_done()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # asyncio runs each connection's handler as a task
        self.handlers.add(task)
        self.last_active = time.monotonic()
        try:
            await self._converse(reader, writer)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            self.handlers.discard(task)
            self.last_active = time.monotonic()
            writer.close()  # flushes what is buffered (a last frame, a CUT) first
            self._maybe_done()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(message: dict) -> None:
            writer.write(hp.encode_line(message))

        uid = peer_uid(writer.get_extra_info("socket"))
        if uid != os.getuid():
            log.warning("refused a local client of uid %s (this helper serves uid %s)", uid, os.getuid())
            send({"ok": False, "code": "forbidden", "reason": f"this helper serves uid {os.getuid()} only"})
            await writer.drain()
            return
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            req = hp.parse_request(line, self.version, self.stamp)
        except (TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
            code = exc.code if isinstance(exc, hp.ProtocolError) else "bad_request"
            reason = str(exc) or "no request line within 10s"
            log.warning("local client refused: %s (%s)", reason, code)
            send({"ok": False, "code": code, "reason": reason, "version": self.version})
            await writer.drain()
            if code in hp.REPLACE:
                self.retire(f"a client found this helper stale: {reason}")
            return
        if req.get("proxy") and not self._same_proxy(req["proxy"]):
            send({"ok": False, "code": hp.OTHER_PROXY, "version": self.version,
                  "reason": f"this helper is connected to {self._proxy_text()}, not {req['proxy']}"})
            await writer.drain()
            return
        send({"ok": True, "pid": os.getpid(), "version": self.version})
        op = req["op"]
        if op == "status":
            send(self.status())
        elif op == "stop":
            self.stop("asked to stop")
        elif op == "cert":
            send(await self._cert(req))
        elif op == "request":
            await self._request(req, writer)
        elif op == "forward":
            await self._forward(req, reader, writer)  # first: no await between the ack and it
        elif op == "dial":
            await self._dial(req, reader, writer)
        await writer.drain()

    def _proxy_text(self) -> str:
        host, port = self.identity.proxy
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _same_proxy(self, given: str) -> bool:
        try:
            return split_host_port(given, "proxy") == tuple(self.identity.proxy)
        except AddressError:
            return False

    def _check_expiry(self) -> None:
        """An expired identity: the same "expired: log in again" error as the direct path."""
        if self.expires and self.expires < time.time():
            self.identity.tls()

    def status(self) -> dict:
        c = self._client
        return {"ok": True, "pid": os.getpid(), "version": self.version, "identity": self.directory,
                "socket": self.path, "proxy": "{}:{}".format(*self.identity.proxy),
                "connected": self._connected(),
                "transport": getattr(c.conn, "transport_name", None) if c and self._connected() else None,
                "sessions": self.sessions, "started": dt.datetime.fromtimestamp(self.started, dt.UTC).isoformat(),
                "idle_seconds": round(time.monotonic() - self.last_active, 1),
                "idle_exit_seconds": self.idle, "retiring": self.retiring}

    @staticmethod
    def _refused(exc: ClientError) -> dict:
        return {"ok": False, "code": exc.code, "reason": str(exc)}

    async def _cert(self, req: dict) -> dict:
        from tunnel import engineer

        try:
            self._check_expiry()
            path = await self._ask(lambda client: engineer.fetch_ssh_cert(
                self.identity, req["device"], req["login"], client=client))
        except ClientError as exc:
            return self._refused(exc)
        return {"ok": True, "path": str(path)}

    async def _renew_cert(self, client: Client, device: str, login: str) -> None:
        """Alongside a dial: renew LOGIN@DEVICE's certificate if it is older than RENEW_AFTER."""
        from tunnel import engineer

        path = engineer.ssh_cert_path(self.identity, device, login)
        with contextlib.suppress(OSError):
            mtime = path.stat().st_mtime
            if time.time() - mtime < RENEW_AFTER and mtime > (Path(self.directory) / "user.crt").stat().st_mtime:
                return  # young, and from this login (one from an earlier login died with it)
        try:
            await engineer.fetch_ssh_cert(self.identity, device, login, client=client, force=True)
        except ClientError as exc:
            log.info("no SSH certificate for %s@%s: %s", login, device, exc)

    async def _dial(self, req: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        device, service = device_from_host(req["device"]), service_from_port(req["service"])
        login = req.get("login")
        renew = None
        try:
            self._check_expiry()
            client = await self.client()
            session = await ResumableSession.open(self.client, device, service, login, _hold(req))
        except ClientError as exc:
            writer.write(hp.encode_line(self._refused(exc)))
            return
        writer.write(hp.encode_line({"ok": True}))
        if login and service == "ssh":
            # after the answer, not beside the dial: this ssh already holds a fresh certificate
            # (its Match exec saw to that); the renewal is for the next one, and must not delay
            # this one's banner on the proxy or on our loop
            renew = asyncio.create_task(self._renew_cert(client, device, login))
        local = FramedEnds(reader, writer)
        try:
            result = await self.splice_session(session, local)  # re-attaches when the tunnel is lost
        except FleetError as exc:  # it could not resume: the hold ran out, or a refusal
            local.cut(str(exc))
            return
        except asyncio.CancelledError:
            local.cut(f"the helper stopped ({self.stopping or 'shutting down'})")
            raise
        finally:
            if renew:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(renew, 5.0)
        if result.error:
            local.cut(f"{result.error} (after {result.a_to_b} bytes from the device)")
        else:
            await writer.drain()


    async def splice_session(self, session: ResumableSession, local: Ends) -> SpliceResult:
        """Carry one session between the tunnel and its local end, both ways, until both ended;
        a cut aborts both ends (``tunnel.splice``), a lost tunnel is re-attached while the
        session's hold lasts (issue 17; FleetError when it could not be). The one place every
        session of the helper — ssh's frames, each forwarded TCP connection — is spliced."""
        self.sessions += 1
        try:
            return await session.splice(local)
        finally:
            self.sessions -= 1

    # --- request: one proxy request on the warm connection -------------------------------------

    async def _request(self, req: dict, writer: asyncio.StreamWriter) -> None:
        try:
            self._check_expiry()
            body = await self._ask(lambda client: client.request(req["name"]))
        except ClientError as exc:
            writer.write(hp.encode_line(self._refused(exc)))
            return
        writer.write(hp.encode_line({"ok": True}))
        writer.write(hp.data_frames(json.dumps(body, separators=(",", ":")).encode()) + hp.frame(hp.END))

    # --- forward: the command's listening socket, served here ----------------------------------

    async def _receive_listener(self, writer: asyncio.StreamWriter) -> socket.socket:
        """The listening TCP socket the client sends right after the ack (``SCM_RIGHTS``).

        The stream's transport reads nothing meanwhile (a plain read would drop the descriptor):
        the one byte is read with ``recvmsg`` on a duplicate of the connection's socket.
        """
        transport = writer.transport
        assert isinstance(transport, asyncio.ReadTransport)  # a Unix socket's: reads and writes
        transport.pause_reading()
        raw = writer.get_extra_info("socket")
        dup = socket.socket(fileno=os.dup(raw.fileno()))

        def receive() -> tuple[bytes, list[int]]:
            dup.settimeout(FD_WAIT)
            msg, fds, _flags, _addr = socket.recv_fds(dup, 1, 4)
            return msg, fds

        try:
            msg, fds = await asyncio.to_thread(receive)
        except OSError as exc:
            raise hp.ProtocolError(f"no listening socket from the client: {exc.strerror or exc}") from None
        finally:
            dup.close()
            transport.resume_reading()
        if msg != hp.FD_BYTE or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise hp.ProtocolError("forward: expected one byte carrying one listening socket")
        listener = socket.socket(fileno=fds[0])
        if (listener.family not in (socket.AF_INET, socket.AF_INET6) or listener.type != socket.SOCK_STREAM
                or not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            listener.close()
            raise hp.ProtocolError("forward: the socket sent is not a listening TCP socket")
        # accepted connections inherit it: a helper killed with -9 resets them, never ends them
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return listener

    async def _forward(self, req: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve ``tunnel forward``/``db``/``kube``'s listening socket while the command is attached.

        The same behaviour as ``tunnel.client.forward`` (a preflight session first; each local
        connection one session; a refused or cut one reset, with one line for the command to
        print; the forward over when the connection to the proxy ends), on the warm connection.
        """
        def send(message: dict) -> None:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(hp.encode_line(message))

        try:
            listener = await self._receive_listener(writer)
        except hp.ProtocolError as exc:
            send({"ok": False, "code": exc.code, "reason": str(exc)})
            return
        device, service, hold = req["device"], req["service"], _hold(req)
        try:
            self._check_expiry()
            client = await self.client()
            if req.get("check", "yes") == "yes":
                await preflight(client, device, service)
        except ClientError as exc:
            listener.close()
            send(self._refused(exc))
            return
        send({"ok": True})
        handlers: set[asyncio.Task] = set()

        def say(peer, what: str) -> None:
            who = "{}:{}".format(*peer[:2]) if peer else "a local connection"
            send({"say": f"tunnel: forward {who} -> {device}/{service}: {what}"})

        async def handle(local_reader: asyncio.StreamReader, local_writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None  # asyncio runs each connection's handler as a task
            handlers.add(task)
            task.add_done_callback(handlers.discard)
            peer = local_writer.get_extra_info("peername")
            clean = False
            try:
                try:
                    session = await ResumableSession.open(self.client, device, service, None, hold,
                                                          lambda line: send({"say": f"tunnel: {line}"}))
                except ClientError as exc:
                    say(peer, f"refused: {exc} (reset the local connection)")
                    return
                try:
                    result = await self.splice_session(session, _SaidFirst(local_reader, local_writer))
                except FleetError as exc:  # could not resume: the hold ran out, or a refusal
                    say(peer, f"{exc} (reset the local connection)")
                    return
                if result.error:
                    say(peer, f"session cut after {result.a_to_b} bytes from the device and "
                              f"{result.b_to_a} to it: {result.error} (reset the local connection)")
                clean = not result.error
            except asyncio.CancelledError:
                pass  # the forward is ending: reset below
            finally:
                if not clean:  # refused, cut, or the forward is ending: a reset, never a FIN
                    reset_on_close(local_writer)
                    local_writer.transport.abort()
                else:
                    reset_on_close(local_writer, False)  # a clean end: a FIN after all
                    with contextlib.suppress(OSError):
                        local_writer.close()

        server = await asyncio.start_server(handle, sock=listener)
        # resumable sessions outlive the warm connection (the next dial or re-attach makes a
        # new one), so the forward ends with the proxy connection only when resuming is off
        lost = asyncio.create_task(self._lost(client) if hold <= 0 else asyncio.Event().wait())
        detached = asyncio.create_task(reader.read(1))  # the command ended (or broke) the handoff
        end: dict | None = None
        try:
            done, _ = await asyncio.wait({lost, detached}, return_when=asyncio.FIRST_COMPLETED)
            if lost in done:
                end = {"end": True, "code": "unreachable",
                       "reason": f"connection to the proxy ended: {lost.result()}"}
                server.close()  # new connections are refused from here, not accepted and reset
                if handlers:  # their streams fail now: let each say why before the end
                    await asyncio.wait(set(handlers), timeout=2.0)
        except asyncio.CancelledError:
            end = {"end": True, "code": "cut",
                   "reason": f"the helper stopped ({self.stopping or 'shutting down'}): open "
                             f"connections to {device}/{service} were reset"}
            raise
        finally:
            lost.cancel()
            detached.cancel()
            server.close()  # stops listening (the command's own copy closes when it exits)
            for task in list(handlers):
                task.cancel()
            if handlers:  # each open connection is reset, and says why
                await asyncio.wait(handlers, timeout=2.0)
            if end:
                send(end)

    @staticmethod
    async def _lost(client: Client) -> str:
        """Why ``client``'s connection is over for a forward (closed, or given up by its watch)."""
        closed = asyncio.ensure_future(client.conn.wait_closed())
        try:
            while not closed.done():
                if client.dead:
                    return client.dead
                await asyncio.wait({closed}, timeout=0.5)
            why = closed.result()
            return client.dead or (str(getattr(why, "reason", None) or why) if why else "closed")
        finally:
            closed.cancel()


def run(identity: UserIdentity, idle: float | None = IDLE) -> int:
    return asyncio.run(Helper(identity, idle=idle).run())
