"""Transport errors carry a stable kind (``code``) and the wire code apart (pure, no sockets)."""

from __future__ import annotations

import pytest

from enroll.errors import EXIT_REFUSED, EXIT_UNAVAILABLE, FleetError
from tunnel.transport import Refused, StreamReset, TransportError
from tunnel.transport.base import KINDS, default_kind


def test_transport_errors_are_fleet_errors_with_a_kind_and_a_wire_code():
    err = TransportError(4001, "device revoked", application=True, remote=True)
    assert isinstance(err, FleetError)
    assert (err.code, err.wire_code, err.exit_status) == ("refused", 4001, EXIT_UNAVAILABLE)
    assert "0xfa1" in str(err) and "device revoked" in str(err)


@pytest.mark.parametrize(
    ("wire_code", "application", "remote", "kind"),
    [
        (4001, True, True, "refused"),  # the peer's application said no
        (0, True, False, "closed"),  # we closed it
        (0x100 + 42, False, True, "tls"),  # a TLS alert, either side
        (0x100 + 116, False, False, "tls"),
        (0, False, True, "closed"),  # lost without a reason
    ],
)
def test_default_kind(wire_code, application, remote, kind):
    assert default_kind(wire_code, application=application, remote=remote) == kind
    assert TransportError(wire_code, "x", application=application, remote=remote).code == kind


def test_an_explicit_kind_wins_and_must_be_known():
    assert TransportError(0, "x", application=False, kind="timeout").code == "timeout"
    with pytest.raises(AssertionError):
        TransportError(0, "x", kind="no-such-kind")


def test_stream_reset_is_always_kind_reset():
    err = StreamReset(7, "stream reset by peer", remote=True)
    assert (err.code, err.wire_code, err.remote) == ("reset", 7, True)
    assert isinstance(err, TransportError) and "code 7" in str(err)


def test_refused_keeps_its_wire_code_apart_from_its_kind():
    exc = Refused(4003, "locked")
    assert isinstance(exc, FleetError)
    assert (exc.code, exc.wire_code, exc.reason, exc.exit_status) == (
        "refused", 4003, "locked", EXIT_REFUSED
    )
    assert Refused().wire_code == 2


def test_every_kind_is_documented():
    assert all(KINDS.values())
    assert {"timeout", "tls", "intercepted", "refused", "unreachable", "closed", "reset"} <= set(KINDS)
