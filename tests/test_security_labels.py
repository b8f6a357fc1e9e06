"""Issue 13 extra: label values with ',' or '=' are refused everywhere labels come in.

``site=dal,customer=globex`` as one value would read as two labels in table output and in
selectors; ``a=b`` as a value makes ``key=a=b`` ambiguous. Token creation, relabel, selectors and
the device's bundle check all refuse them with the same clear error, and change nothing.
"""

from __future__ import annotations

import json

import pytest
from fleet_harness import table_rows

from enroll import certs, device, tokens
from enroll.cli import main
from enroll.enrollment import enroll
from enroll.labels import LabelError, format_labels, parse_assignments, parse_selector, validate
from enroll.request import sign_bundle
from enroll.state import FleetState

BAD_VALUES = ["dal,customer=globex", "a=b", ",", "="]


@pytest.fixture
def state(tmp_path):
    return FleetState.create(tmp_path / "state", fleet="acme-fleet", proxy_name="proxy.test",
                             proxy_ips=["198.18.0.1"])


def rows(state):
    return table_rows(state, "devices", "tokens", "events")


@pytest.mark.parametrize("value", BAD_VALUES)
def test_pure_validation_refuses_separators(value):
    with pytest.raises(LabelError, match="',' and '=' are not allowed in label values"):
        validate({"site": value})
    with pytest.raises(LabelError, match="not allowed"):
        parse_assignments([f"site={value}"])



@pytest.mark.parametrize("selector", ["site=a=b", "site!=a=b", "site in (a=b,c)"])
def test_selectors_refuse_an_equals_sign_in_a_value(selector):
    with pytest.raises(LabelError, match="not allowed"):
        parse_selector(selector)


def test_values_that_were_ambiguous_now_cannot_exist():
    # what the table showed before: one label that reads as two
    assert format_labels({"site": "dal", "customer": "acme"}) == "customer=acme,site=dal"
    with pytest.raises(LabelError):
        validate({"site": "dal,customer=acme"})
    assert validate({"site": "dal-1_b.c/d:e"}) == {"site": "dal-1_b.c/d:e"}  # everything else printable is fine


@pytest.mark.parametrize("value", BAD_VALUES)
def test_token_create_refuses_and_changes_nothing(state, capsys, value):
    before = rows(state)
    status = main(["--state", str(state.root), "token", "create", "--label", f"site={value}"])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("enroll: error:") and "not allowed in label values" in err, err
    assert rows(state) == before


def test_relabel_refuses_and_changes_nothing(state, tmp_path, capsys):
    with state.registry() as reg:
        token, _ = tokens.create(reg, state.fleet, labels={"customer": "acme"})
        enroll(state, reg, device.prepare(tmp_path / "dev", "robot-1"), token)
    before = rows(state)
    status = main(["--state", str(state.root), "relabel", "robot-1", "customer=acme,site=dal"])
    err = capsys.readouterr().err
    assert status == 1 and "not allowed in label values" in err, err
    assert rows(state) == before


def test_bundle_with_such_a_label_is_refused_by_the_device(state, tmp_path):
    """Even signed by the pinned CA (an old token, a CA-side bug), the device will not install
    labels it could not select on."""
    directory = tmp_path / "dev"
    with state.registry() as reg:
        token, _ = tokens.create(reg, state.fleet, labels={"customer": "acme"})
        bundle = enroll(state, reg, device.prepare(directory, "robot-2"), token)
    key = certs.load_key((directory / "device.key").read_bytes())
    labels = {**bundle["labels"], "site": "dal,customer=globex"}
    cert = certs.issue(state.ca_cert, state.ca_key, key.public_key(), kind="device", fleet=state.fleet,
                       name="robot-2", labels=labels, lifetime=state.lifetime("device"))
    body = {k: v for k, v in bundle.items() if k != "signature"}
    evil = sign_bundle({**body, "labels": labels, "cert": certs.cert_pem(cert).decode()}, state.ca_key)
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(device.InstallError, match="bundle field 'labels'.*not allowed"):
        device.install(directory, json.loads(json.dumps(evil)), certs.ca_pin(state.ca_cert))
    assert sorted(p.name for p in directory.iterdir()) == before
