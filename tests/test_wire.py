"""The stream header codec: round trips, every malformed input, and a fuzzer."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel import wire
from tunnel.wire import HeaderError, HeaderReader


def read_all(data: bytes, chunk: int = 1):
    reader = HeaderReader()
    for i in range(0, len(data), chunk):
        got = reader.feed(data[i : i + chunk])
        if got:
            return got
    return None


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_round_trip_in_any_chunking_keeps_following_bytes(chunk):
    data = wire.encode("dial", device="robot-1", service="ssh", login="diag") + b"SSH-2.0-x\r\n"
    message, rest = read_all(data, chunk)
    assert message.kind == "dial" and message["device"] == "robot-1" and message.get("login") == "diag"
    if chunk >= len(data):
        assert rest == b"SSH-2.0-x\r\n"


def test_reply_helpers():
    msg, _ = read_all(wire.reply_refused("unknown_service", "no such service 'kube'"))
    assert msg["ok"] is False and msg["code"] == "unknown_service"
    msg, _ = read_all(wire.reply_ok(session="s1"))
    assert msg["ok"] is True and msg["session"] == "s1"


def _raw(version=1, kind=1, payload=b"{}", length=None):
    return struct.pack("!BBH", version, kind, len(payload) if length is None else length) + payload


@pytest.mark.parametrize(
    "data, code",
    [
        (_raw(version=2), "unsupported_version"),
        (b"\x00", "unsupported_version"),
        (b"SSH-2.0-OpenSSH", "unsupported_version"),
        (_raw(kind=99, payload=b"{}"), "bad_header"),
        (_raw(payload=b"not json"), "bad_header"),
        (_raw(payload=b"[1,2]"), "bad_header"),
        (_raw(payload=b'{"device":"a"}'), "bad_header"),  # missing service
        (_raw(payload=b'{"device":1,"service":"ssh"}'), "bad_header"),
        (_raw(payload=b'{"device":"a","service":"ssh","x":1}'), "bad_header"),
        (_raw(payload=b"\xff\xfe"), "bad_header"),
        (_raw(length=wire.MAX_PAYLOAD + 1), "header_too_large"),
    ],
)
def test_malformed_headers_have_stable_codes(data, code):
    with pytest.raises(HeaderError) as err:
        read_all(data, 1000)
    assert err.value.code == code


def test_truncated_and_empty_streams():
    reader = HeaderReader()
    assert reader.feed(wire.encode("dial", device="d", service="ssh")[:5]) is None
    with pytest.raises(HeaderError) as err:
        reader.eof()
    assert err.value.code == "truncated_header"
    with pytest.raises(HeaderError) as err:
        HeaderReader().eof()
    assert err.value.code == "no_header"


def test_encoder_refuses_oversized_and_bad_fields():
    with pytest.raises(HeaderError):
        wire.encode("dial", device="x" * 5000, service="ssh")
    with pytest.raises(HeaderError):
        wire.encode("dial", device="x")


@settings(max_examples=300)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=64))
def test_fuzz_random_bytes_never_crash(data, chunk):
    """Random bytes either decode to a valid message or raise HeaderError — nothing else."""
    try:
        got = read_all(data, chunk)
    except HeaderError as exc:
        assert exc.code in {"unsupported_version", "bad_header", "header_too_large"}
        return
    if got:
        assert got[0].kind in wire.KIND_BY_NAME


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_fuzz_payloads_behind_a_valid_prefix(payload):
    data = struct.pack("!BBH", 1, 1, len(payload)) + payload
    try:
        message, rest = read_all(data, 1000)
    except HeaderError:
        return
    assert isinstance(message.fields["device"], str) and rest == b""


@given(st.text(max_size=100), st.text(max_size=30), st.one_of(st.none(), st.text(max_size=30)))
def test_fuzz_round_trip(device, service, login):
    message, rest = read_all(wire.encode("dial", device=device, service=service, login=login), 7)
    assert message["device"] == device and message["service"] == service
    assert message.get("login") == login and rest == b""


# --- resumable sessions (issue 17) ---------------------------------------------------------------

SECRET = "A" * 42 + "_"  # the shape tunnel.resume.new_secret makes: 43 urlsafe base64 characters


def _decoded(data: bytes) -> wire.Message:
    got = HeaderReader().feed(data)
    assert got is not None
    return got[0]


def test_resume_fields_round_trip():
    dial = _decoded(wire.encode("dial", device="d1", service="ssh", resume="0123abcd", resume_secret=SECRET,
                                received=10, sent=2**63, away=12.5))
    assert (dial["resume"], dial["received"], dial["sent"], dial["away"]) == ("0123abcd", 10, 2**63, 12.5)
    opened = _decoded(wire.encode("open", service="ssh", session="s", identity="user:a",
                                  resume="s", resume_secret=SECRET, received=0))
    assert opened["resume_secret"] == SECRET
    reply = _decoded(wire.reply_ok(session="s", resumable=True, received=3, sent=4))
    assert (reply["resumable"], reply["received"], reply["sent"]) == (True, 3, 4)
    # the first dial of an older engineer: no resume fields at all
    assert "resume_secret" not in _decoded(wire.encode("dial", device="d1", service="ssh")).fields


@pytest.mark.parametrize("kind,fields", [
    ("dial", {"received": "10"}),              # a count as a string
    ("dial", {"received": True}),              # bool is not an int here
    ("dial", {"received": 1.0}),
    ("dial", {"received": -1}),                # below the buffer can be
    ("dial", {"sent": 2**64}),                 # above u64
    ("dial", {"away": 3}),                     # an int where a float is expected
    ("dial", {"away": -0.5}),
    ("dial", {"resume_secret": "short"}),
    ("dial", {"resume_secret": "A" * 42 + "="}),  # not urlsafe base64 without padding
    ("dial", {"resume_secret": 123}),
    ("dial", {"resume": ""}),
    ("dial", {"resume": "x" * 65}),
    ("open", {"received": "0"}),
    ("reply", {"resumable": "yes"}),
    ("reply", {"sent": -5}),
])
def test_resume_fields_with_bad_types_or_values_are_refused(kind, fields):
    base = {"dial": {"device": "d1", "service": "ssh"},
            "open": {"service": "ssh", "session": "s", "identity": "user:a"},
            "reply": {"ok": True}}[kind]
    with pytest.raises(HeaderError) as err:
        wire.encode(kind, **base, **fields)
    assert err.value.code == "bad_header"
    # and the same fields arriving from a peer that skipped the encoder's check
    import json
    payload = json.dumps({**base, **fields}).encode()
    with pytest.raises(HeaderError) as err:
        HeaderReader().feed(struct.pack("!BBH", 1, wire.KIND_BY_NAME[kind], len(payload)) + payload)
    assert err.value.code == "bad_header"


def test_non_finite_outage_from_a_peer_is_refused():
    for raw in (b'{"device":"d","service":"s","away":1e400}', b'{"device":"d","service":"s","away":NaN}'):
        with pytest.raises(HeaderError):
            HeaderReader().feed(struct.pack("!BBH", 1, 1, len(raw)) + raw)
