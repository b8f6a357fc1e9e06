"""JSON log records (issue 18): constant ``msg``, data in fields, one object a line."""

from __future__ import annotations

import io
import json
import logging

import pytest

from tunnel import log as tlog


@pytest.fixture
def capture():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(tlog.JSONFormatter())
    logger = logging.getLogger("test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)

    def records():
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    yield logger, records
    logger.handlers[:] = []


def test_event_fields_are_keys_and_msg_is_constant(capture):
    logger, records = capture
    tlog.event(logger, "agent connected", device="robot-1", remote="10.0.0.7:4433", sessions=2)
    tlog.event(logger, "agent connected", device="robot-2", remote="10.0.0.8:4433", sessions=0)
    first, second = records()
    assert set(first) == {"time", "level", "logger", "msg", "device", "remote", "sessions"}
    assert first["msg"] == second["msg"] == "agent connected"
    assert (first["device"], first["sessions"], first["level"], first["logger"]) == ("robot-1", 2, "info", "test.logs")
    assert first["time"].endswith("Z") and "T" in first["time"]


def test_percent_style_arguments_are_a_field_not_in_msg(capture):
    logger, records = capture
    logger.info("refused %s: %s %s", ("127.0.0.1", 5000), 18, "revoked: certificate ab")
    logger.warning("retrying %d writes", 7)
    refused, retry = records()
    assert refused["msg"] == "refused %s: %s %s"
    assert refused["args"] == [["127.0.0.1", 5000], 18, "revoked: certificate ab"]
    assert retry == {**retry, "msg": "retrying %d writes", "args": [7], "level": "warning"}


def test_fields_never_overwrite_the_record_keys(capture):
    logger, records = capture
    logger.error("odd", extra={"fields": {"time": "yesterday", "msg": "spoof", "logger": "x", "args": [1]}})
    (rec,) = records()
    assert rec["msg"] == "odd" and rec["level"] == "error" and rec["logger"] == "test.logs"
    assert rec["field_time"] == "yesterday" and rec["field_msg"] == "spoof" and rec["field_args"] == [1]


def test_exceptions_and_unserialisable_values(capture):
    logger, records = capture
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("could not audit %d summaries", 3)
    tlog.event(logger, "path", path=object())
    failed, path = records()
    assert failed["msg"] == "could not audit %d summaries" and failed["args"] == [3]
    assert "RuntimeError: boom" in failed["exc"]
    assert path["path"].startswith("<object")


def test_text_format_unchanged():
    record = logging.LogRecord("tunnel.proxy", logging.INFO, __file__, 1, "retrying %d writes", (7,), None)
    record.fields = {"device": "robot-1"}
    assert tlog.TextFormatter().format(record) == "info tunnel.proxy: retrying 7 writes device=robot-1"
