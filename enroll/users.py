"""Engineers and roles in the registry: invites, passwords (scrypt), optional TOTP, locks.

An invite is a one-time secret shown once and stored hashed; redeeming it sets the password.

Failed logins slow the next attempt down exponentially (each is audited by the caller), so
guessing is expensive while an engineer's typo costs seconds. They are counted per (name,
source address) and, with a much higher ceiling, per name overall (``login_failures``): a flood
of wrong passwords from one address slows that address down, not the engineer logging in from
elsewhere. Counting by *name*, whether or not the account exists, and running scrypt against a
stand-in hash for names without a password, makes unknown and known names look the same: the
same answers, codes and slowdown, and the same cost. A locked account says so only to someone
who proved its password (and TOTP).

Passwords: scrypt N=2^17, r=8, p=1 (128 MiB, ~0.3 s); at most two run at once so a login flood
cannot exhaust the proxy's memory. Hashes made with older parameters still verify and are
replaced at the user's next successful login. A TOTP code is accepted once: the last accepted
time step is stored and a step at or before it is refused, atomically, so two concurrent logins
with one code cannot both win.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import secrets
import struct
import threading
import time

from enroll import audit
from enroll.certs import check_name
from enroll.errors import FleetError
from enroll.registry import Registry, iso, parse_iso
from enroll.repositories import FOREVER, LoginFailures, Roles, User, Users
from enroll.roles import Role, RoleError, parse_roles, role_from_spec

INVITE_TTL = dt.timedelta(hours=24)
MIN_PASSWORD = 10
_SCRYPT = {"n": 2**17, "r": 8, "p": 1}
# Each scrypt at N=2^17, r=8 holds 128 MiB: bound how many run at once (login threads).
_SCRYPT_SLOTS = threading.BoundedSemaphore(2)
_MAX_SCRYPT_N = 2**20  # a stored hash asking for more is refused, not computed
#: failures from one source before the slowdown starts; per name overall the ceiling is higher
FREE_PER_SOURCE = 3
FREE_PER_NAME = 100
#: failure counters with no new failure for this long are dropped
FAILURES_KEPT = dt.timedelta(hours=24)
ALL_SOURCES = LoginFailures.ALL
GENERIC = "unknown user or wrong password"


class UserError(FleetError, ValueError, code="user"):
    """The user action cannot be done; the message says why."""


class LoginError(UserError, code="login"):
    """Login refused. ``retry_after`` is set when the account is being slowed down."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# --- passwords and TOTP -------------------------------------------------------------------------


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    if not (1 < n <= _MAX_SCRYPT_N and 0 < r <= 32 and 0 < p <= 16):
        raise ValueError("unsupported scrypt parameters")
    with _SCRYPT_SLOTS:
        return hashlib.scrypt(password.encode(), salt=salt, dklen=32, n=n, r=r, p=p,
                              maxmem=128 * r * (n + p + 2) + (1 << 20))


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, **_SCRYPT)
    return "scrypt${n}${r}${p}$".format(**_SCRYPT) + base64.b64encode(salt).decode() + "$" + \
        base64.b64encode(digest).decode()


def check_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        _, n, r, p, salt, digest = stored.split("$")
        got = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def needs_rehash(stored: str | None) -> bool:
    """True for a hash made with weaker parameters than today's (upgraded at the next login)."""
    try:
        _, n, r, p, _, _ = (stored or "").split("$")
        return (int(n), int(r), int(p)) != (_SCRYPT["n"], _SCRYPT["r"], _SCRYPT["p"])
    except ValueError:
        return True


# The hash of a random password nobody kept, with today's parameters: checked for names without a
# password, so they cost what a real check costs (a constant, so not even the first one is slower).
_STAND_IN = "scrypt$131072$8$1$rmiscKkGGqGPFlaFwVGrQw==$lYCBSLTmF+EhG3klrda+qiJQVtD5X0ev7rMexTOnwtA="


def _stand_in_hash() -> str:
    return _STAND_IN


def totp(secret_b32: str, at: float | None = None, step: int = 30) -> str:
    """RFC 6238 TOTP (SHA-1, 6 digits), as authenticator apps compute it."""
    counter = int((at if at is not None else time.time()) // step)
    return _totp_at(secret_b32, counter)


def _totp_at(secret_b32: str, counter: int) -> str:
    key = base64.b32decode(secret_b32.upper() + "=" * (-len(secret_b32) % 8))
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF) % 1_000_000
    return f"{code:06d}"


def totp_step(secret_b32: str, code: str, now: float | None = None) -> int | None:
    """The time step (30 s counter) ``code`` belongs to, within one step of clock skew; or None."""
    now = now if now is not None else time.time()
    current = int(now // 30)
    for counter in (current - 1, current, current + 1):
        if hmac.compare_digest(_totp_at(secret_b32, counter), code or ""):
            return counter
    return None


def totp_ok(secret_b32: str, code: str, now: float | None = None) -> bool:
    return totp_step(secret_b32, code, now) is not None


# --- roles --------------------------------------------------------------------------------------


def apply_roles(registry: Registry, text: str, actor: str = "admin") -> list[str]:
    roles = parse_roles(text)
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        for role in roles:
            Roles(db).put(role, text, now)
            audit.append(db, "role.apply", actor=actor, now=now, role=role.name)
    return [r.name for r in roles]


def remove_role(registry: Registry, name: str, actor: str = "admin") -> None:
    with registry.write() as db:
        if not Roles(db).exists(name):
            raise UserError(f"no role {name!r}: see 'enroll role ls'")
        holders = Users(db).holding(name)
        Roles(db).remove(name)
        audit.append(db, "role.remove", actor=actor, role=name, held_by=holders)


def load_roles(registry: Registry, names: list[str] | tuple[str, ...]) -> list[Role]:
    """The current definitions of ``names``; a role that no longer exists grants nothing."""
    return [_parsed(spec) for spec in Roles(registry).specs(names)]


@functools.lru_cache(maxsize=1024)
def _parsed(spec_json: str) -> Role:
    """Roles are re-read on every dial and every second per session: parse each version once."""
    return role_from_spec(json.loads(spec_json))


def list_roles(registry: Registry) -> list[dict]:
    return [{"name": r.name, **r.spec["spec"], "updated_at": r.updated_at} for r in Roles(registry).all()]


# --- users --------------------------------------------------------------------------------------


def get(registry: Registry, name: str) -> User | None:
    return Users(registry).get(name)


def listing(registry: Registry, now: dt.datetime | None = None) -> list[dict]:
    """Every user with its status (``enroll user ls``): no secret, not even a hash."""
    now = now or dt.datetime.now(dt.UTC)
    return [u.summary(now) for u in Users(registry).all()]


def _check_roles_exist(db, roles: list[str]) -> None:
    known = Roles(db).names()
    missing = [r for r in roles if r not in known]
    if missing:
        raise UserError(f"unknown role {missing[0]!r}: apply it first with 'enroll role apply -f FILE'")


def _require(db, name: str) -> Users:
    repo = Users(db)
    if not repo.exists(name):
        raise UserError(f"no user {name!r}: see 'enroll user ls'")
    return repo


def add(registry: Registry, name: str, roles: list[str], *, with_totp: bool = False,
        actor: str = "admin") -> tuple[str, str | None]:
    """Create a user; return (one-time invite, TOTP secret or None)."""
    check_name(name, "user name")
    now = dt.datetime.now(dt.UTC)
    invite = secrets.token_urlsafe(24)
    totp_secret = base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=") if with_totp else None
    with registry.write() as db:
        if Users(db).exists(name):
            raise UserError(f"user {name!r} already exists")
        _check_roles_exist(db, roles)
        Users(db).add(User(name, tuple(sorted(roles)), iso(now), totp_secret=totp_secret,
                           invite_hash=hashlib.sha256(invite.encode()).hexdigest(),
                           invite_expires=iso(now + INVITE_TTL)))
        audit.append(db, "user.add", actor=actor, now=now, user=name, roles=sorted(roles))
    return invite, totp_secret


def set_roles(registry: Registry, name: str, roles: list[str], actor: str = "admin") -> None:
    with registry.write() as db:
        _require(db, name).set_roles(name, roles)
        audit.append(db, "user.roles", actor=actor, user=name, roles=sorted(roles))


def lock(registry: Registry, name: str, ttl: dt.timedelta | None, message: str = "",
         actor: str = "admin") -> None:
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        until = iso(now + ttl) if ttl else FOREVER
        _require(db, name).set_lock(name, until, message or None)
        audit.append(db, "user.lock", actor=actor, now=now, user=name, until=until, message=message or None)


def unlock(registry: Registry, name: str, actor: str = "admin") -> None:
    with registry.write() as db:
        _require(db, name).clear_lock(name)
        audit.append(db, "user.unlock", actor=actor, user=name)


def locked(user: User, now: dt.datetime) -> bool:
    return user.locked(now)


def slowdown(failed: int, free: int = FREE_PER_SOURCE) -> float:
    """Seconds to wait after ``failed`` consecutive failures: free for ``free``, then 2^n s up to 5 min."""
    return 0.0 if failed < free else float(min(300, 2 ** (failed - free + 1)))


def source_of(remote: str | None) -> str:
    """Whom failures are counted against: the address of ``host:port`` (the port changes on
    every connection); for IPv6 its /64, which one subscriber typically holds whole."""
    if not remote:
        return "local"
    host = (remote.rsplit(":", 1)[0] if ":" in remote else remote).strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def _wait_left(registry: Registry, name: str, source: str, now: dt.datetime) -> float:
    """Seconds this (name, source) must still wait: the larger of its own and the name's slowdown.

    The name's slowdown (failures from everywhere together) applies only to a source that has
    failed for this name itself: others cannot lock the user out of a clean address, however
    many addresses they use, while a guesser gets at most one try per new address.
    """
    left = 0.0
    rows = LoginFailures(registry).of(name, source)
    if not any(row_source == source for row_source, _, _ in rows):
        return 0.0
    for row_source, failed, last in rows:
        wait = slowdown(failed, FREE_PER_NAME if row_source == ALL_SOURCES else FREE_PER_SOURCE)
        if wait:
            left = max(left, (last + dt.timedelta(seconds=wait) - now).total_seconds())
    return left


def authenticate(registry: Registry, name: str, *, password: str, invite: str | None = None,
                 totp_code: str | None = None, source: str | None = None,
                 now: dt.datetime | None = None) -> User:
    """Check a login (or redeem an invite, setting the password). Returns the user's record.

    ``source`` is the client's address (see :func:`source_of`). Raises LoginError; a failure is
    counted for (name, source) and for the name, the caller audits it. Until the password (and
    TOTP code) is proven, every answer is the same for a name that exists and one that does not.
    """
    now = now or dt.datetime.now(dt.UTC)
    source = source or "local"
    left = _wait_left(registry, name, source, now)
    if left > 0:
        raise LoginError(f"too many failed logins: retry in {math.ceil(left)} s", retry_after=left)
    user = get(registry, name)
    if invite is not None:
        if not (user is not None and user.invite_hash is not None and user.invite_expires is not None
                and hmac.compare_digest(hashlib.sha256(invite.encode()).hexdigest(), user.invite_hash)
                and parse_iso(user.invite_expires) > now):
            _failed(registry, name, source, now)
            raise LoginError("invite is unknown, used or expired: ask ops for a new one "
                             "('enroll user invite NAME')")
        _refuse_if_locked(user, now)
        if len(password) < MIN_PASSWORD:
            raise LoginError(f"choose a password of at least {MIN_PASSWORD} characters")
        new_hash = hash_password(password)
        with registry.write() as db:
            # the invite is spent exactly once, also when two redeem it at the same moment
            spent = Users(db).redeem_invite(name, user.invite_hash, new_hash)
            if spent:
                LoginFailures(db).clear(name, source)
        if not spent:
            raise LoginError("invite is unknown, used or expired: ask ops for a new one "
                             "('enroll user invite NAME')")
        return _reread(registry, name)
    stored = user.password_hash if user is not None else None
    good = check_password(password, stored or _stand_in_hash())
    if not (good and user is not None and stored):
        _failed(registry, name, source, now)
        raise LoginError(GENERIC)
    step = None
    if user.totp_secret:
        step = totp_step(user.totp_secret, totp_code or "", now.timestamp())
        if step is None:
            _failed(registry, name, source, now)
            raise LoginError("one-time code missing or wrong (pass --totp to be prompted, --totp-file FILE or $FLEET_TOTP)")
    _refuse_if_locked(user, now)
    upgraded = hash_password(password) if needs_rehash(stored) else None
    with registry.write() as db:
        replayed = step is not None and not Users(db).accept_totp_step(name, step)
        if not replayed:
            if upgraded:
                Users(db).replace_password_hash(name, stored, upgraded)
            LoginFailures(db).clear(name, source)
    if replayed:
        _failed(registry, name, source, now)
        raise LoginError("one-time code already used: wait for the next code and log in again")
    return _reread(registry, name)


def _reread(registry: Registry, name: str) -> User:
    """The user's record after a login wrote to it; refused if ops removed the user meanwhile."""
    user = get(registry, name)
    if user is None:
        raise LoginError(GENERIC)
    return user


def _refuse_if_locked(user: User, now: dt.datetime) -> None:
    if user.locked(now):
        raise LoginError(f"user {user.name} is locked" + (f": {user.lock_message}" if user.lock_message else ""))


def _failed(registry: Registry, name: str, source: str, now: dt.datetime) -> None:
    with registry.write() as db:
        LoginFailures(db).record(name, source, now, FAILURES_KEPT)


def ensure_identity(registry: Registry, name: str, roles: list[str], actor: str = "admin") -> list[str]:
    """The user record behind ``enroll user issue``, so every issued identity can be locked.

    A new name gets a record with no password (it cannot log in with one) and ``roles``; an
    existing user keeps the registry's roles, which are what the proxy applies, so asking for
    different ones is refused. Returns the roles to put in the certificate.
    """
    check_name(name, "user name")
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        existing = Users(db).get(name)
        if existing is not None:
            have = list(existing.roles)
            if roles and sorted(roles) != have:
                raise UserError(f"user {name!r} exists with roles {', '.join(have) or 'none'}: the proxy "
                                "applies those; change them with 'enroll user roles' or leave out --role")
            return have
        _check_roles_exist(db, roles)
        Users(db).add(User(name, tuple(sorted(roles)), iso(now)))
        audit.append(db, "user.add", actor=actor, now=now, user=name, roles=sorted(roles),
                     certificate_only=True)
    return sorted(roles)


def new_invite(registry: Registry, name: str, actor: str = "admin") -> str:
    invite = secrets.token_urlsafe(24)
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        _require(db, name).set_invite(name, hashlib.sha256(invite.encode()).hexdigest(), iso(now + INVITE_TTL))
        audit.append(db, "user.invite", actor=actor, now=now, user=name)
    return invite


__all__ = ["RoleError", "UserError", "LoginError"]
