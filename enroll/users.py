"""Engineers and roles in the registry: invites, passwords (scrypt), optional TOTP, locks.

An invite is a one-time secret shown once and stored hashed; redeeming it sets the password.
Failed logins are counted and slow the next attempt down exponentially (and each is audited by
the caller), so guessing is expensive while an engineer's typo costs seconds.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import hmac
import json
import secrets
import struct
import time

from enroll import audit
from enroll.certs import check_name
from enroll.registry import Registry, iso, parse_iso
from enroll.roles import Role, RoleError, parse_roles, role_from_spec

INVITE_TTL = dt.timedelta(hours=24)
MIN_PASSWORD = 10
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class UserError(ValueError):
    """The user action cannot be done; the message says why."""


class LoginError(UserError):
    """Login refused. ``retry_after`` is set when the account is being slowed down."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# --- passwords and TOTP -------------------------------------------------------------------------


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt${n}${r}${p}$".format(**_SCRYPT) + base64.b64encode(salt).decode() + "$" + \
        base64.b64encode(digest).decode()


def check_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    _, n, r, p, salt, digest = stored.split("$")
    got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), dklen=32,
                         n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(got, base64.b64decode(digest))


def totp(secret_b32: str, at: float | None = None, step: int = 30) -> str:
    """RFC 6238 TOTP (SHA-1, 6 digits), as authenticator apps compute it."""
    key = base64.b32decode(secret_b32.upper() + "=" * (-len(secret_b32) % 8))
    counter = int((at if at is not None else time.time()) // step)
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF) % 1_000_000
    return f"{code:06d}"


def totp_ok(secret_b32: str, code: str, now: float | None = None) -> bool:
    now = now if now is not None else time.time()
    return any(hmac.compare_digest(totp(secret_b32, now + d * 30), code or "") for d in (-1, 0, 1))


# --- roles --------------------------------------------------------------------------------------


def apply_roles(registry: Registry, text: str, actor: str = "admin") -> list[str]:
    roles = parse_roles(text)
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        for role in roles:
            db["roles"].upsert({"name": role.name, "spec": json.dumps(role.to_spec()),
                                "source": text, "updated_at": iso(now)}, pk="name")
            audit.append(db, "role.apply", actor=actor, now=now, role=role.name)
    return [r.name for r in roles]


def remove_role(registry: Registry, name: str, actor: str = "admin") -> None:
    with registry.write() as db:
        if not db["roles"].count_where("name = ?", [name]):
            raise UserError(f"no role {name!r}: see 'enroll role ls'")
        holders = [u["name"] for u in db["users"].rows if name in json.loads(u["roles"])]
        db["roles"].delete(name)
        audit.append(db, "role.remove", actor=actor, role=name, held_by=holders)


def load_roles(registry: Registry, names: list[str] | tuple[str, ...]) -> list[Role]:
    """The current definitions of ``names``; a role that no longer exists grants nothing."""
    if not names:
        return []
    rows = registry.db["roles"].rows_where(f"name IN ({','.join('?' * len(names))})", list(names))
    return [_parsed(r["spec"]) for r in rows]


@functools.lru_cache(maxsize=1024)
def _parsed(spec_json: str) -> Role:
    """Roles are re-read on every dial and every second per session: parse each version once."""
    return role_from_spec(json.loads(spec_json))


def list_roles(registry: Registry) -> list[dict]:
    return [{"name": r["name"], **json.loads(r["spec"])["spec"], "updated_at": r["updated_at"]}
            for r in registry.db["roles"].rows_where(order_by="name")]


# --- users --------------------------------------------------------------------------------------


def get(registry: Registry, name: str) -> dict | None:
    rows = list(registry.db["users"].rows_where("name = ?", [name]))
    if not rows:
        return None
    row = dict(rows[0])
    row["roles"] = json.loads(row["roles"])
    return row


def add(registry: Registry, name: str, roles: list[str], *, with_totp: bool = False,
        actor: str = "admin") -> tuple[str, str | None]:
    """Create a user; return (one-time invite, TOTP secret or None)."""
    check_name(name, "user name")
    now = dt.datetime.now(dt.UTC)
    invite = secrets.token_urlsafe(24)
    totp_secret = base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=") if with_totp else None
    with registry.write() as db:
        if db["users"].count_where("name = ?", [name]):
            raise UserError(f"user {name!r} already exists")
        known = {r["name"] for r in db["roles"].rows}
        missing = [r for r in roles if r not in known]
        if missing:
            raise UserError(f"unknown role {missing[0]!r}: apply it first with 'enroll role apply -f FILE'")
        db["users"].insert({
            "name": name, "roles": json.dumps(sorted(roles)), "password_hash": None,
            "totp_secret": totp_secret, "invite_hash": hashlib.sha256(invite.encode()).hexdigest(),
            "invite_expires": iso(now + INVITE_TTL), "created_at": iso(now), "locked_until": None,
            "lock_message": None, "failed_logins": 0, "last_failed_at": None,
        })
        audit.append(db, "user.add", actor=actor, now=now, user=name, roles=sorted(roles))
    return invite, totp_secret


def set_roles(registry: Registry, name: str, roles: list[str], actor: str = "admin") -> None:
    with registry.write() as db:
        if not db["users"].count_where("name = ?", [name]):
            raise UserError(f"no user {name!r}: see 'enroll user ls'")
        db["users"].update(name, {"roles": json.dumps(sorted(roles))})
        audit.append(db, "user.roles", actor=actor, user=name, roles=sorted(roles))


def lock(registry: Registry, name: str, ttl: dt.timedelta | None, message: str = "",
         actor: str = "admin") -> None:
    from enroll.admin import FOREVER

    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        if not db["users"].count_where("name = ?", [name]):
            raise UserError(f"no user {name!r}: see 'enroll user ls'")
        until = iso(now + ttl) if ttl else FOREVER
        db["users"].update(name, {"locked_until": until, "lock_message": message or None})
        audit.append(db, "user.lock", actor=actor, now=now, user=name, until=until, message=message or None)


def unlock(registry: Registry, name: str, actor: str = "admin") -> None:
    with registry.write() as db:
        if not db["users"].count_where("name = ?", [name]):
            raise UserError(f"no user {name!r}: see 'enroll user ls'")
        db["users"].update(name, {"locked_until": None, "lock_message": None, "failed_logins": 0})
        audit.append(db, "user.unlock", actor=actor, user=name)


def locked(user: dict, now: dt.datetime) -> bool:
    return bool(user.get("locked_until")) and parse_iso(user["locked_until"]) > now


def slowdown(failed: int) -> float:
    """Seconds to wait after ``failed`` consecutive failures: free for 3, then 2^n s up to 5 min."""
    return 0.0 if failed < 3 else float(min(300, 2 ** (failed - 2)))


def authenticate(registry: Registry, name: str, *, password: str, invite: str | None = None,
                 totp_code: str | None = None, now: dt.datetime | None = None) -> dict:
    """Check a login (or redeem an invite, setting the password). Returns the user row.

    Raises LoginError; the failure is counted, the caller audits it.
    """
    now = now or dt.datetime.now(dt.UTC)
    user = get(registry, name)
    generic = "unknown user or wrong password"
    if user is None:
        raise LoginError(generic)
    wait = slowdown(user["failed_logins"])
    if wait and user["last_failed_at"]:
        left = (parse_iso(user["last_failed_at"]) + dt.timedelta(seconds=wait) - now).total_seconds()
        if left > 0:
            raise LoginError(f"too many failed logins: retry in {left:.0f} s", retry_after=left)
    if locked(user, now):
        raise LoginError(f"user {name} is locked" + (f": {user['lock_message']}" if user["lock_message"] else ""))
    if invite is not None:
        ok = (user["invite_hash"] is not None
              and hmac.compare_digest(hashlib.sha256(invite.encode()).hexdigest(), user["invite_hash"])
              and parse_iso(user["invite_expires"]) > now)
        if not ok:
            _failed(registry, name, now)
            raise LoginError("invite is unknown, used or expired: ask ops for a new one "
                             "('enroll user invite NAME')")
        if len(password) < MIN_PASSWORD:
            raise LoginError(f"choose a password of at least {MIN_PASSWORD} characters")
        with registry.write() as db:
            db["users"].update(name, {"password_hash": hash_password(password), "invite_hash": None,
                                      "invite_expires": None, "failed_logins": 0})
    else:
        good = check_password(password, user["password_hash"])
        if good and user["totp_secret"] and not totp_ok(user["totp_secret"], totp_code or ""):
            _failed(registry, name, now)
            raise LoginError("one-time code missing or wrong (pass --totp CODE)")
        if not good:
            _failed(registry, name, now)
            raise LoginError(generic)
        if user["failed_logins"]:
            with registry.write() as db:
                db["users"].update(name, {"failed_logins": 0})
    return get(registry, name)


def _failed(registry: Registry, name: str, now: dt.datetime) -> None:
    with registry.write() as db:
        db.execute("UPDATE users SET failed_logins = failed_logins + 1, last_failed_at = ? WHERE name = ?",
                   [iso(now), name])


def new_invite(registry: Registry, name: str, actor: str = "admin") -> str:
    invite = secrets.token_urlsafe(24)
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        if not db["users"].count_where("name = ?", [name]):
            raise UserError(f"no user {name!r}: see 'enroll user ls'")
        db["users"].update(name, {"invite_hash": hashlib.sha256(invite.encode()).hexdigest(),
                                  "invite_expires": iso(now + INVITE_TTL)})
        audit.append(db, "user.invite", actor=actor, now=now, user=name)
    return invite


__all__ = ["RoleError", "UserError", "LoginError"]
