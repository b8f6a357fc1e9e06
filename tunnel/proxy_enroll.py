"""The proxy's anonymous side: one enrollment or login request per ``fleet-enroll/1`` connection.

Rate-limited per source and for all anonymous peers together before any work is done; refusals
that say nothing about a real identity are tallied and audited as summaries
(``anonymous.refused``, written by the proxy's refusal loop). The CA work (enrollment: a CSR
signed against a join token; login: scrypt, then a short-lived user certificate) runs off the
event loop on its own registry connection (the ``_*_in_thread`` helpers), logins on their own
small thread pool. It shares the proxy's state through :class:`tunnel.proxy_core.ProxyCore`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import TYPE_CHECKING

from enroll.enrollment import enroll
from enroll.request import EnrollError, parse_request
from enroll.state import FleetState
from tunnel import wire
from tunnel.protocol import HEADER_TIMEOUT, read_header, reply_with_body
from tunnel.proxy_core import ProxyCore, finish, try_write
from tunnel.ratelimit import source_of
from tunnel.transport import Connection, Stream, TransportError

if TYPE_CHECKING:
    from enroll.users import User

#: Threads that run login password checks (each scrypt holds 128 MiB; see enroll.users), and
#: how many logins may wait for one before new ones are refused ``busy``.
LOGIN_THREADS = 2
MAX_PENDING_LOGINS = 16


class OnlineEnrollment:
    """Serves anonymous connections for the proxy (``proxy``: the state they share)."""

    def __init__(self, proxy: ProxyCore):
        self.proxy = proxy
        # logins run scrypt off the event loop on their own threads, so a login flood never
        # takes the default executor that renewals, enrollments and the writer's close use
        self._login_pool = concurrent.futures.ThreadPoolExecutor(LOGIN_THREADS, thread_name_prefix="login")
        self._logins_pending = 0

    def close(self) -> None:
        """Stop the login threads (at proxy stop): queued logins are dropped."""
        self._login_pool.shutdown(wait=False, cancel_futures=True)

    async def serve(self, conn: Connection) -> None:
        """One anonymous request per connection: an enrollment or a login, both rate-limited.

        Two limits apply before any work is done: per source address (``enroll_limiter``) and
        for all anonymous peers together (``anonymous_limiter``), so a flood from many addresses
        cannot keep the CA, scrypt or the audit log busy. Refusals that say nothing about a real
        identity (a limit, a malformed request, a token whose id this fleet never issued, no
        request at all) are counted in ``refusals`` and audited as one ``anonymous.refused``
        event per source per window (see :meth:`tunnel.proxy.Proxy._audit_refusals`). An enrollment whose token id
        exists goes on to the CA step, which audits a refusal on its own
        (``device.enroll.denied``): someone holds or guesses a real token. Login refusals are
        audited by :meth:`_login`. A refused request never spends a token.
        """
        remote = "{}:{}".format(*conn.remote_address[:2])
        # an IPv6 host holds a whole /64: limit and count it as one source, not per address
        source = source_of(conn.remote_address[0])
        try:
            stream = await asyncio.wait_for(conn.accept_stream(), HEADER_TIMEOUT)
        except (TransportError, TimeoutError):
            self.proxy.refusals.note(source, "no_request")
            conn.close(0, "no enrollment request")
            return
        try:
            if not self.proxy.enroll_limiter.allow(source):
                raise _Tallied("rate_limited", "too many enrollment or login attempts from this "
                                               "address; wait a few seconds and retry")
            if not self.proxy.anonymous_limiter.allow():
                raise _Tallied("busy", "the proxy is refusing enrollments and logins for a moment "
                                       "(too many at once); retry in a few seconds")
            try:
                msg, _ = await read_header(stream)
            except (wire.HeaderError, TimeoutError) as exc:
                raise _Tallied(getattr(exc, "code", "timeout"), str(exc) or "timeout") from None
            if msg.kind == "request" and msg["op"] == "login":
                await self._login(stream, msg.get("args", {}), remote)
            elif msg.kind != "request" or msg["op"] != "enroll":
                raise _Tallied("bad_request", "this connection only accepts an enrollment or login request")
            else:
                args = msg.get("args", {})
                try:
                    request = parse_request(str(args.get("request", "")).encode())
                except EnrollError as exc:
                    raise _Tallied("bad_request", str(exc)) from None
                token = str(args.get("token", ""))
                self._check_token_id(token)
                bundle = await asyncio.to_thread(_enroll_in_thread, self.proxy.state, request, token, remote)
                await stream.write(reply_with_body(bundle))
        except _Tallied as exc:
            self.proxy.refusals.note(source, exc.code)
            await try_write(stream, wire.reply_refused("enroll_refused", str(exc)))
        except (EnrollError, wire.HeaderError, TimeoutError) as exc:  # audited by the CA step
            await try_write(stream, wire.reply_refused("enroll_refused", str(exc) or "timeout"))
        except TransportError:
            return
        finish(stream)
        await asyncio.sleep(0.2)  # let the reply leave before the connection is closed
        conn.close(0, "enrollment done")

    def _check_token_id(self, token: str) -> None:
        """Raise _Tallied unless ``token`` is well-formed, for this fleet, with an issued id.

        The answer for an unknown id is the CA step's own wording, so the reply does not tell
        which ids exist.
        """
        from enroll import tokens

        try:
            parsed = tokens.parse(token, self.proxy.fleet)
        except tokens.TokenError as exc:
            raise _Tallied("bad_token", str(exc)) from None
        if not tokens.issued(self.proxy.registry, parsed.id):
            raise _Tallied("unknown_token", "unknown join token: it was never issued by this fleet, "
                                            "or mistyped")


    async def _login(self, stream: Stream, args: dict, remote: str) -> None:
        """Password (+TOTP) or one-time invite → a short-lived user certificate for a local key."""
        from enroll import certs, users
        from enroll.durations import parse_duration
        from enroll.enrollment import issue_user
        from enroll.roles import session_ttl

        name = str(args.get("user", ""))
        if self._logins_pending >= MAX_PENDING_LOGINS:
            # each login costs a 128 MiB scrypt on one of LOGIN_THREADS threads: queue no deeper
            raise _Tallied("busy", "the proxy is refusing logins for a moment (too many at once); "
                                   "retry in a few seconds")
        try:
            public_key = certs.check_csr(str(args.get("csr", "")))
            self._logins_pending += 1
            try:
                user = await asyncio.get_running_loop().run_in_executor(
                    self._login_pool, _authenticate_in_thread, self.proxy.state, name,
                    str(args.get("password", "")), args.get("invite"), args.get("totp"),
                    users.source_of(remote))
            finally:
                self._logins_pending -= 1
            roles = users.load_roles(self.proxy.registry, list(user.roles))
            requested = parse_duration(str(args["ttl"])) if args.get("ttl") else None
            # never longer than the fleet's user lifetime; roles' max_session_ttl shorten it
            ttl = session_ttl(roles, requested, self.proxy.state.lifetime("user"))
            cert = issue_user(self.proxy.state, self.proxy.registry, name, public_key, list(user.roles), ttl,
                              actor=f"user:{name}", origin="login")
            self.proxy.policy.changed()  # written on the proxy's own connection: its next connect must see it
        except (users.LoginError, certs.CertError, ValueError) as exc:
            if users.get(self.proxy.registry, name) is None:
                # a name with no account: summed up per source like other anonymous refusals
                # (the reply is the same as for a real account, so nothing leaks to the peer)
                self.proxy.refusals.note(remote.rpartition(":")[0].strip("[]"), "login_unknown_user")
            else:
                await self.proxy.audit("user.login.failed", actor=f"user:{name or '?'}", result="denied",
                            reason=str(exc), remote=remote)
            await try_write(stream, wire.reply_refused("login_failed", str(exc)))
            finish(stream)
            return
        await self.proxy.audit("user.login", actor=f"user:{name}", actor_roles=list(user.roles), remote=remote,
                    not_after=cert.not_valid_after_utc.isoformat(), invite=args.get("invite") is not None)
        await try_write(stream, reply_with_body({
            "cert": certs.cert_pem(cert).decode(), "ca": certs.cert_pem(self.proxy.state.ca_cert).decode(),
            "ssh_host_ca": self.proxy.state.ssh_ca_public("host"), "roles": list(user.roles),
            "server_name": self.proxy.state.config["proxy_name"],
        }))
        finish(stream)


def _enroll_in_thread(state: FleetState, request: dict, token: str, remote: str) -> dict:
    # SQLite connections belong to one thread: open a registry just for this enrollment.
    with state.registry() as reg:
        return enroll(state, reg, request, token, remote=remote)


def _authenticate_in_thread(state, name, password, invite, totp_code, source=None) -> User:
    from enroll import users

    with state.registry() as reg:  # scrypt takes ~0.3 s: keep it off the event loop
        return users.authenticate(reg, name, password=password, invite=invite, totp_code=totp_code,
                                  source=source)


class _Tallied(EnrollError):
    """An anonymous refusal counted in ``Proxy.refusals`` (audited as a summary, not alone)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
