"""Join tokens: one-time, expiring, stored only as a hash.

A token reads ``ft1.<fleet>.<id>.<secret>``. The fleet name lets a device line notice at once
that it holds another fleet's token; the short id is public (``enroll token ls``/``revoke``
use it); the 256-bit secret is shown once and only its SHA-256 is stored — a slow hash adds
nothing for a random secret of that size. The token, not the device, decides the labels.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from enroll import audit
from enroll.errors import FleetError
from enroll.labels import LIFECYCLE, validate
from enroll.registry import Registry, iso, parse_iso
from enroll.repositories import Token, Tokens

PREFIX = "ft1"
_TOKEN = re.compile(r"^ft1\.([a-z0-9-]+)\.([0-9a-f]{10})\.([A-Za-z0-9_-]{43})$")


class TokenError(FleetError, ValueError, code="token"):
    """The token cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class ParsedToken:
    fleet: str
    id: str
    secret: str

    @property
    def hash(self) -> str:
        return hash_secret(self.secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse(token: str, fleet: str) -> ParsedToken:
    m = _TOKEN.match((token or "").strip())
    if not m:
        raise TokenError(
            "malformed join token: expected ft1.<fleet>.<id>.<secret> as printed by "
            "'enroll token create' (check for copy/paste truncation)"
        )
    parsed = ParsedToken(*m.groups())
    if parsed.fleet != fleet:
        raise TokenError(
            f"this token belongs to fleet {parsed.fleet!r}, but this CA serves fleet {fleet!r}: "
            "use a token created by this fleet's 'enroll token create'"
        )
    return parsed


def create(
    registry: Registry,
    fleet: str,
    *,
    labels: dict[str, str],
    ttl: dt.timedelta = dt.timedelta(minutes=30),
    uses: int = 1,
    name_prefix: str = "",
    creator: str = "admin",
    now: dt.datetime | None = None,
) -> tuple[str, dict]:
    """Create a token; return the secret string (shown once) and its stored row."""
    if uses < 1:
        raise TokenError("--uses must be at least 1")
    labels = validate({LIFECYCLE: "active", **labels})
    now = now or dt.datetime.now(dt.UTC)
    token_id = secrets.token_hex(5)
    secret = secrets.token_urlsafe(32)
    stored = Token(token_id, hash_secret(secret), labels, uses, uses, name_prefix, iso(now),
                   iso(now + ttl), creator)
    with registry.write() as db:
        Tokens(db).add(stored)
        audit.append(
            db, "token.create", actor=creator, labels=labels, now=now,
            token=token_id, uses=uses, expires_at=stored.expires_at,
        )
    return f"{PREFIX}.{fleet}.{token_id}.{secret}", stored.row()


def consume(db, token: ParsedToken, now: dt.datetime) -> Token:
    """Use one use of ``token`` inside an open write transaction; return its record.

    Runs under ``BEGIN IMMEDIATE``, so two enrollments racing for a single-use token are
    serialized and exactly one of them sees ``uses_left > 0``.
    """
    stored = Tokens(db).get(token.id)
    if stored is None or not hmac.compare_digest(stored.hash, token.hash):
        raise TokenError("unknown join token: it was never issued by this fleet, or mistyped")
    if stored.revoked_at:
        raise TokenError(f"join token {token.id} was revoked at {stored.revoked_at}: ask ops for a new one")
    if parse_iso(stored.expires_at) <= now:
        raise TokenError(f"join token {token.id} expired at {stored.expires_at}: ask ops for a new one")
    if stored.uses_left <= 0:
        raise TokenError(
            f"join token {token.id} was already used ({stored.uses_total} of {stored.uses_total}): "
            "tokens are one-time; ask ops for a new one"
        )
    Tokens(db).use_one(token.id)
    return stored


def revoke(registry: Registry, token_id: str, actor: str = "admin") -> None:
    with registry.write() as db:
        stored = Tokens(db).get(token_id)
        if stored is None:
            raise TokenError(f"no token with id {token_id!r}: see 'enroll token ls'")
        if stored.revoked_at:
            return
        now = dt.datetime.now(dt.UTC)
        Tokens(db).revoke(token_id, now)
        audit.append(db, "token.revoke", actor=actor, now=now, token=token_id)


def listing(registry: Registry, now: dt.datetime | None = None) -> list[dict]:
    now = now or dt.datetime.now(dt.UTC)
    return [t.summary(now) for t in Tokens(registry).all()]


def issued(registry: Registry, token_id: str) -> bool:
    """Whether this fleet ever issued a token with this id (the proxy's cheap pre-check)."""
    return Tokens(registry).exists(token_id)
