"""The pure core's parsers: durations, HOST:PORT, the name rule (table-driven, no I/O)."""

from __future__ import annotations

import datetime as dt

import pytest

from enroll import certs
from enroll.addresses import AddressError, ascii_port, split_host_port
from enroll.durations import DurationError, parse_duration
from enroll.errors import FleetError
from enroll.names import NAME_RULE, is_name
from enroll.repositories import Certificates, Tokens
from enroll.roles import RoleError, parse_roles


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("8h", 28800), ("30d", 2592000), ("2w", 1209600), (" 5m ", 300),
])
def test_durations(text, seconds):
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", [
    "", "m", "0m", "-5m", "5", "5 m", "1.5h", "5y", "5M", "３0m",  # fullwidth digit
    "٣m",  # Arabic-Indic digit: int() would take it
])
def test_bad_durations_are_refused_with_the_accepted_form(text):
    with pytest.raises(DurationError, match="use a positive number with s, m, h, d or w") as exc:
        parse_duration(text)
    assert isinstance(exc.value, FleetError) and isinstance(exc.value, ValueError)
    assert exc.value.code == "bad_duration"


@pytest.mark.parametrize(("text", "expected"), [
    ("proxy.example.com:443", ("proxy.example.com", 443)),
    ("192.0.2.1:1", ("192.0.2.1", 1)),
    ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ("host:65535", ("host", 65535)),
])
def test_host_port(text, expected):
    assert split_host_port(text, "--proxy") == expected


@pytest.mark.parametrize("text", [
    "proxy.example.com", ":443", "host:", "host:0", "host:65536", "host:123456", "host:４４３",
    "host:+443", "host: 443", "host:443 ",
])
def test_bad_host_port_names_the_setting(text):
    with pytest.raises(AddressError, match=r"^--proxy: expected HOST:PORT, got ") as exc:
        split_host_port(text, "--proxy")
    assert isinstance(exc.value, ValueError) and exc.value.code == "bad_address"


def test_port_zero_only_where_a_listener_may_pick_one():
    assert split_host_port("127.0.0.1:0", "--local", allow_zero=True) == ("127.0.0.1", 0)


@pytest.mark.parametrize(("text", "port"), [
    ("22", 22), ("65535", 65535), ("0", None), ("65536", None), ("２２", None), ("022", 22),
    ("", None), ("ssh", None), (None, None),
])
def test_ascii_port(text, port):
    assert ascii_port(text) == port


@pytest.mark.parametrize(("text", "ok"), [
    ("robot-1", True), ("a", True), ("a" * 63, True), ("a" * 64, False), ("-robot", False),
    ("robot-", False), ("Robot", False), ("robot_1", False), ("", False), (None, False),
    ("robot-1\n", False),  # ^…$ alone would have let the newline through
    ("röbot", False),
])
def test_the_name_rule(text, ok):
    assert is_name(text) is ok


def test_names_with_a_trailing_newline_are_refused_for_certificates_and_roles():
    with pytest.raises(certs.CertError, match="use " + NAME_RULE):
        certs.check_name("robot-1\n")
    role = ("kind: role\nversion: v7\nmetadata:\n  name: \"ops\\n\"\nspec:\n  allow:\n"
            "    node_labels: {'*': '*'}\n")
    with pytest.raises(RoleError):
        parse_roles(role)


def test_a_device_asking_for_a_name_with_a_newline_is_refused_audited_and_spends_nothing(fleet, tmp_path):
    """The attack: a request whose name ends in a newline (the device-side check skipped)."""
    from enroll import device, tokens
    from enroll.enrollment import enroll
    from enroll.request import EnrollError

    request = device.prepare(tmp_path / "d")
    request["name"] = "robot-1\n"
    with fleet.state.registry() as reg:
        token, _ = tokens.create(reg, fleet.state.fleet, labels={"customer": "acme"})
        with pytest.raises(EnrollError, match="bad device name"):
            enroll(fleet.state, reg, request, token)
        assert [t.uses_left for t in Tokens(reg).all()] == [1]
        assert not reg.devices() and not Certificates(reg).listing(include_expired=True, now=dt.datetime.now(dt.UTC))
    denied = [e for e in fleet.audit() if e["type"] == "device.enroll.denied"]
    assert len(denied) == 1 and "bad device name" in denied[0]["reason"]


def test_label_keys_and_role_logins_with_a_trailing_newline_are_refused():
    from enroll.labels import LabelError, validate_key

    with pytest.raises(LabelError, match="bad label key"):
        validate_key("customer\n")
    assert validate_key("customer") == "customer"
    role = ("kind: role\nversion: v7\nmetadata:\n  name: ops\nspec:\n  allow:\n"
            "    node_labels: {'*': '*'}\n    logins: [\"root\\n\"]\n")
    with pytest.raises(RoleError, match="bad login"):
        parse_roles(role)
    assert parse_roles(role.replace("root\\n", "root"))[0].allow.logins == ("root",)
