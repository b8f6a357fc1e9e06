"""Roles (parsing with line numbers, Teleport-style semantics) and users (invites, passwords)."""

import datetime as dt

import pytest

from enroll import users
from enroll.roles import RoleError, check, parse_roles, session_ttl, visible
from enroll.state import FleetState

ROLE = """\
kind: role
version: v7
metadata:
  name: acme-field-tech
spec:
  allow:
    node_labels:
      customer: acme
      region: [us-central, us-east]
      site: 'dal*'
    logins: [diagnostics, readonly]
    services: [ssh]
  deny:
    node_labels:
      lifecycle: decommissioned
  options:
    max_session_ttl: 8h
"""
ACME = {"customer": "acme", "region": "us-east", "site": "dal-2", "lifecycle": "active"}


def test_semantics_of_one_role():
    roles = parse_roles(ROLE)
    assert check(roles, ACME, "ssh", "readonly").allowed
    assert check(roles, ACME, "ssh", None).allowed  # some login is allowed
    assert not check(roles, ACME, "ssh", "root").allowed
    assert not check(roles, ACME, "postgres", None).allowed  # services: [ssh]
    assert not check(roles, {**ACME, "region": "eu"}, "ssh", "readonly").allowed  # values ORed
    assert not check(roles, {k: v for k, v in ACME.items() if k != "site"}, "ssh", "readonly").allowed
    verdict = check(roles, {**ACME, "lifecycle": "decommissioned"}, "ssh", "readonly")
    assert not verdict.allowed and "denied by role acme-field-tech" in verdict.reason
    assert session_ttl(roles, dt.timedelta(hours=24)) == dt.timedelta(hours=8)


def test_logins_of_one_role_never_combine_with_labels_of_another():
    roles = parse_roles("""\
kind: role
version: v7
metadata: {name: sees-acme}
spec: {allow: {node_labels: {customer: acme}, logins: [readonly]}}
---
kind: role
version: v7
metadata: {name: root-on-globex}
spec: {allow: {node_labels: {customer: globex}, logins: [root]}}
""")
    assert check(roles, ACME, "ssh", "readonly").allowed
    assert not check(roles, ACME, "ssh", "root").allowed


def test_regex_wildcard_and_deny_logins():
    roles = parse_roles("""\
kind: role
version: v7
metadata: {name: all}
spec:
  allow: {node_labels: {'*': '*'}, logins: [ops, root], services: [ssh, postgres]}
  deny: {logins: [root]}
---
kind: role
version: v7
metadata: {name: fw}
spec: {allow: {node_labels: {firmware: '^3\\.[0-9]+$'}, logins: [fw]}}
""")
    assert check(roles, {}, "ssh", "ops").allowed and check(roles, {}, "postgres", None).allowed
    assert not check(roles, ACME, "ssh", "root").allowed
    assert check(roles, {"firmware": "3.12"}, "ssh", "fw").allowed
    fw_only = [r for r in roles if r.name == "fw"]
    assert not check(fw_only, {"firmware": "13.1"}, "ssh", "fw").allowed
    assert not visible([], ACME)


@pytest.mark.parametrize(
    "text, fragment",
    [
        (ROLE.replace("node_labels:\n      customer", "nodelabels:\n      customer"), "line 7: unknown field spec.allow.nodelabels"),
        (ROLE.replace("kind: role", "kind: user"), "line 1: kind must be 'role'"),
        (ROLE.replace("version: v7", "version: v2"), "line 2: version must be one of"),
        (ROLE.replace("name: acme-field-tech", "name: Acme Tech"), "line 4: metadata.name"),
        (ROLE.replace("max_session_ttl: 8h", "max_session_ttl: soon"), "line 17: spec.options.max_session_ttl"),
        (ROLE.replace("logins: [diagnostics, readonly]", "logins: {a: b}"), "line 11: spec.allow.logins must be"),
        (ROLE.replace("logins: [diagnostics, readonly]", "logins: ['bad login']"), "bad login"),
        (ROLE.replace("site: 'dal*'", "site: '^(dal$'"), "bad regular expression"),
        ("kind: role\n  bad: [", "not valid YAML"),
        ("", "holds no role"),
    ],
)
def test_bad_role_files_name_the_line_and_field(text, fragment):
    with pytest.raises(RoleError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        parse_roles(text)


@pytest.fixture
def reg(tmp_path):
    state = FleetState.create(tmp_path / "s", fleet="f", proxy_name="p", proxy_ips=[])
    with state.registry() as r:
        users.apply_roles(r, ROLE)
        yield r


def test_invite_then_password_then_totp(reg):
    invite, _ = users.add(reg, "alice", ["acme-field-tech"])
    with pytest.raises(users.LoginError, match="at least 10"):
        users.authenticate(reg, "alice", password="short", invite=invite)
    user = users.authenticate(reg, "alice", password="long enough pw", invite=invite)
    assert user.roles == ("acme-field-tech",) and user.invite_hash is None
    with pytest.raises(users.LoginError, match="unknown, used or expired"):
        users.authenticate(reg, "alice", password="long enough pw", invite=invite)  # one-time
    assert users.authenticate(reg, "alice", password="long enough pw").name == "alice"

    invite2, secret = users.add(reg, "bob", [], with_totp=True)
    users.authenticate(reg, "bob", password="bobs password", invite=invite2)
    with pytest.raises(users.LoginError, match="one-time code"):
        users.authenticate(reg, "bob", password="bobs password", totp_code="000000")
    assert users.authenticate(reg, "bob", password="bobs password", totp_code=users.totp(secret))


def test_wrong_passwords_are_slowed_down_and_nothing_else_changes(reg):
    invite, _ = users.add(reg, "carol", [])
    users.authenticate(reg, "carol", password="carols password", invite=invite)
    before = users.get(reg, "carol")
    for _ in range(3):
        with pytest.raises(users.LoginError, match="unknown user or wrong password"):
            users.authenticate(reg, "carol", password="guess")
    with pytest.raises(users.LoginError, match="too many failed logins") as err:
        users.authenticate(reg, "carol", password="carols password")
    assert err.value.retry_after > 0
    after = users.get(reg, "carol")
    assert after.password_hash == before.password_hash and after.failed_logins == 3
    users.unlock(reg, "carol")
    assert users.authenticate(reg, "carol", password="carols password")


def test_unknown_roles_expired_invites_and_unknown_users(reg):
    with pytest.raises(users.UserError, match="unknown role 'nope'"):
        users.add(reg, "dave", ["nope"])
    assert users.get(reg, "dave") is None
    invite, _ = users.add(reg, "erin", [])
    later = dt.datetime.now(dt.UTC) + users.INVITE_TTL + dt.timedelta(seconds=1)
    with pytest.raises(users.LoginError, match="expired"):
        users.authenticate(reg, "erin", password="whatever long", invite=invite, now=later)
    assert users.get(reg, "erin").password_hash is None
    with pytest.raises(users.LoginError, match="unknown user or wrong password"):
        users.authenticate(reg, "nobody", password="x")
