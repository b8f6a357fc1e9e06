"""Device labels and the selector syntax every command shares.

Labels are how devices are found, authorized and audited, so their shape is strict: keys like
Kubernetes label keys, printable values without ``,`` or ``=`` (which would make
``customer=acme,site=dal`` ambiguous), and a reserved ``lifecycle`` key with a closed set of
values. Selectors (``customer=acme``, ``site!=dal``, ``region in (us,eu)``) are parsed into plain
terms and evaluated against a labels dict. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from enroll.errors import FleetError

LIFECYCLE = "lifecycle"
LIFECYCLES = ("active", "maintenance", "decommissioned")

_KEY = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")
_MAX_VALUE = 255


class LabelError(FleetError, ValueError, code="label"):
    """A label or selector is malformed; the message says which and how to fix it."""


def validate_key(key: str) -> str:
    if not (isinstance(key, str) and _KEY.fullmatch(key)):  # not ^…$ alone: a trailing newline
        raise LabelError(
            f"bad label key {key!r}: use 1-63 lowercase letters, digits, '.', '-', '_' or '/', "
            "starting and ending with a letter or digit"
        )
    return key


# ',' separates labels and selector terms and '=' separates key from value (in table output,
# `--label k=v`, selectors), so a value holding either would read as something else.
_SEPARATORS = ",="


def validate_value(key: str, value: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_VALUE or not value.isprintable():
        raise LabelError(f"bad value for label {key!r}: use up to {_MAX_VALUE} printable characters")
    if any(c in value for c in _SEPARATORS):
        raise LabelError(
            f"bad value {value!r} for label {key!r}: ',' and '=' are not allowed in label values "
            "(they separate labels and selector terms); use another character such as '-' or '_'"
        )
    if key == LIFECYCLE and value not in LIFECYCLES:
        raise LabelError(f"bad lifecycle {value!r}: must be one of {', '.join(LIFECYCLES)}")
    return value


def validate(labels: dict[str, str]) -> dict[str, str]:
    """Return ``labels`` sorted by key after checking every key and value."""
    return {validate_key(k): validate_value(k, v) for k, v in sorted(labels.items())}


def parse_assignments(items: list[str]) -> dict[str, str]:
    """Parse ``["customer=acme", "site=dal"]`` (as given with ``--label``) into a labels dict."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LabelError(f"bad label {item!r}: write it as key=value")
        key = key.strip()
        if key in labels:
            raise LabelError(f"label {key!r} given twice")
        labels[validate_key(key)] = validate_value(key, value)
    return dict(sorted(labels.items()))


def canonical_json(labels: dict[str, str]) -> str:
    """The one byte-exact form of a labels dict: signed into certificates and hashed in audit."""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def format_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# --- selectors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One selector term. ``op`` is one of ``=``, ``!=``, ``in``, ``notin``, ``exists``, ``!``."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "!":
            return value is None
        if self.op in ("=", "in"):
            return value in self.values
        return value not in self.values  # "!=" and "notin": a missing key does not equal

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "!":
            return f"!{self.key}"
        if self.op in ("in", "notin"):
            return f"{self.key} {self.op} ({','.join(self.values)})"
        return f"{self.key}{self.op}{self.values[0]}"


@dataclass(frozen=True)
class Selector:
    """Terms ANDed together; the empty selector matches every device."""

    terms: tuple[Term, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(t.matches(labels) for t in self.terms)

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)

    @property
    def keys(self) -> set[str]:
        return {t.key for t in self.terms}


_SET_TERM = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s*\(([^()]*)\)\s*$")
_EQ_TERM = re.compile(r"^\s*([^\s!=()]+)\s*(==|=|!=)\s*([^\s()]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*$")

_SELECTOR_HELP = "use key=value, key!=value, 'key in (a,b)', 'key notin (a,b)', key or !key"


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise LabelError(f"bad selector {text!r}: unbalanced ')'")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise LabelError(f"bad selector {text!r}: missing ')'")
    parts.append("".join(current))
    return parts


def _parse_term(text: str) -> Term:
    if m := _SET_TERM.match(text):
        key, op, inner = m.groups()
        values = tuple(v.strip() for v in inner.split(",") if v.strip())
        if not values:
            raise LabelError(f"bad selector term {text.strip()!r}: the set is empty")
        return Term(validate_key(key), op, tuple(validate_value(key, v) for v in values))
    if m := _EQ_TERM.match(text):
        key, op, value = m.groups()
        return Term(validate_key(key), "!=" if op == "!=" else "=", (validate_value(key, value),))
    if m := _EXISTS_TERM.match(text):
        bang, key = m.groups()
        return Term(validate_key(key), "!" if bang else "exists")
    raise LabelError(f"bad selector term {text.strip()!r}: {_SELECTOR_HELP}")


def parse_selector(args: str | list[str] | tuple[str, ...]) -> Selector:
    """Parse selector arguments. Several arguments, and commas within one, are ANDed."""
    if isinstance(args, str):
        args = [args]
    terms: list[Term] = []
    for arg in args:
        if not arg.strip():
            continue
        for part in _split_terms(arg):
            if not part.strip():
                raise LabelError(f"bad selector {arg!r}: empty term; {_SELECTOR_HELP}")
            terms.append(_parse_term(part))
    return Selector(tuple(terms))


# --- service names -----------------------------------------------------------------------------
# Checked where a device's services are written (``enroll device --service``) and where the agent
# loads them (tunnel.agent_config), so a name the agent would refuse is never written.

#: A service name: lowercase ASCII only, so a name has exactly one spelling (no case, width or
#: script variants that a deny rule would miss) and can never be mistaken for a port number.
SERVICE_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
SERVICE_NAME_RULE = "a lowercase ASCII letter, then letters, digits, '.', '_' or '-' (at most 63)"
#: The agent reports its service table in its hello, a stream header of at most 4 KiB.
MAX_SERVICES = 32


def valid_service_name(name: object) -> bool:
    return isinstance(name, str) and SERVICE_NAME.fullmatch(name) is not None
