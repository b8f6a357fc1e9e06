"""Label-based roles, in the YAML format operators know from Teleport, and the access decision.

Semantics (pure functions, no I/O):

- ``node_labels`` keys are ANDed; a list of values is ORed; a value is a glob, or a regular
  expression when written ``^...$`` (it must match the whole value); ``'*': '*'`` matches every
  device. An empty or missing ``node_labels`` matches nothing.
- Deny is checked first, across all of a user's roles, and wins. A deny rule applies when each
  of its parts that is present matches: ``node_labels``, ``logins``, ``services``.
- Allow needs ONE role whose labels match the device AND that holds the requested login and
  service — the logins of one role never combine with the labels of another.
- Nothing is allowed by default; ``services`` defaults to ``[ssh]``. ``'*'`` in ``logins`` or
  ``services`` means any (the built-in ``admin`` role uses it).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from enroll.durations import parse_duration
from enroll.errors import FleetError
from enroll.names import is_name

SUPPORTED_VERSIONS = ("v5", "v6", "v7")
DEFAULT_SERVICES = ("ssh",)
DEFAULT_USER_TTL = dt.timedelta(hours=8)  # fleet.yaml lifetimes.user as `enroll init` writes it
_LOGIN_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


ADMIN_ROLE_YAML = """\
kind: role
version: v7
metadata:
  name: admin
spec:
  allow:
    node_labels:
      '*': '*'
    logins: ['*']
    services: ['*']
  deny:
    node_labels:
      lifecycle: decommissioned
"""


class RoleError(FleetError, ValueError, code="role"):
    """A role file is wrong; the message names the line and field."""


@dataclass(frozen=True)
class Rule:
    node_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    logins: tuple[str, ...] | None = None
    services: tuple[str, ...] | None = None

    def labels_match(self, labels: dict[str, str]) -> bool:
        if not self.node_labels:
            return False
        for key, patterns in self.node_labels.items():
            if key == "*":
                if "*" in patterns:
                    continue
                return False
            value = labels.get(key)
            if value is None or not any(_value_matches(p, value) for p in patterns):
                return False
        return True


@dataclass(frozen=True)
class Role:
    name: str
    allow: Rule
    deny: Rule
    max_session_ttl: dt.timedelta | None = None

    @property
    def allowed_services(self) -> tuple[str, ...]:
        return self.allow.services if self.allow.services is not None else DEFAULT_SERVICES

    def to_spec(self) -> dict[str, Any]:
        def rule(r: Rule) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if r.node_labels:
                out["node_labels"] = {k: list(v) for k, v in r.node_labels.items()}
            if r.logins is not None:
                out["logins"] = list(r.logins)
            if r.services is not None:
                out["services"] = list(r.services)
            return out

        spec: dict[str, Any] = {"allow": rule(self.allow), "deny": rule(self.deny)}
        if self.max_session_ttl:
            spec["options"] = {"max_session_ttl": f"{int(self.max_session_ttl.total_seconds())}s"}
        return {"kind": "role", "version": "v7", "metadata": {"name": self.name}, "spec": spec}


def _value_matches(pattern: str, value: str) -> bool:
    if pattern.startswith("^") and pattern.endswith("$"):
        return re.fullmatch(pattern, value) is not None
    return fnmatch.fnmatchcase(value, pattern)


# --- decisions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    role: str | None = None


def denied_by(roles: list[Role], labels: dict[str, str], login: str | None, service: str) -> Role | None:
    for role in roles:
        d = role.deny
        if not (d.node_labels or d.logins is not None or d.services is not None):
            continue
        if d.node_labels and not d.labels_match(labels):
            continue
        if d.logins is not None and (login is None or login not in d.logins):
            continue
        if d.services is not None and service not in d.services:
            continue
        return role
    return None


def check(roles: list[Role], labels: dict[str, str], service: str, login: str | None) -> Verdict:
    """May a holder of ``roles`` reach ``service`` as ``login`` on a device with ``labels``?

    ``login=None`` asks whether *some* login of a matching role is allowed (an ssh dial before
    the per-session certificate binds the login).
    """
    role = denied_by(roles, labels, login, service)
    if role is not None:
        return Verdict(False, f"denied by role {role.name}", role.name)
    for role in roles:
        services = role.allowed_services
        if not role.allow.labels_match(labels) or not (service in services or "*" in services):
            continue
        if service == "ssh":
            logins = role.allow.logins or ()
            if (login is None and logins) or (login is not None and (login in logins or "*" in logins)):
                return Verdict(True, f"allowed by role {role.name}", role.name)
        else:
            return Verdict(True, f"allowed by role {role.name}", role.name)
    what = f"{service} as {login}" if login else service
    return Verdict(False, f"no role allows {what} on this device")


def visible(roles: list[Role], labels: dict[str, str]) -> bool:
    """Listed in ``tunnel ls``: some role allows some service there and no deny covers the device."""
    for role in roles:
        if role.deny.node_labels and role.deny.labels_match(labels) and role.deny.logins is None \
                and role.deny.services is None:
            return False
    return any(r.allow.labels_match(labels) for r in roles)


def session_ttl(roles: list[Role], requested: dt.timedelta | None,
                default: dt.timedelta = DEFAULT_USER_TTL) -> dt.timedelta:
    """How long a user certificate issued at login lasts.

    ``default`` is the fleet's user lifetime (``lifetimes.user`` in fleet.yaml, 8 h): the most
    any login gets. The engineer may ask for less (``--ttl``), never for more, and every role's
    ``max_session_ttl`` can only shorten it. Without this cap a login with no limiting role
    could ask for a certificate that outlives any lock review (``--ttl 5000w``).
    """
    limits = [r.max_session_ttl for r in roles if r.max_session_ttl]
    return min([default, *([requested] if requested else []), *limits])


# --- parsing with line numbers ---------------------------------------------------------------


def _err(node: yaml.Node | None, message: str) -> RoleError:
    line = node.start_mark.line + 1 if node is not None else "?"
    return RoleError(f"line {line}: {message}")


def _mapping(node: yaml.Node, where: str, allowed: set[str]) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise _err(node, f"{where} must be a mapping")
    out = {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key not in allowed:
            raise _err(key_node, f"unknown field {where}.{key} (expected one of: {', '.join(sorted(allowed))})")
        out[key] = value_node
    return out


def _strings(node: yaml.Node, where: str) -> tuple[str, ...]:
    if isinstance(node, yaml.ScalarNode):
        return (node.value,)
    if isinstance(node, yaml.SequenceNode) and all(isinstance(n, yaml.ScalarNode) for n in node.value):
        return tuple(n.value for n in node.value)
    raise _err(node, f"{where} must be a string or a list of strings")


def _rule(node: yaml.Node | None, where: str) -> Rule:
    if node is None:
        return Rule()
    fields = _mapping(node, where, {"node_labels", "logins", "services"})
    labels: dict[str, tuple[str, ...]] = {}
    if "node_labels" in fields:
        if not isinstance(fields["node_labels"], yaml.MappingNode):
            raise _err(fields["node_labels"], f"{where}.node_labels must be a mapping")
        for key_node, value_node in fields["node_labels"].value:
            values = _strings(value_node, f"{where}.node_labels.{key_node.value}")
            for v in values:
                if v.startswith("^") and v.endswith("$"):
                    try:
                        re.compile(v)
                    except re.error as exc:
                        raise _err(value_node, f"bad regular expression {v!r}: {exc}") from None
            labels[key_node.value] = values
    logins = None
    if "logins" in fields:
        logins = _strings(fields["logins"], f"{where}.logins")
        for login in logins:
            if login != "*" and not _LOGIN_RE.fullmatch(login):  # ^…$ alone: "root\n" too
                raise _err(fields["logins"], f"bad login {login!r}: use a Unix user name")
    services = _strings(fields["services"], f"{where}.services") if "services" in fields else None
    return Rule(labels, logins, services)


def parse_roles(text: str) -> list[Role]:
    """Parse one or more YAML role documents; raise RoleError naming the line and field."""
    try:
        docs = [d for d in yaml.compose_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise RoleError(f"not valid YAML: {exc}") from None
    if not docs:
        raise RoleError("the file holds no role")
    roles = []
    for doc in docs:
        top = _mapping(doc, "role", {"kind", "version", "metadata", "spec"})
        if top.get("kind") is None or top["kind"].value != "role":
            raise _err(top.get("kind", doc), "kind must be 'role'")
        version = top.get("version")
        if version is None or version.value not in SUPPORTED_VERSIONS:
            raise _err(version or doc, f"version must be one of {', '.join(SUPPORTED_VERSIONS)}")
        meta = _mapping(top.get("metadata") or doc, "metadata", {"name", "description", "labels"})
        name_node = meta.get("name")
        if name_node is None or not is_name(str(name_node.value)):
            raise _err(name_node or doc, "metadata.name must be 1-63 lowercase letters, digits and '-'")
        if "spec" not in top:
            raise _err(doc, "spec is missing")
        spec = _mapping(top["spec"], "spec", {"allow", "deny", "options"})
        ttl = None
        if "options" in spec:
            options = _mapping(spec["options"], "spec.options", {"max_session_ttl"})
            if "max_session_ttl" in options:
                try:
                    ttl = parse_duration(options["max_session_ttl"].value)
                except ValueError as exc:
                    raise _err(options["max_session_ttl"], f"spec.options.max_session_ttl: {exc}") from None
        roles.append(Role(name_node.value, _rule(spec.get("allow"), "spec.allow"),
                          _rule(spec.get("deny"), "spec.deny"), ttl))
    return roles


def role_from_spec(spec: dict[str, Any]) -> Role:
    """Rebuild a stored role (as written by :meth:`Role.to_spec`)."""
    return parse_roles(yaml.safe_dump(spec))[0]
