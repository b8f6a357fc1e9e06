"""Issue 13, identity and login items (2, 4, 5, 6, 8, 10, scrypt): each attack is performed
against the real registry or a real proxy, and seen refused, audited and harmless."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import secrets
import signal
import threading

import pytest
from fleet_harness import Fleet, wait_until

from enroll import admin, certs, users
from enroll.cli import main as enroll_main
from enroll.enrollment import RENEWALS_PER_WINDOW, CertRow, plan_renewal, renew, renewal_window
from enroll.repositories import LoginFailures
from enroll.roles import parse_roles, session_ttl
from enroll.state import FleetState
from tunnel import wire
from tunnel.protocol import ALPN_AGENT, ALPN_ENROLL, read_reply
from tunnel.transport import TLSIdentity, TransportError, dial

H = dt.timedelta(hours=1)
NOW = dt.datetime(2026, 12, 2, 8, 0, tzinfo=dt.UTC)


@pytest.fixture
def reg(tmp_path):
    state = FleetState.create(tmp_path / "s", fleet="f", proxy_name="p", proxy_ips=[])
    with state.registry() as r:
        yield r


def _user(reg, name, password="correct horse battery", *, with_totp=False):
    invite, secret = users.add(reg, name, ["admin"], with_totp=with_totp)
    users.authenticate(reg, name, password=password, invite=invite)
    return secret


# --- the wire, as an engineer or an agent speaks it ----------------------------------------------


async def _request(fleet, op, args, *, source="127.0.0.1", identity=None, alpn=ALPN_ENROLL):
    """One request on a fresh connection from ``source``; returns (reply, body)."""
    conn = await dial("127.0.0.1", fleet.proxy_port, transports=("quic",), identity=identity,
                      ca=fleet.state.ca_cert, server_name="proxy.test", alpn=alpn,
                      local_addr=(source, 0), keepalive=None, handshake_timeout=10)
    try:
        stream = await conn.open_stream()
        await stream.write(wire.encode("request", op=op, args=args))
        stream.write_eof()
        return await read_reply(stream, 20)
    finally:
        conn.close(0, "done")


def login(fleet, name, password, *, source="127.0.0.1", **extra):
    args = {"user": name, "password": password, "csr": certs.csr_pem(certs.new_key()), **extra}
    return asyncio.run(_request(fleet, "login", args, source=source))


def _device_identity(directory, cert_pem: bytes | None = None) -> TLSIdentity:
    return TLSIdentity([certs.load_cert(cert_pem or (directory / "device.crt").read_bytes())],
                       certs.load_key((directory / "device.key").read_bytes()),
                       certs.load_cert((directory / "ca.crt").read_bytes()))


def agent_request(fleet, ident, op, **args):
    """(reply, body), or None when the proxy refused the identity."""
    try:
        return asyncio.run(_request(fleet, op, args, identity=ident, alpn=ALPN_AGENT))
    except (TransportError, TimeoutError):
        return None


def _denied(fleet, **fields):
    return [e for e in fleet.audit() if e["type"] == "access.denied"
            and all(e["fields"].get(k) == v for k, v in fields.items())]


# --- item 2: the certificate lifetime is the fleet's, never the user's wish ------------------------


def test_session_ttl_is_capped_by_the_fleet_user_lifetime():
    short = parse_roles("kind: role\nversion: v7\nmetadata: {name: short}\n"
                        "spec: {options: {max_session_ttl: 2h}}\n")
    assert session_ttl([], dt.timedelta(weeks=5000), 8 * H) == 8 * H
    assert session_ttl([], None, 8 * H) == 8 * H
    assert session_ttl([], 1 * H, 8 * H) == 1 * H
    assert session_ttl(short, dt.timedelta(weeks=5000), 8 * H) == 2 * H
    assert session_ttl(short, None, 1 * H) == 1 * H


def test_login_asking_for_a_ten_year_certificate_gets_the_fleet_lifetime(fleet):
    fleet.start_proxy()
    with fleet.state.registry() as reg:
        invite, _ = users.add(reg, "alice", ["admin"])  # admin sets no max_session_ttl
    reply, body = login(fleet, "alice", "a long password", invite=invite, ttl="5000w")
    assert reply["ok"], reply
    cert = certs.load_cert(body["cert"].encode())
    assert cert.not_valid_after_utc <= dt.datetime.now(dt.UTC) + fleet.state.lifetime("user")
    reply, body = login(fleet, "alice", "a long password", ttl="30m")  # shorter still works
    lived = certs.load_cert(body["cert"].encode()).not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert lived <= dt.timedelta(minutes=30)
    logins = [e for e in fleet.audit() if e["type"] == "user.login"]
    assert dt.datetime.fromisoformat(logins[0]["fields"]["not_after"]) <= \
        dt.datetime.now(dt.UTC) + fleet.state.lifetime("user")


# --- item 4: a TOTP code works once ----------------------------------------------------------------


def test_a_totp_code_is_accepted_once(reg):
    secret = _user(reg, "bob", with_totp=True)
    code = users.totp(secret)
    assert users.authenticate(reg, "bob", password="correct horse battery", totp_code=code)
    with pytest.raises(users.LoginError, match="already used"):
        users.authenticate(reg, "bob", password="correct horse battery", totp_code=code)
    # an older code that is still inside the skew window is refused as well
    previous = users.totp(secret, dt.datetime.now(dt.UTC).timestamp() - 30)
    with pytest.raises(users.LoginError, match="already used|one-time code"):
        users.authenticate(reg, "bob", password="correct horse battery", totp_code=previous)
    assert users.get(reg, "bob").totp_last_step is not None


def test_two_concurrent_logins_with_one_code_one_wins(reg):
    secret = _user(reg, "carol", with_totp=True)
    code = users.totp(secret)
    barrier, results = threading.Barrier(2), []

    def attempt():
        with FleetState(reg.path.parent).registry() as own:
            barrier.wait()
            try:
                users.authenticate(own, "carol", password="correct horse battery", totp_code=code)
                results.append("ok")
            except users.LoginError as exc:
                results.append(str(exc))

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results)[0] == "ok" and results.count("ok") == 1, results
    assert any("already used" in r for r in results)


def test_totp_replay_through_the_proxy_is_refused_and_audited(fleet):
    fleet.start_proxy()
    with fleet.state.registry() as reg:
        invite, secret = users.add(reg, "dave", ["admin"], with_totp=True)
    assert login(fleet, "dave", "a long password", invite=invite)[0]["ok"]
    code = users.totp(secret)
    assert login(fleet, "dave", "a long password", totp=code)[0]["ok"]
    reply, _ = login(fleet, "dave", "a long password", totp=code)
    assert not reply["ok"] and reply["code"] == "login_failed" and "already used" in reply["reason"]
    failed = [e for e in fleet.audit() if e["type"] == "user.login.failed"]
    assert failed and "already used" in failed[-1]["reason"]
    assert len([e for e in fleet.audit() if e["type"] == "cert.issue" and e["fields"].get("user") == "dave"]) == 2


# --- scrypt parameters --------------------------------------------------------------------------


def _legacy_hash(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, n=2**14, r=8, p=1)
    return f"scrypt$16384$8$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def test_passwords_use_scrypt_2_17_and_old_hashes_upgrade_at_the_next_login(reg):
    assert users.hash_password("x" * 12).startswith("scrypt$131072$8$1$")
    _user(reg, "erin")
    with reg.write() as db:
        db["users"].update("erin", {"password_hash": _legacy_hash("correct horse battery")})
    with pytest.raises(users.LoginError):
        users.authenticate(reg, "erin", password="wrong password")
    assert users.get(reg, "erin").password_hash.startswith("scrypt$16384$")  # no upgrade on failure
    users.authenticate(reg, "erin", password="correct horse battery")
    upgraded = users.get(reg, "erin").password_hash
    assert upgraded.startswith("scrypt$131072$8$1$")
    assert users.check_password("correct horse battery", upgraded)
    assert users.authenticate(reg, "erin", password="correct horse battery")


# --- item 8: nothing tells known names from unknown ones; others cannot lock a user out -------------


@pytest.fixture
def scrypt_calls(monkeypatch):
    calls = []
    real = hashlib.scrypt

    def counting(*a, **kw):
        calls.append(kw.get("n"))
        return real(*a, **kw)

    monkeypatch.setattr(users.hashlib, "scrypt", counting)
    return calls


def _attempt(reg, name, now, scrypt_calls, **kw):
    del scrypt_calls[:]
    try:
        users.authenticate(reg, name, now=now, source="198.51.100.7", **kw)
        return ("ok", None)
    except users.LoginError as exc:
        return (str(exc), exc.retry_after, tuple(scrypt_calls))


def test_known_and_unknown_names_get_the_same_answers_and_cost_in_every_state(reg, scrypt_calls):
    _user(reg, "frank")
    users.add(reg, "grace", ["admin"])             # invited, no password yet
    _user(reg, "heidi")
    users.lock(reg, "heidi", None, "offboarding")  # locked
    users.ensure_identity(reg, "ivan", ["admin"])  # certificate-only identity, no password
    users._stand_in_hash()
    names = ["frank", "grace", "heidi", "ivan", "nobody"]
    for step in range(6):  # fresh, after failures, slowed down (from step 3 on)
        now = NOW + dt.timedelta(milliseconds=step)
        answers = {n: _attempt(reg, n, now, scrypt_calls, password="wrong password") for n in names}
        assert len(set(answers.values())) == 1, (step, answers)
        if step < 3:
            assert answers["nobody"] == (users.GENERIC, None, (2**17,))
        else:
            assert answers["nobody"][0].startswith("too many failed logins") and answers["nobody"][2] == ()
    later = NOW + dt.timedelta(days=2)  # counters forgotten
    invites = {n: _attempt(reg, n, later, scrypt_calls, password="whatever long", invite="forged")
               for n in names}
    assert len(set(invites.values())) == 1, invites
    # only the right password reveals the lock
    with pytest.raises(users.LoginError, match="locked: offboarding"):
        users.authenticate(reg, "heidi", password="correct horse battery", now=later, source="x")


def test_a_flood_from_one_address_does_not_lock_the_user_out_elsewhere(reg, monkeypatch):
    monkeypatch.setattr(users, "FREE_PER_NAME", 12)  # the real ceiling is 100; same logic, fewer scrypts
    _user(reg, "judy")
    for i in range(30):
        with pytest.raises(users.LoginError):
            users.authenticate(reg, "judy", password="guess", source="203.0.113.66",
                               now=NOW + dt.timedelta(seconds=i))
    with pytest.raises(users.LoginError, match="too many failed logins"):
        users.authenticate(reg, "judy", password="correct horse battery", source="203.0.113.66",
                           now=NOW + dt.timedelta(seconds=31))
    assert users.authenticate(reg, "judy", password="correct horse battery", source="192.0.2.10",
                              now=NOW + dt.timedelta(seconds=31))
    # the real user's success does not forgive the attacker's address
    failed = dict((s, n) for s, n, _ in LoginFailures(reg).of("judy", "203.0.113.66"))["203.0.113.66"]
    assert failed >= users.FREE_PER_SOURCE
    with pytest.raises(users.LoginError, match="too many failed logins"):
        users.authenticate(reg, "judy", password="guess", source="203.0.113.66",
                           now=NOW + dt.timedelta(seconds=31))
    # many addresses together hit the (much higher) per-name ceiling: from then on every
    # address that has failed itself is slowed at once (one guess per new address) ...
    for i in range(users.FREE_PER_NAME):
        with pytest.raises(users.LoginError):
            users.authenticate(reg, "judy", password="guess", source=f"10.0.{i // 250}.{i % 250}",
                               now=NOW + dt.timedelta(seconds=40))
    with pytest.raises(users.LoginError):
        users.authenticate(reg, "judy", password="guess", source="10.9.9.9", now=NOW + dt.timedelta(seconds=41))
    with pytest.raises(users.LoginError, match="too many failed logins"):
        users.authenticate(reg, "judy", password="correct horse battery", source="10.9.9.9",
                           now=NOW + dt.timedelta(seconds=41))
    # ... but an address with no failure of its own is never locked out by the others
    assert users.authenticate(reg, "judy", password="correct horse battery", source="192.0.2.77",
                              now=NOW + dt.timedelta(seconds=41))


def test_login_probing_and_flooding_through_the_proxy(fleet):
    proxy = fleet.start_proxy()
    with fleet.state.registry() as reg:
        invite, _ = users.add(reg, "kim", ["admin"])
    assert login(fleet, "kim", "kims long password", invite=invite)[0]["ok"]

    def shape(reply):
        return reply["ok"], reply["code"], "".join("N" if c.isdigit() else c for c in reply["reason"])

    for _ in range(3):  # wrong passwords: identical for both names
        known = login(fleet, "kim", "wrong password", source="127.0.0.2")[0]
        unknown = login(fleet, "kimberly", "wrong password", source="127.0.0.2")[0]
        assert shape(known) == shape(unknown) == (False, "login_failed", users.GENERIC)
    # a few more failures (written here so no wall-clock race decides the test): slowed down alike
    with fleet.state.registry() as reg, reg.write() as db:
        db.execute("UPDATE login_failures SET failed = 10 WHERE source = '127.0.0.2'")
    known = login(fleet, "kim", "kims long password", source="127.0.0.2")[0]
    unknown = login(fleet, "kimberly", "kims long password", source="127.0.0.2")[0]
    assert shape(known) == shape(unknown) == (False, "login_failed", "too many failed logins: retry in NNN s")
    # the flood from 127.0.0.2 does not stop kim on 127.0.0.1
    reply, _ = login(fleet, "kim", "kims long password", source="127.0.0.1")
    assert reply["ok"], reply
    # known names: one event per failure; unknown names are summed up per source (the proxy's
    # anonymous-refusal summary, written when its minute ends or at shutdown)
    failed = [e for e in fleet.audit() if e["type"] == "user.login.failed"]
    assert len(failed) == 4 and {e["actor"] for e in failed} == {"user:kim"}
    assert {e["fields"]["remote"].rsplit(":", 1)[0] for e in failed} == {"127.0.0.2"}
    fleet.stop(proxy, signal.SIGTERM)
    summaries = [e for e in fleet.audit() if e["type"] == "anonymous.refused"]
    assert sum(e["fields"]["codes"].get("login_unknown_user", 0) for e in summaries) == 4


# --- items 5 and 6: renewal ---------------------------------------------------------------------------


def test_renewal_plan():
    life = dt.timedelta(days=30)
    used = CertRow("a", NOW - 20 * 24 * H, NOW - 20 * 24 * H)
    lost = CertRow("b", NOW - H)
    assert plan_renewal([used], [], NOW, life).allowed
    assert plan_renewal([used, lost], [NOW - H], NOW, life).supersede == ("b",)
    # an unused certificate older than the one in use is not this renewal's business
    assert plan_renewal([CertRow("c", NOW - 21 * 24 * H), used], [], NOW, life).supersede == ()
    many = [NOW - dt.timedelta(minutes=i) for i in range(RENEWALS_PER_WINDOW)]
    plan = plan_renewal([used], many, NOW, life)
    assert not plan.allowed and "renewal limit reached" in plan.reason and plan.retry_after > dt.timedelta(0)
    old = [NOW - renewal_window(life) - dt.timedelta(seconds=1)] * 10
    assert plan_renewal([used], old, NOW, life).allowed


def _live_device_certs(fleet, device_id):
    with fleet.state.registry() as reg:
        return [c for c in admin.list_certs(reg, device=device_id) if c["status"] == "valid"]


def test_renewal_supersedes_the_old_certificate_and_a_lost_reply_does_not_strand_the_device(fleet):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {})
    d = config.parent
    fleet.start_proxy()
    original = (d / "device.crt").read_bytes()
    key = certs.load_key((d / "device.key").read_bytes())
    p0 = _device_identity(d)

    # renewal 1: the reply is "lost" (we drop it); the device still holds only p0
    reply, _ = agent_request(fleet, p0, "renew", csr=certs.csr_pem(key))
    assert reply["ok"]
    assert len(_live_device_certs(fleet, "robot-1")) == 2
    # p0 still connects, and may renew again: the lost successor is replaced, not piled up
    reply, body = agent_request(fleet, p0, "renew", csr=certs.csr_pem(key))
    assert reply["ok"]
    assert len(_live_device_certs(fleet, "robot-1")) == 2
    p1 = _device_identity(d, body["cert"].encode())
    # the device connects with its new certificate: every older one is superseded (by the
    # connect's registry write, queued while the agent's hello is already answered)
    assert agent_request(fleet, p1, "hello")[0]["ok"]
    newest = [format(certs.load_cert(body["cert"].encode()).serial_number, "x")]
    wait_until(lambda: [c["serial"] for c in _live_device_certs(fleet, "robot-1")] == newest, 10, 0.05,
               "the older certificates superseded")
    # the attack: a copy of the old certificate is refused, with a code, audited
    assert agent_request(fleet, _device_identity(d, original), "hello") is None
    serial0 = format(certs.load_cert(original).serial_number, "x")
    wait_until(lambda: _denied(fleet, code="revoked", stage="connect"), 10, 0.1, "audited refusal")
    assert serial0 in _denied(fleet, code="revoked")[0]["reason"]
    revokes = [e for e in fleet.audit() if e["type"] == "cert.revoke"]
    assert {e["reason"] for e in revokes} == {"superseded"}
    assert serial0 in revokes[-1]["fields"]["serials"]
    assert agent_request(fleet, p1, "hello")[0]["ok"]  # the current one keeps working


def test_renewal_flood_is_limited_with_a_clear_reason_and_audited(fleet):
    config = fleet.enroll_device("robot-2", {"customer": "acme"}, {})
    d = config.parent
    fleet.start_proxy()
    ident = _device_identity(d)
    csr = certs.csr_pem(certs.load_key((d / "device.key").read_bytes()))

    async def flood():
        conn = await dial("127.0.0.1", fleet.proxy_port, transports=("quic",), identity=ident,
                          ca=fleet.state.ca_cert, server_name="proxy.test", alpn=ALPN_AGENT,
                          keepalive=None)
        replies = []
        try:
            for _ in range(50):
                stream = await conn.open_stream()
                await stream.write(wire.encode("request", op="renew", args={"csr": csr}))
                stream.write_eof()
                replies.append((await read_reply(stream, 20))[0])
        finally:
            conn.close(0, "done")
        return replies

    replies = asyncio.run(flood())
    ok = [r for r in replies if r["ok"]]
    refused = [r for r in replies if not r["ok"]]
    assert len(ok) == RENEWALS_PER_WINDOW and len(refused) == 50 - RENEWALS_PER_WINDOW
    assert {r["code"] for r in refused} == {"renewal_limited"}
    assert "renewal limit reached" in refused[0]["reason"] and "retry in" in refused[0]["reason"]
    assert len(_live_device_certs(fleet, "robot-2")) == 2  # the one in use + the newest successor
    issued = [e for e in fleet.audit() if e["type"] == "cert.issue" and e["fields"].get("renewal")]
    assert len(issued) == RENEWALS_PER_WINDOW
    wait_until(lambda: len(_denied(fleet, code="renewal_limited")) == len(refused), 10, 0.1, "audit")
    assert _denied(fleet, code="renewal_limited")[0]["fields"]["stage"] == "agent-request"


@pytest.mark.parametrize("csr", ["garbage", ""])
def test_a_bad_renewal_request_is_answered_with_a_code_and_audited(fleet, csr):
    config = fleet.enroll_device("robot-3", {"customer": "acme"}, {})
    fleet.start_proxy()
    reply, _ = agent_request(fleet, _device_identity(config.parent), "renew", csr=csr)
    assert not reply["ok"] and reply["code"] == "bad_csr" and "malformed CSR" in reply["reason"]
    wait_until(lambda: _denied(fleet, code="bad_csr"), 10, 0.1, "audited refusal")
    assert len(_live_device_certs(fleet, "robot-3")) == 1  # nothing issued
    assert agent_request(fleet, _device_identity(config.parent), "hello")[0]["ok"]  # still serving


def test_renewal_in_the_registry_refuses_unknown_devices(fleet):
    with fleet.state.registry() as reg, pytest.raises(Exception, match="not enrolled") as err:
        renew(fleet.state, reg, "ghost", certs.csr_pem(certs.new_key()))
    assert err.value.code == "unknown_identity"


def test_a_real_agent_renews_and_its_old_certificate_is_then_refused(tmp_path):
    # 60 s of life after a 5-minute backdate: the agent renews as soon as it connects
    fleet = Fleet(tmp_path, device_lifetime="60s")
    try:
        config = fleet.enroll_device("robot-4", {"customer": "acme"}, {})
        d = config.parent
        old = (d / "device.crt").read_bytes()
        fleet.start_proxy()
        agent = fleet.start_agent(config)
        wait_until(lambda: (d / "device.crt").read_bytes() != old, 15, 0.1, "renewed certificate")
        fleet.stop(agent)
        fleet.processes.remove(agent)
        renewed = certs.load_cert((d / "device.crt").read_bytes())
        fleet.start_agent(config)  # reconnects with the renewed certificate
        serial = format(renewed.serial_number, "x")
        wait_until(lambda: any(e["type"] == "cert.revoke" and e["fields"].get("superseded_by") == serial
                               for e in fleet.audit()), 15, 0.1, "old certificate superseded")
        assert agent_request(fleet, _device_identity(d, old), "hello") is None
        wait_until(lambda: _denied(fleet, code="revoked", stage="connect"), 10, 0.1, "audited refusal")
    finally:
        fleet.close()


# --- item 10: every issued identity is lockable; certificates can be revoked ------------------------


def _cli(fleet, *args):
    return enroll_main(["--state", str(fleet.state.root), *args])


def test_issued_identity_is_lockable_and_its_certificates_revocable(fleet, capsys):
    fleet.start_proxy()
    ops = fleet.user("ops", ["admin"])
    assert fleet.tunnel("ls", identity=ops).returncode == 0
    assert _cli(fleet, "user", "lock", "ops", "--message", "rotation") == 0
    out = fleet.tunnel("ls", identity=ops)
    assert out.returncode == 1 and b"locked" in out.stderr
    assert _cli(fleet, "user", "unlock", "ops") == 0
    assert fleet.tunnel("ls", identity=ops).returncode == 0
    # a certificate-only identity cannot log in with a password
    assert not login(fleet, "ops", "any password at all")[0]["ok"]

    capsys.readouterr()
    assert _cli(fleet, "cert", "ls", "--user", "ops", "--format", "json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["status"] for c in listed] == ["valid"] and listed[0]["kind"] == "user"
    assert _cli(fleet, "cert", "revoke", listed[0]["serial"], "--message", "laptop lost") == 0
    out = fleet.tunnel("ls", identity=ops)
    assert out.returncode == 1
    # refused where the proxy next sees the certificate: a new connection ("connect"), or the
    # next stream of the per-user helper's warm connection ("stream"), which it then closes
    wait_until(lambda: _denied(fleet, code="revoked", stage="connect") or _denied(fleet, code="revoked", stage="stream"),
               10, 0.1, "audited refusal")
    revoke = [e for e in fleet.audit() if e["type"] == "cert.revoke"][-1]
    assert revoke["fields"]["serials"] == [listed[0]["serial"]] and revoke["reason"] == "laptop lost"
    assert revoke["actor"].startswith("admin:")
    # refused and nothing changed
    assert _cli(fleet, "cert", "revoke", listed[0]["serial"]) == 1
    assert _cli(fleet, "cert", "revoke", "not-hex") == 1
    assert _cli(fleet, "cert", "revoke", "abcdef0123") == 1
    assert _cli(fleet, "cert", "revoke") == 1

    # by user: every valid certificate of that user
    fleet.user("ops", [], ttl="1h")
    fleet.user("ops", ["admin"], ttl="1h")
    assert _cli(fleet, "cert", "revoke", "--user", "ops") == 0
    capsys.readouterr()
    assert _cli(fleet, "cert", "ls", "--user", "ops", "--format", "json") == 0
    assert {c["status"] for c in json.loads(capsys.readouterr().out)} == {"revoked"}
    assert _cli(fleet, "cert", "revoke", "--user", "ops") == 1  # none left
    # asking for other roles than the registry's is refused, not silently ignored
    assert _cli(fleet, "user", "issue", "ops", "--role", "nobody", "--dir", str(fleet.root / "x")) == 1
    with fleet.state.registry() as reg:
        from enroll import audit
        assert audit.verify(reg) is None


def test_device_certificate_revoked_by_serial_is_refused(fleet, capsys):
    config = fleet.enroll_device("robot-5", {"customer": "acme"}, {})
    fleet.start_proxy()
    ident = _device_identity(config.parent)
    assert agent_request(fleet, ident, "hello")[0]["ok"]
    capsys.readouterr()
    assert _cli(fleet, "cert", "ls", "--device", "robot-5", "--format", "json") == 0
    serial = json.loads(capsys.readouterr().out)[0]["serial"]
    assert _cli(fleet, "cert", "revoke", serial.upper()) == 0
    assert agent_request(fleet, ident, "hello") is None
    wait_until(lambda: _denied(fleet, code="revoked", stage="connect"), 10, 0.1, "audited refusal")


def test_identities_issued_before_v4_get_a_lockable_record(tmp_path, monkeypatch):
    from enroll import audit
    from enroll import registry as registry_module

    state = FleetState.create(tmp_path / "s", fleet="f", proxy_name="p", proxy_ips=[])
    state.registry_path.unlink()
    monkeypatch.setattr(registry_module, "MIGRATIONS", registry_module.MIGRATIONS[:3])
    with registry_module.Registry(state.registry_path) as reg:
        with reg.write() as db:  # what `enroll user issue` recorded before v4: a certificate, no user
            db["certs"].insert({"serial": "abc", "kind": "user", "subject": "legacy-ops",
                                "issued_at": registry_module.iso(NOW), "not_after": "9999", "revoked_at": None})
            audit.append(db, "cert.issue", actor="admin:root", actor_roles=["admin"], kind="user",
                         user="legacy-ops", serial="abc")
        assert users.get(reg, "legacy-ops") is None
    monkeypatch.undo()
    with state.registry() as reg:
        assert users.get(reg, "legacy-ops").roles == ("admin",)
        users.lock(reg, "legacy-ops", None, "moved on")
        assert users.locked(users.get(reg, "legacy-ops"), dt.datetime.now(dt.UTC))


def test_revoking_the_certificate_in_use_cuts_the_open_session(fleet, echo):
    import time

    from tunnel.client import Client, UserIdentity

    config = fleet.enroll_device("robot-6", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"})
    fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-6")
    serial = format(certs.load_cert((ops / "user.crt").read_bytes()).serial_number, "x")

    async def hold():
        client = await Client.connect(UserIdentity.load(ops))
        stream, _ = await client.dial("robot-6", "echo")
        revoked_at = None
        try:
            for _ in range(100):
                await stream.write(b"x")
                if not await stream.read(10):
                    break
                if revoked_at is None:
                    await asyncio.to_thread(_cli, fleet, "cert", "revoke", serial)
                    revoked_at = time.monotonic()
                await asyncio.sleep(0.1)
            else:
                return None
        except TransportError:
            pass
        finally:
            client.close()
        return time.monotonic() - revoked_at

    held = asyncio.run(hold())
    assert held is not None  # the session ended (within ~10 s here; the proxy re-checks each second)
    ends = [e for e in fleet.audit() if e["type"] == "session.end"]
    assert ends and "revoked" in ends[-1]["reason"]


def test_the_stand_in_hash_costs_what_a_real_one_costs():
    assert not users.needs_rehash(users._stand_in_hash())


def test_failures_are_counted_per_address_and_per_ipv6_64():
    assert users.source_of("198.51.100.7:50123") == "198.51.100.7"
    assert users.source_of("2001:db8:1:2:aaaa::1:443") == users.source_of("2001:db8:1:2:bbbb::9:80") \
        == "2001:db8:1:2::/64"
    assert users.source_of("::ffff:198.51.100.7:443") == "198.51.100.7"
    assert users.source_of(None) == "local"
