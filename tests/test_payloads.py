"""protocol/payloads.py: the models' rules, and the committed JSON Schemas being current."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.commands import schema as schema_command
from daemon.cli import main as vlmd_main
from protocol.payloads import (
    ERROR_CODES,
    ERROR_DESCRIPTIONS,
    FINISH_REASONS,
    AnswerChunk,
    AnswerFinal,
    AskLimits,
    AskRequest,
    CancelRequest,
    Caption,
    ErrorInfo,
    ErrorMessage,
    Stats,
    Usage,
    new_request_id,
)
from protocol.codec import describe_validation_error
from protocol.schemas import json_schemas
from protocol.topics import is_valid_request_id

REPO = Path(__file__).resolve().parent.parent


def ask(**fields) -> AskRequest:
    return AskRequest.model_validate({"text": "what is this?", **fields})


def error_fields(exc: pytest.ExceptionInfo) -> list[str]:
    return [".".join(map(str, e["loc"])) for e in exc.value.errors()]


def test_minimal_ask_gets_documented_defaults():
    request = ask()
    assert (request.v, request.id, request.camera, request.image_b64, request.frames) == (1, None, None, None, None)
    assert (request.temperature, request.top_p, request.top_k, request.repetition_penalty) == (0.0, 1.0, 0, 1.0)
    assert request.stream is True and request.max_tokens is None and request.seed is None


def test_full_ask_is_accepted():
    request = ask(
        v=1, id="q1", camera="front", frames=3, max_tokens=64, temperature=0.7, top_p=0.9, top_k=40,
        repetition_penalty=1.1, seed=7, stream=False, reply_to="client/7/answers", expires_ms=5000, system="Be brief.",
    )
    assert request.frames == 3 and request.reply_to == "client/7/answers"


def test_unknown_fields_are_ignored():
    assert not hasattr(ask(future_field={"x": 1}), "future_field")


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"text": ""}, "text"),
        ({"text": " \n\t"}, "text"),
        ({"system": "  "}, "system"),
        ({"text": 5}, "text"),
        ({"id": "a/b"}, "id"),
        ({"id": ""}, "id"),
        ({"camera": "a/b"}, "camera"),
        ({"frames": 0}, "frames"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"seed": -1}, "seed"),
        ({"stream": 1}, "stream"),
        ({"stream": "true"}, "stream"),
        ({"reply_to": "a/+/b"}, "reply_to"),
        ({"reply_to": "$SYS/x"}, "reply_to"),
        ({"expires_ms": 0}, "expires_ms"),
        ({"system": ""}, "system"),
        ({"v": True}, "v"),
        ({"v": 2}, "v"),
    ],
)
def test_bad_fields_are_named(fields, field):
    with pytest.raises(ValidationError) as exc:
        ask(**fields)
    assert field in error_fields(exc)


def test_missing_text_is_named():
    with pytest.raises(ValidationError) as exc:
        AskRequest.model_validate({"camera": "front"})
    assert describe_validation_error(exc.value).startswith("text: required")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"camera": "c", "image_b64": "AAAA"}, "not both"),
        ({"frames": 2}, "frames: needs camera"),
        ({"image_b64": "AAAA", "frames": 2}, "frames: needs camera"),
    ],
)
def test_at_most_one_image_source(fields, message):
    with pytest.raises(ValidationError, match=message):
        ask(**fields)


def test_limits_come_from_the_context():
    limits = AskLimits(max_text_chars=10, max_frames=2, max_tokens=100)
    context = {"limits": limits}
    assert AskRequest.model_validate({"text": "x" * 10, "camera": "c", "frames": 2, "max_tokens": 100}, context=context)
    for fields, text in [
        ({"text": "x" * 11}, "longer than 10"),
        ({"text": "x", "system": "y" * 11}, "longer than 10"),
        ({"text": "x", "camera": "c", "frames": 3}, "at most 2 frames"),
        ({"text": "x", "max_tokens": 101}, "at most 100"),
    ]:
        with pytest.raises(ValidationError, match=text):
            AskRequest.model_validate(fields, context=context)
    with pytest.raises(ValidationError, match="longer than 4000"):
        ask(text="x" * 4001)  # the default limit without a context


def test_with_id_and_generated_ids():
    generated = {new_request_id() for _ in range(100)}
    assert len(generated) == 100 and all(is_valid_request_id(i) for i in generated)
    assert ask().with_id("abc").id == "abc"
    with pytest.raises(ValueError):
        ask().with_id("a/b")


def test_cancel_request():
    assert CancelRequest.model_validate({"id": "q1"}).id == "q1"
    with pytest.raises(ValidationError):
        CancelRequest.model_validate({})
    with pytest.raises(ValidationError):
        CancelRequest.model_validate({"id": "a#"})


def test_final_answer_shape_matches_the_design():
    final = AnswerFinal(
        id="q1", seq=3, text="a cat", finish_reason="stop",
        usage=Usage(prompt_tokens=80, completion_tokens=3), timings={"ttft_ms": 12.5, "prefix_reused": False},
    )
    data = json.loads(final.model_dump_json())
    assert data == {
        "v": 1, "id": "q1", "seq": 3, "done": True, "text": "a cat", "finish_reason": "stop", "error": None,
        "usage": {"prompt_tokens": 80, "completion_tokens": 3}, "timings": {"ttft_ms": 12.5, "prefix_reused": False},
    }
    rejected = AnswerFinal(id="q2", seq=0, finish_reason="rejected", error=ErrorInfo(code="busy", message="queue full"))
    assert json.loads(rejected.model_dump_json())["error"] == {"code": "busy", "message": "queue full"}


def test_unmeasured_timings_are_null():
    # A request cancelled before its first token has no TTFT; its final must still be sent.
    final = AnswerFinal(id="q1", seq=0, finish_reason="cancelled", timings={"ttft_ms": None, "decode_ms": 0.0})
    assert json.loads(final.model_dump_json())["timings"] == {"ttft_ms": None, "decode_ms": 0.0}


def test_outbound_models_refuse_typos_and_unknown_codes():
    with pytest.raises(ValidationError):
        AnswerChunk(id="q", seq=0, delta="x", detla="y")
    with pytest.raises(ValidationError):
        AnswerFinal(id="q", seq=0, finish_reason="finished")
    with pytest.raises(ValidationError):
        ErrorMessage(code="oops", message="m", topic="t", ts=0.0)
    with pytest.raises(ValidationError):
        Caption(camera="c", caption_id="1", text="t", ts=0.0, frame_ts=0.0, finish_reason="stop", extra=1)


def test_stats_is_open_for_extra_counters():
    stats = Stats(ts=1.0, uptime_s=2.0, queue_depth=0, frames={"cam": {"received": 3, "dropped": 1}}, captions=4)
    data = json.loads(stats.model_dump_json())
    assert data["frames"] == {"cam": {"received": 3, "dropped": 1}} and data["captions"] == 4


def test_error_codes_and_finish_reasons():
    assert set(ERROR_DESCRIPTIONS) == set(ERROR_CODES)
    assert len(ERROR_CODES) == 19
    assert FINISH_REASONS == ("stop", "length", "cancelled", "expired", "rejected", "failed", "shutdown")


def test_every_model_has_a_schema():
    schemas = json_schemas()
    assert set(schemas) == {
        "AskRequest", "CancelRequest", "AnswerChunk", "AnswerFinal", "Caption", "CaptionChunk", "ErrorMessage",
        "Stats", "WatchDefinition", "WatchState", "WatchEvent",
    }
    assert "required" not in schemas["AskRequest"]  # text is required unless the ask is a conversation reset
    assert schemas["WatchDefinition"]["required"] == ["camera", "question", "format"]
    assert schemas["AnswerFinal"]["properties"]["done"]["const"] is True


def test_committed_schemas_are_current():
    stale = schema_command.outdated(REPO / "docs" / "schema")
    assert not stale, f"docs/schema is out of date ({stale}): run `vlmd schema` from the repository root"


def test_schema_command_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "schema"
    assert vlmd_main(["schema", "--check", "--out", str(out)]) == 1
    assert vlmd_main(["schema", "--out", str(out)]) == 0
    assert vlmd_main(["schema", "--check", "--out", str(out)]) == 0
    (out / "Stats.json").write_text("{}")
    assert vlmd_main(["schema", "--check", "--out", str(out)]) == 1
    assert "Stats.json" in capsys.readouterr().err
