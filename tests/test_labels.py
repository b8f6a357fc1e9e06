"""Label validation and the shared selector syntax (pure logic)."""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enroll.labels import (
    LabelError,
    canonical_json,
    parse_assignments,
    parse_selector,
    validate,
)

DEVICE = {"customer": "acme", "site": "dal", "region": "us-central", "lifecycle": "active"}


@pytest.mark.parametrize(
    "selector, expected",
    [
        ("customer=acme", True),
        ("customer==acme", True),
        ("customer=globex", False),
        ("customer!=globex", True),
        ("customer=acme,site=dal", True),
        ("customer=acme,site=hou", False),
        ("site in (dal,hou)", True),
        ("site in (hou, aus)", False),
        ("site notin (hou)", True),
        ("region", True),
        ("firmware", False),
        ("!firmware", True),
        ("firmware!=1.0", True),  # a missing key is not equal to anything
        ("", True),
    ],
)
def test_selector_matches(selector, expected):
    assert parse_selector(selector).matches(DEVICE) is expected


def test_several_arguments_are_anded():
    sel = parse_selector(["customer=acme", "site in (dal,hou)", "lifecycle!=decommissioned"])
    assert sel.matches(DEVICE)
    assert not sel.matches({**DEVICE, "lifecycle": "decommissioned"})
    assert str(sel) == "customer=acme,site in (dal,hou),lifecycle!=decommissioned"


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("Customer=acme", "bad label key"),
        ("site in ()", "empty"),
        ("site in (a,b", "missing ')'"),
        ("site in a,b)", "unbalanced"),
        ("a=b,,c=d", "empty term"),
        ("a b c", "bad selector term"),
        ("lifecycle=retired", "bad lifecycle"),
    ],
)
def test_bad_selectors_say_what_is_wrong(bad, fragment):
    with pytest.raises(LabelError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_selector(bad)


def test_assignments_and_validation():
    assert parse_assignments(["site=dal", "customer=acme"]) == {"customer": "acme", "site": "dal"}
    with pytest.raises(LabelError, match="key=value"):
        parse_assignments(["customer"])
    with pytest.raises(LabelError, match="twice"):
        parse_assignments(["a=1", "a=2"])
    with pytest.raises(LabelError, match="printable"):
        validate({"a": "x\ny"})
    with pytest.raises(LabelError, match="bad label key"):
        validate({"x" * 64: "v"})
    assert validate({"example.com/tier": "gold", "a_b": ""}) == {"a_b": "", "example.com/tier": "gold"}


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True), st.text(max_size=20)))
def test_canonical_json_is_order_independent(labels):
    reordered = dict(reversed(list(labels.items())))
    assert canonical_json(labels) == canonical_json(reordered)


@given(st.text(max_size=60))
def test_selector_parser_never_crashes(text):
    with contextlib.suppress(LabelError):
        parse_selector(text)
