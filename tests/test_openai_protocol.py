"""protocol/openai.py: a chat request validated once, by the MQTT ask's rules and words, each
refusal naming its field in OpenAI's error shape."""

from __future__ import annotations

import base64
import json

import pytest

from protocol import codec
from protocol.openai import ChatCompletionRequest, ImageRef, OpenAIError, _format, parse_chat
from protocol.payloads import AskLimits
from tests.fixtures_daemon import png_bytes

PNG = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()


def parse(limits=AskLimits(max_tokens=512), hosts=frozenset(), **fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat(json.dumps(body).encode(), limits, "m", "chatcmpl-1", hosts, 1_000_000)


def refused(**fields) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse(**fields)
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}
    return caught.value


def test_options_map_onto_the_ask_and_unknown_fields_are_ignored():
    chat = parse(max_completion_tokens=20, temperature=0, top_p=0.5, seed=3, stop="END", frequency_penalty=1,
                 user="u", something_new={"x": 1}, stream=True, stream_options={"include_usage": True})
    ask = chat.ask
    assert (ask.max_tokens, ask.temperature, ask.top_p, ask.seed, ask.stream) == (20, 0.0, 0.5, 3, True)
    assert chat.stop == ("END",) and chat.include_usage and ask.text == "hi"
    assert "temperature" in ask.model_fields_set and "top_k" not in ask.model_fields_set  # model defaults for the rest


def test_messages_keep_roles_and_parts_in_order():
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Image 1:"},
                                             {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
                                             {"type": "text", "text": "What is it?"}]}]
    chat = parse(messages=messages)
    assert chat.messages[0] == ("system", ("Be brief.",)) and chat.ask.system == "Be brief."
    role, parts = chat.messages[1]
    assert role == "user" and parts[0] == "Image 1:" and parts[2] == "What is it?"
    assert isinstance(parts[1], ImageRef) and parts[1].data == png_bytes()
    assert chat.ask.text == "Image 1:\nWhat is it?"


@pytest.mark.parametrize("fields, param", [
    ({"n": 2}, "n"), ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"), ({"audio": {"voice": "x"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"messages": [{"role": "tool", "content": "1", "tool_call_id": "a"}, {"role": "user", "content": "x"}]},
     "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG}}]},
                   {"role": "user", "content": "x"}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"max_completion_tokens": 513}, "max_completion_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"seed": -1}, "seed"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig",
                                                                                     "pattern": "a"}}}},
     "response_format"),
    ({"model": "other"}, "model"),
])
def test_refusals_name_their_field(fields, param):
    error = refused(**fields)
    assert error.param == param and error.status in (400, 404)
    assert error.message.split(":")[0].startswith(param.split(".")[0].split("[")[0]) or error.status == 404


def test_the_words_are_the_mqtt_asks():
    error = refused(temperature=0.0001)
    with pytest.raises(codec.ProtocolError) as mqtt:
        codec.validate_ask({"text": "hi", "temperature": 0.0001})
    assert error.message == mqtt.value.message


@pytest.mark.parametrize("url, code", [
    ("data:text/plain;base64,aGk=", None), ("data:image/png,notbase64", None),
    ("data:image/png;base64,@@@@", "bad_image"), ("http://cam.local/x.jpg", None), ("ftp://x/y.png", None),
])
def test_image_urls_that_are_refused(url, code):
    error = refused(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    assert error.param == "messages[0].content[0].image_url.url" and error.code == code


def test_an_allow_listed_host_is_left_to_fetch():
    url = "http://cam.local/x.jpg"
    chat = parse(hosts=frozenset({"cam.local"}),
                 messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, "hi"
                                                         and {"type": "text", "text": "hi"}]}])
    assert chat.messages[0][1][0] == ImageRef(url=url, param="messages[0].content[0].image_url.url")


def test_response_formats_become_the_asks_format():
    """json_schema (strict or not) gives its schema, json_object an object; they are then checked as
    MQTT's `format` is (today's flat subset has no bare object, so json_object is refused there: #22 item 6)."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for strict in (True, False, None):
        chat = parse(response_format={"type": "json_schema", "json_schema": {"name": "r", "strict": strict,
                                                                             "schema": schema}})
        assert chat.ask.format["properties"]["ok"]["type"] == "boolean"
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                    "response_format": {"type": "json_object"}})
    assert _format(request) == {"type": "object"}
    assert parse(response_format={"type": "text"}).ask.format is None
