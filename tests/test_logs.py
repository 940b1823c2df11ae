"""Logging: JSON lines off a terminal, readable lines on one, bound request/camera, no secrets."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest
from pydantic import SecretStr

from daemon.logs import configure_logging, get_logger, log_context, reset_logging, wants_json

SECRET = "hunter2-do-not-log"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def stream():
    out = io.StringIO()
    yield out
    reset_logging()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_auto_is_json_off_a_terminal_and_console_on_one():
    assert wants_json("auto", io.StringIO())
    assert not wants_json("auto", FakeTerminal())
    assert wants_json("json", FakeTerminal())
    assert not wants_json("console", io.StringIO())
    with pytest.raises(ValueError, match="log format"):
        wants_json("xml", io.StringIO())


def test_json_lines_carry_level_logger_time_and_fields(stream):
    log = get_logger("vlmd.test")  # made before configure: must follow it
    configure_logging("info", "auto", stream)
    log.info("frame received", camera="front", bytes=1234)
    (line,) = lines(stream)
    assert line["event"] == "frame received"
    assert line["level"] == "info"
    assert line["logger"] == "vlmd.test"
    assert line["camera"] == "front" and line["bytes"] == 1234
    assert line["timestamp"].endswith("Z")


def test_level_filters(stream):
    configure_logging("warning", "json", stream)
    log = get_logger("vlmd.test")
    log.info("hidden")
    log.warning("shown")
    assert [line["event"] for line in lines(stream)] == ["shown"]


def test_log_context_binds_request_and_camera_and_unbinds(stream):
    configure_logging("info", "json", stream)
    log = get_logger("vlmd.worker")
    with log_context(request_id="r-1", camera="front"):
        log.info("job started")
        with log_context(request_id="r-2", camera=None):
            log.info("nested")
        log.info("outer again")
    log.info("after")
    got = [(line["event"], line.get("request_id"), line.get("camera")) for line in lines(stream)]
    assert got == [
        ("job started", "r-1", "front"),
        ("nested", "r-2", "front"),
        ("outer again", "r-1", "front"),
        ("after", None, None),
    ]


def test_context_is_per_thread(stream):
    configure_logging("info", "json", stream)
    log = get_logger("vlmd.test")
    with log_context(request_id="main-thread"):
        thread = threading.Thread(target=lambda: log.info("from another thread"))
        thread.start()
        thread.join()
    assert "request_id" not in lines(stream)[0]


def test_stdlib_loggers_share_the_format_and_context(stream):
    configure_logging("info", "json", stream)
    with log_context(request_id="r-9"):
        logging.getLogger("paho.mqtt.client").warning("connection lost: %s", "timeout")
    (line,) = lines(stream)
    assert line == {**line, "event": "connection lost: timeout", "level": "warning", "logger": "paho.mqtt.client", "request_id": "r-9"}


def test_chatty_amqtt_is_quieted(stream):
    configure_logging("debug", "json", stream)
    logging.getLogger("amqtt.broker").info("Listener 'default' bind to ...")
    logging.getLogger("amqtt.broker").warning("worth seeing")
    assert [line["event"] for line in lines(stream)] == ["worth seeing"]


def test_secrets_are_redacted(stream):
    configure_logging("info", "json", stream)
    log = get_logger("vlmd.test")
    log.info("connecting", password=SECRET, mqtt_password=SECRET, settings={"password": SECRET, "host": "h"}, pw=SecretStr(SECRET))
    output = stream.getvalue()
    assert SECRET not in output
    (line,) = lines(stream)
    assert line["password"] == "<redacted>" and line["settings"] == {"password": "<redacted>", "host": "h"}


def test_token_counts_are_not_secrets_but_tokens_are(stream):
    configure_logging("info", "json", stream)
    get_logger("vlmd.test").info("model loaded", image_tokens=64, max_tokens=32, completion_tokens=5,
                                 access_token=SECRET, apitoken=SECRET, auth={"token": SECRET, "tokens": 3})
    (line,) = lines(stream)
    assert (line["image_tokens"], line["max_tokens"], line["completion_tokens"]) == (64, 32, 5)
    assert line["access_token"] == line["apitoken"] == "<redacted>"
    assert line["auth"] == {"token": "<redacted>", "tokens": 3}


def test_exceptions_are_one_json_line(stream):
    configure_logging("info", "json", stream)
    try:
        raise RuntimeError("npu timeout")
    except RuntimeError:
        get_logger("vlmd.test").exception("job failed")
    (line,) = lines(stream)
    assert "RuntimeError: npu timeout" in line["exception"]


def test_console_format_is_readable(stream):
    terminal = FakeTerminal()
    configure_logging("info", "auto", terminal)
    with log_context(request_id="r-1"):
        get_logger("vlmd.test").info("answer done", tokens=12)
    text = terminal.getvalue()
    assert "answer done" in text and "request_id" in text and "r-1" in text and "tokens" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_reconfigure_replaces_only_our_handler(stream):
    root = logging.getLogger()
    before = list(root.handlers)
    level_before = root.level
    configure_logging("info", "json", io.StringIO())
    configure_logging("info", "json", stream)
    assert len(root.handlers) == len(before) + 1
    get_logger("vlmd.test").info("once")
    assert len(lines(stream)) == 1
    reset_logging()
    assert root.handlers == before
    assert root.level == level_before


def test_reset_restores_levels():
    root, amqtt = logging.getLogger(), logging.getLogger("amqtt")
    before = (root.level, amqtt.level)
    configure_logging("debug", "json", io.StringIO())
    assert root.level == logging.DEBUG and amqtt.level == logging.WARNING
    reset_logging()
    assert (root.level, amqtt.level) == before


def test_bad_level_is_refused():
    with pytest.raises(ValueError, match="log level"):
        configure_logging("verbose", "json", io.StringIO())
