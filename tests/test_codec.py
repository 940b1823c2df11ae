"""protocol/codec.py: decoding requests into models or one ProtocolError, encoding replies;
and docs/protocol.md's examples, checked against the codec and run against mosquitto."""

from __future__ import annotations

import base64
import io
import json
import queue
import re
import shlex
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from protocol import payloads, watches
from protocol.codec import ProtocolError, decode_ask, decode_cancel, decode_message, decode_text_question, encode
from protocol.frames import decode_b64_image
from protocol.payloads import AnswerChunk, AnswerFinal, AskLimits, AskRequest, ErrorInfo, Usage
from protocol.topics import CAMERA_PATTERN, Topics, check_topic_filter
from protocol.watches import decode_watch
from tests.fixtures_broker import start_mosquitto

MAX = 100_000
DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def refused(payload: bytes, max_bytes: int = MAX, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as exc:
        decode_ask(payload, max_bytes, **kwargs)
    return exc.value


# --- decode_ask / decode_cancel -----------------------------------------------------


def test_valid_ask_decodes():
    request = decode_ask(b'{"v": 1, "id": "q1", "text": "hi", "camera": "front", "extra": [1]}', MAX)
    assert (request.id, request.text, request.camera) == ("q1", "hi", "front")
    assert decode_ask('{"text": "grüß dich"}'.encode(), MAX).text == "grüß dich"


def test_size_is_checked_before_parsing():
    payload = b'{"id": "big", "text": "' + b"x" * 200 + b'"'  # also invalid JSON: size wins
    error = refused(payload, max_bytes=100)
    assert error.code == "payload_too_large" and "100" in error.message
    assert error.request_id == "big"  # recovered from the start of the payload


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"", "invalid JSON"),
        (b"{'text': 'hi'}", "invalid JSON"),
        (b'["text"]', "JSON object"),
        (b'"text"', "JSON object"),
        (b"null", "JSON object"),
        (b'{"text": "x", "temperature": NaN}', "NaN"),
        (b'{"text": "x", "temperature": Infinity}', "Infinity"),
        (b'{"text": "x", "seed": ' + b"9" * 5000 + b"}", "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    ],
    ids=["utf8", "empty", "single-quotes", "array", "string", "null", "nan", "inf", "huge-int", "deep-array",
         "deep-object"],
)
def test_bad_json(payload, words):
    error = refused(payload, max_bytes=10**6)
    assert error.code == "bad_json" and words in error.message
    assert error.request_id is None


def test_broken_json_still_yields_the_id_when_it_can():
    assert refused(b'{"id": "q7", "text": "unterminated').request_id == "q7"
    assert refused(b'{"id": "a/b", "text": ').request_id is None  # not a valid id: not used


@pytest.mark.parametrize("version", [2, 0, -1])
def test_other_versions_are_unsupported(version):
    error = refused(json.dumps({"v": version, "id": "q1", "text": "x", "reply_to": "me/answers"}).encode())
    assert error.code == "unsupported_version" and str(version) in error.message
    assert (error.request_id, error.reply_to) == ("q1", "me/answers")


@pytest.mark.parametrize("version", ["1", 1.0, True, None])
def test_a_version_that_is_not_an_integer_is_a_bad_request(version):
    error = refused(json.dumps({"v": version, "text": "x"}).encode())
    assert error.code == "bad_request" and error.message.startswith("v:")


@pytest.mark.parametrize(
    "fields, field",
    [({}, "text"), ({"text": ""}, "text"), ({"text": "x", "top_p": 2}, "top_p"), ({"text": "x", "stream": "no"}, "stream"),
     ({"text": "x", "camera": "a b"}, "camera")],
)
def test_bad_requests_name_the_field_and_keep_the_reply_path(fields, field):
    error = refused(json.dumps({"id": "q1", "reply_to": "me/x", **fields}).encode())
    assert error.code == "bad_request" and error.message.startswith(f"{field}:")
    assert (error.request_id, error.reply_to) == ("q1", "me/x")


def test_invalid_id_or_reply_to_is_not_used_as_a_reply_path():
    error = refused(b'{"id": "a#b", "text": "x", "reply_to": "x/#"}')
    assert error.code == "bad_request" and error.request_id is None and error.reply_to is None
    assert "id:" in error.message and "reply_to:" in error.message


def test_limits_are_applied():
    limits = AskLimits(max_text_chars=5, max_frames=2, max_tokens=10)
    assert decode_ask(b'{"text": "12345", "camera": "c", "frames": 2, "max_tokens": 10}', MAX, limits).frames == 2
    assert "text:" in refused(b'{"text": "123456"}', limits=limits).message
    assert "frames:" in refused(b'{"text": "1", "camera": "c", "frames": 3}', limits=limits).message
    assert "max_tokens:" in refused(b'{"text": "1", "max_tokens": 11}', limits=limits).message


def test_cancel():
    assert decode_cancel(b'{"v": 1, "id": "q1"}').id == "q1"
    for payload in [b'{"v": 2, "id": "q1"}', b'{"id": 5}', b'{"id": "q1"', b"{}", b'{"id": "q1", "x": "' + b"y" * 5000 + b'"}']:
        with pytest.raises(ProtocolError) as exc:
            decode_cancel(payload)
        # The id names *another* request; its final must not be preempted.
        assert exc.value.request_id is None and exc.value.reply_to is None


# --- encode / decode_message --------------------------------------------------------


def test_encode_is_compact_utf8():
    data = encode(AnswerChunk(id="q1", seq=0, delta="Grün ✓"))
    assert data == '{"v":1,"id":"q1","seq":0,"delta":"Grün ✓"}'.encode()


def test_final_round_trip():
    final = AnswerFinal(
        id="q1", seq=2, text="t", finish_reason="cancelled", error=ErrorInfo(code="cancelled", message="by client"),
        usage=Usage(prompt_tokens=5, completion_tokens=2), timings={"ttft_ms": 1.5},
    )
    assert decode_message(AnswerFinal, encode(final)) == final
    with pytest.raises(ProtocolError) as exc:
        decode_message(AnswerFinal, b'{"v": 1, "id": "q1"}')
    assert exc.value.code == "bad_request" and "seq:" in exc.value.message


@settings(deadline=None)
@given(delta=st.text(), seq=st.integers(0, 10**6), request_id=st.from_regex(CAMERA_PATTERN, fullmatch=True))
def test_chunk_round_trip(delta, seq, request_id):
    chunk = AnswerChunk(id=request_id, seq=seq, delta=delta)
    assert decode_message(AnswerChunk, encode(chunk)) == chunk


asks = st.builds(
    AskRequest,
    id=st.none() | st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True),
    text=st.text(min_size=1, max_size=50).filter(str.strip),
    max_tokens=st.none() | st.integers(1, 4096),
    temperature=st.just(0.0) | st.floats(0.001, 5),  # 0 or at least MIN_TEMPERATURE
    top_p=st.floats(0.01, 1.0),
    top_k=st.integers(0, 100),
    seed=st.none() | st.integers(0, 2**64 - 1),
    stream=st.booleans(),
    camera=st.none() | st.from_regex(CAMERA_PATTERN, fullmatch=True),
)


@settings(deadline=None)
@given(request=asks)
def test_ask_round_trip(request):
    assert decode_ask(encode(request), MAX) == request


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
json_objects = st.fixed_dictionaries(
    {},
    optional={"v": json_values, "id": json_values, "text": json_values, "camera": json_values,
              "frames": json_values, "image_b64": json_values, "top_p": json_values, "reply_to": json_values},
)


@settings(max_examples=200, deadline=None)
@given(obj=json_objects | json_values)
def test_any_json_gives_a_request_or_a_protocol_error(obj):
    try:
        decode_ask(json.dumps(obj).encode(), MAX)
    except ProtocolError as exc:
        assert exc.code in payloads.ERROR_CODES


@settings(deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_give_a_request_or_a_protocol_error(data):
    try:
        decode_ask(data, MAX)
    except ProtocolError as exc:
        assert exc.code in payloads.ERROR_CODES


# --- docs/protocol.md -----------------------------------------------------------------

ROOT = "vlmd/demo"
DOC_TOPICS = Topics(ROOT, fleet_ask_topic="vlmd/fleet/ask")


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def shell_lines() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", doc_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def check_published(topic: str, payload: bytes) -> str:
    """Decode a published example the way the daemon does; return its route kind."""
    route = DOC_TOPICS.parse(topic)
    assert route is not None, f"documented topic {topic} is not vlmd's"
    if route.kind in ("ask", "fleet_ask"):
        request = decode_ask(payload, MAX * 100)
        if request.image_b64:
            assert decode_b64_image(request.image_b64, 10**7, 10**7).ndim == 3
    elif route.kind == "cancel":
        decode_cancel(payload)
    elif route.kind == "watch_config":
        if payload:  # empty: a deletion
            assert decode_watch(payload, route.name).name == route.name
    elif route.kind == "dashboard_ask":
        assert decode_text_question(payload, 4000)
    else:
        assert route.kind == "frame"
    return route.kind


def example_out_topics() -> list[str]:
    return [DOC_TOPICS.status(), DOC_TOPICS.answer("q1"), DOC_TOPICS.caption("front"),
            DOC_TOPICS.caption_stream("front"), DOC_TOPICS.error(), DOC_TOPICS.stats(),
            DOC_TOPICS.caption_image("front"), DOC_TOPICS.watch("parcel"), DOC_TOPICS.watch_event("parcel"),
            DOC_TOPICS.dashboard_answer("front"), "clients/me/answers", "clients/me/fleet"]


def filter_matches(topic_filter: str, topic: str) -> bool:
    pattern = re.escape(topic_filter).replace(r"\+", "[^/]+").replace("/\\#", "(/.*)?")
    return re.fullmatch(pattern, topic) is not None


def test_doc_examples_decode():
    lines = shell_lines()
    kinds = set()
    for line in lines:
        argv = shlex.split(line.split(" | ")[-1])
        if argv[0] == "mosquitto_sub":
            topic_filter = check_topic_filter(option(argv, "-t"))
            assert any(filter_matches(topic_filter, t) for t in example_out_topics()), line
        elif argv[0] in ("mosquitto_pub", "mosquitto_rr"):
            if "-m" in argv:
                kinds.add(check_published(option(argv, "-t"), option(argv, "-m").encode()))
            elif "-s" in argv:  # printf '<template>' "$(base64 -w0 frame.jpg)" | mosquitto_pub ... -s
                template = shlex.split(line.split(" | ")[0])[1]
                payload = template.replace("%s", base64.b64encode(tiny_jpeg()).decode()).encode()
                kinds.add(check_published(option(argv, "-t"), payload))
            else:
                assert "-f" in argv or "-n" in argv, line
                kinds.add(check_published(option(argv, "-t"), b""))
    assert kinds == {"ask", "fleet_ask", "cancel", "frame", "watch_config", "dashboard_ask"}


def test_doc_json_examples_are_valid_replies():
    text = doc_text()
    examples = re.findall(r"<!-- model: (\w+) -->\n```json\n(.*?)```", text, flags=re.S)
    assert len(examples) == len(re.findall("```json", text)) >= 7
    for model_name, body in examples:
        decode_message(getattr(payloads, model_name, None) or getattr(watches, model_name), body.strip())


def test_doc_lists_every_error_code_and_finish_reason():
    text = doc_text()
    codes = set(re.findall(r"^\| `(\w+)` \| [a-z`]", text.split("## Error codes")[1], flags=re.M))
    assert codes == set(payloads.ERROR_CODES)
    section = text.split("**Finish reasons.**")[1].split("###")[0].split("\n|---")[1]
    assert re.findall(r"^\| `(\w+)` \|", section, flags=re.M) == list(payloads.FINISH_REASONS)


@pytest.mark.broker
def test_doc_publish_examples_run_verbatim(tmp_path):
    """Every mosquitto_pub line, exactly as written, delivers a payload the codec accepts.

    The documented commands assume port 1883; the clients' own options file
    ($XDG_CONFIG_HOME/mosquitto_pub) points them at the test broker instead. The broker is
    private: retained messages other tests leave under vlmd/# must not reach the listener.
    """
    mosquitto = start_mosquitto(tmp_path)
    try:
        _run_doc_publish_examples(mosquitto, tmp_path)
    finally:
        mosquitto.process.terminate()
        mosquitto.process.wait(timeout=5)
        mosquitto.process.stderr.close()


def _run_doc_publish_examples(mosquitto, tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "mosquitto_pub").write_text(f"-p {mosquitto.port}\n")
    (config / "mosquitto_sub").write_text(f"-p {mosquitto.port}\n")
    (tmp_path / "frame.jpg").write_bytes(tiny_jpeg())
    env = {"PATH": "/usr/bin:/bin:/usr/sbin", "XDG_CONFIG_HOME": str(config), "HOME": str(tmp_path)}
    publish_lines = [line for line in shell_lines() if " mosquitto_pub " in f" {line} "]
    listener = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-t", "vlmd/#", "-F", "%t %x"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    received: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [received.put(row.rstrip("\n")) for row in listener.stdout], daemon=True)
    reader.start()
    try:
        _wait_until_listening(received, env)
        for line in publish_lines:
            done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=10)
            assert done.returncode == 0, f"{line}\n{done.stderr}"
        rows = [received.get(timeout=5) for _ in publish_lines]
    finally:
        listener.kill()
        listener.wait()
        reader.join(timeout=5)
        listener.stdout.close()
    kinds = []
    for topic, hex_payload in (row.split(" ", 1) for row in rows if not row.startswith(PROBE)):
        payload = bytes.fromhex(hex_payload)
        kinds.append(check_published(topic, payload))
        if kinds[-1] == "frame":
            assert payload == tiny_jpeg()
    assert len(kinds) == len(publish_lines)


PROBE = "vlmd/probe"


def _wait_until_listening(received: queue.Queue, env: dict) -> None:
    """Publish probes until the listener shows one: its subscription is then in place."""
    for _ in range(50):
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-t", PROBE, "-m", "1"], env=env, check=True, timeout=5)
        try:
            row = received.get(timeout=0.2)
        except queue.Empty:
            continue
        assert row.startswith(PROBE)
        while not received.empty():  # later probes may still arrive; drop them
            received.get_nowait()
        return
    pytest.fail("mosquitto_sub never received a probe")


@pytest.mark.broker
def test_doc_subscribe_examples_run_verbatim(mosquitto, tmp_path):
    """Every mosquitto_sub line, exactly as written, connects and subscribes (then times out)."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "mosquitto_sub").write_text(f"-p {mosquitto.port}\n-W 1\n")
    env = {"PATH": "/usr/bin:/bin:/usr/sbin", "XDG_CONFIG_HOME": str(config), "HOME": str(tmp_path)}
    # each as it is written, in the foreground: the docs send subscribers to the background (`&`)
    # so the commands after them run in the same shell (#21.14)
    lines = [line.split(" &")[0] for line in shell_lines() if line.startswith("mosquitto_sub ")]
    assert len(lines) >= 7
    runs = [
        subprocess.Popen(["bash", "-c", line], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        for line in lines
    ]
    for line, run in zip(lines, runs):
        _, err = run.communicate(timeout=10)
        assert run.returncode == 27, f"{line}: exit {run.returncode} (27 = timed out waiting)\n{err}"


def test_a_payload_that_is_not_utf8_keeps_its_top_level_id_not_a_nested_one():
    payload = b'{"meta": {"id": "nested"}, "id": "top", "reply_to": "me/x", "text": "caf\xe9"}'
    error = refused(payload)
    assert error.code == "bad_json" and "UTF-8" in error.message
    assert (error.request_id, error.reply_to) == ("top", "me/x")
    # a value that held the invalid byte is not what the client sent: not used
    error = refused(b'{"id": "t\xffp", "reply_to": "me/\xff", "text": "x"}')
    assert error.request_id is None and error.reply_to is None and error.reply_to_given
    # not JSON even leniently: the best-effort scan as before
    assert refused(b'{"id": "q7", "text": "\xff unterminated').request_id == "q7"
