"""Pure transport logic: certificate checks, flow-control accounting, codes, addresses."""

from __future__ import annotations

import datetime
import socket

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st
from transport_helpers import NOW, SERVER_NAME

from tunnel.transport.policy import (
    CertificateRejected,
    bind_address,
    describe_close,
    next_receive_limit,
    normalize_address,
    send_allowance,
    socket_address,
    tls_alert_of,
    verify_peer_chain,
)


def leaf(identity):
    return identity.cert_chain[0]


def test_valid_client_and_server_chains(pki):
    verify_peer_chain(leaf(pki.device), [], pki.ca, purpose="client")
    verify_peer_chain(leaf(pki.server), [], pki.ca, purpose="server", server_name=SERVER_NAME)
    verify_peer_chain(leaf(pki.server), [], pki.ca, purpose="server", server_name="127.0.0.1")


@pytest.mark.parametrize(
    ("who", "purpose", "words", "expired"),
    [
        ("foreign_device", "client", "not accepted by the pinned fleet CA", False),
        ("expired_device", "client", "expired", True),
        ("server_eku_as_client", "client", "clientAuth", False),
        ("device", "server", "serverAuth", False),  # a client cert cannot act as a server
        ("server", "client", "clientAuth", False),
    ],
)
def test_rejections(pki, who, purpose, words, expired):
    with pytest.raises(CertificateRejected) as info:
        verify_peer_chain(
            leaf(getattr(pki, who)), [], pki.ca, purpose=purpose, server_name=SERVER_NAME
        )
    assert words in info.value.reason
    assert info.value.expired is expired


def test_missing_certificate_and_name_mismatch(pki):
    with pytest.raises(CertificateRejected, match="no client certificate"):
        verify_peer_chain(None, [], pki.ca, purpose="client")
    with pytest.raises(CertificateRejected, match="not accepted"):
        verify_peer_chain(leaf(pki.server), [], pki.ca, purpose="server", server_name="x.test")
    with pytest.raises(CertificateRejected, match="not accepted"):
        verify_peer_chain(leaf(pki.server), [], pki.ca, purpose="server", server_name="::1")


def test_not_yet_valid_and_validity_at_given_time(pki):
    future = NOW - datetime.timedelta(days=5)  # before the device cert's notBefore
    with pytest.raises(CertificateRejected, match="not valid before") as info:
        verify_peer_chain(leaf(pki.device), [], pki.ca, purpose="client", now=future)
    assert info.value.expired


def test_leaf_that_is_a_ca_and_a_non_ca_trust_root(pki):
    make_leaf = pki.extra["make_leaf"]
    ca_pair = pki.extra["ca_pair"]
    sub_ca, _ = make_leaf(
        ca_pair, "sub", eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        sans=[x509.UniformResourceIdentifier("spiffe://fleet.test/sub")], is_ca=True,
    )
    with pytest.raises(CertificateRejected, match="is a CA certificate"):
        verify_peer_chain(sub_ca, [], pki.ca, purpose="client")
    # pinning a leaf as "CA" must not work
    with pytest.raises(CertificateRejected, match="pinned fleet CA certificate is not a CA"):
        verify_peer_chain(leaf(pki.device), [], leaf(pki.device), purpose="client")


def test_intermediate_from_foreign_ca_does_not_help(pki):
    # a foreign chain presented with the real CA's leaf as "intermediate" still fails
    with pytest.raises(CertificateRejected):
        verify_peer_chain(leaf(pki.foreign_device), [leaf(pki.device)], pki.ca, purpose="client")


# ------------------------------------------------------------------------- flow control


def test_receive_limit_examples():
    w = 1000
    assert next_receive_limit(0, 1000, w) == 1000  # nothing consumed yet
    assert next_receive_limit(499, 1000, w) == 1000  # remaining credit 501 > w/2
    assert next_receive_limit(500, 1000, w) == 1500  # remaining 500 <= w/2: re-grant
    assert next_receive_limit(1000, 1000, w) == 2000


@given(
    window=st.integers(min_value=2, max_value=1 << 24),
    reads=st.lists(st.integers(min_value=0, max_value=1 << 22), max_size=50),
)
def test_receive_limit_invariants(window, reads):
    """Credit beyond what was consumed never exceeds the window and never shrinks."""
    advertised, consumed = window, 0
    for n in reads:
        # the peer can only have sent up to `advertised`; the app reads at most that
        consumed = min(advertised, consumed + n)
        new = next_receive_limit(consumed, advertised, window)
        assert new >= advertised
        assert new - consumed <= window
        if advertised - consumed <= window // 2:
            assert new == consumed + window  # a stalled peer is always unblocked
        advertised = new


@given(
    high=st.integers(min_value=2, max_value=1 << 24),
    buffered=st.integers(min_value=0, max_value=1 << 24),
    blocked=st.booleans(),
)
def test_send_allowance_never_exceeds_high_water(high, buffered, blocked):
    allow = send_allowance(buffered, high, blocked)
    assert allow >= 0
    if allow:
        assert buffered + allow <= high
    if blocked and buffered > high // 2:
        assert allow == 0
    if not blocked and buffered < high:
        assert allow == high - buffered


# ------------------------------------------------------------------------- codes, addresses


def test_describe_close():
    assert describe_close(0x100 + 42, "x", application=False) == "TLS alert bad_certificate: x"
    assert describe_close(0x100 + 116, "", application=False) == "TLS alert certificate_required"
    assert describe_close(0xA, "", application=False) == "PROTOCOL_VIOLATION"
    assert describe_close(2, "revoked", application=True) == "REFUSED: revoked"
    assert describe_close(4001, "", application=True) == "application error 4001"
    assert tls_alert_of(0x12D) == 45 and tls_alert_of(0x1) is None


def test_addresses():
    assert normalize_address(("::ffff:127.0.0.2", 5, 0, 0)) == ("127.0.0.2", 5)
    assert normalize_address(("::1", 5, 0, 0)) == ("::1", 5)
    assert normalize_address(("127.0.0.1", 5)) == ("127.0.0.1", 5)
    assert socket_address("127.0.0.1", 1, socket.AF_INET6) == ("::ffff:127.0.0.1", 1, 0, 0)
    assert socket_address("::ffff:127.0.0.1", 1, socket.AF_INET) == ("127.0.0.1", 1)
    with pytest.raises(ValueError):
        socket_address("::1", 1, socket.AF_INET)
    assert bind_address("::1", 0, socket.AF_INET6) == ("::1", 0, 0, 0)
    with pytest.raises(ValueError):
        bind_address("127.0.0.2", 0, socket.AF_INET6)
    with pytest.raises(ValueError):
        bind_address("::ffff:127.0.0.2", 0, socket.AF_INET6)
