"""The OpenAI-compatible API of `vlmd serve --http`, with the real `openai` package against a
running service (real mosquitto, the demo model): models, greedy answers about drawn scenes
identical to `vlmd ask`, streamed and not, Frigate's and Home Assistant LLM Vision's request
shapes, prefix reuse across an Open WebUI-style chat, and every bad input as a 4xx in
OpenAI's error shape while MQTT keeps serving."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jsonschema
import openai
import pytest
from PIL import Image

from daemon.cli import main as cli_main
from daemon.commands.demo.scenes import draw_scene
from npu.model import DEMO_MODEL_DIR
from tests.fixtures_broker import free_port, wait_for_port
from tests.fixtures_daemon import Daemon, FakeEngine, wait_for
from tests.schemas import ReviewMetadata, frigate_review_schema
from tests.test_answers_mqtt import demo_engine  # noqa: F401 (module fixture: one engine for the file)

pytestmark = pytest.mark.broker
MODEL = DEMO_MODEL_DIR.name
KEY = "sk-test-key-1"


def data_uri(image: Image.Image, kind: str = "png") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if kind == "jpeg" else "PNG")
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def served(mosquitto, demo_engine, tmp_path):  # noqa: F811
    keys = tmp_path / "keys"
    keys.write_text(f"# keys\n{KEY}\n")
    created = []

    def make(engine=None, **overrides) -> Daemon:
        demo_engine.prefixes.clear()
        http = {"listen": "127.0.0.1:0", "api_keys_file": keys, **overrides.pop("http", {})}
        created.append(Daemon(mosquitto, engine=engine or demo_engine, http=http, **overrides))
        return created[-1]

    yield make
    for d in created:
        d.close()


def client(d: Daemon, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.service.http.url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(d: Daemon, body: bytes | dict, key: str | None = KEY, path: str = "/v1/chat/completions"):
    """A raw request: (status, headers, parsed JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", d.service.http.port, timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    connection.request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(), headers)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), json.loads(payload)


def vlmd_ask(capsys, tmp_path, image: Image.Image, question: str) -> str:
    path = tmp_path / "scene.png"
    image.save(path)
    assert cli_main(["ask", "--image", str(path), "--max-tokens", "64", "--json", question]) == 0
    return json.loads(capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[1])["text"]


def test_models_lists_the_loaded_model_with_its_kv_capacity(served):
    d = served()
    models = client(d).models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "vlmd" and models[0].model_extra["max_model_len"] == d.engine.shapes.capacity


def test_healthz_and_unknown_endpoints(served):
    d = served()
    connection = http.client.HTTPConnection("127.0.0.1", d.service.http.port, timeout=30)
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    connection.request("GET", "/v1/embeddings")
    response = connection.getresponse()
    assert response.status == 404 and json.loads(response.read())["error"]["code"] == "not_found"
    connection.request("GET", "/v1/chat/completions")
    response = connection.getresponse()
    assert response.status == 405 and set(json.loads(response.read())["error"]) == {"message", "type", "param", "code"}
    connection.close()
    assert post(d, {}, key=None, path="/v1/models")[0] == 405  # GET only
    connection = http.client.HTTPConnection("127.0.0.1", d.service.http.port, timeout=30)
    connection.request("GET", "/v1/models")  # no key
    response = connection.getresponse()
    assert response.status == 401 and json.loads(response.read())["error"]["code"] == "invalid_api_key"
    connection.close()


@pytest.mark.parametrize("seed", [3, 11])
def test_greedy_answers_about_scenes_are_vlmd_asks_streamed_and_not(served, capsys, tmp_path, seed):
    d = served()
    image, scene = draw_scene(seed)
    question = f"What colour is the {scene.shapes[0].kind}?"
    expected = vlmd_ask(capsys, tmp_path, image, question)
    assert expected.strip()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                             {"type": "text", "text": question}]}]
    whole = client(d).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=64)
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    assert scene.shapes[0].colour in expected  # and it is right
    pieces, usage = [], None
    for chunk in client(d).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=64,
                                                   stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        else:
            usage = chunk.usage
    assert "".join(pieces) == expected
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1  # the same prompt again


def test_frigates_request_shape_is_answered(served):
    """Frigate's OpenAI provider: one user message, the prompt then each frame as a JPEG data URI, detail low."""
    d = served()
    frames = [draw_scene(seed)[0] for seed in (5, 6)]
    content = [{"type": "text", "text": "Describe what happens in these frames."}]
    content += [{"type": "image_url", "image_url": {"url": data_uri(f, "jpeg"), "detail": "low"}} for f in frames]
    answer = client(d).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                               timeout=60)
    assert answer.choices[0].message.content.strip()
    assert answer.usage.prompt_tokens > 2 * d.engine.shapes.image_tokens


def test_llm_visions_request_shape_is_answered_after_its_hi(served):
    """LLM Vision's Custom OpenAI provider: a text-only "Hi" at setup, then a system message and per
    image "Image N:" + image_url, then the prompt; it refuses an empty key, so one is set."""
    d = served()
    hi = client(d).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=10)
    assert hi.choices[0].message.content
    content = []
    for n, seed in enumerate((8, 9), start=1):
        content += [{"type": "text", "text": f"Image {n}:"},
                    {"type": "image_url", "image_url": {"url": data_uri(draw_scene(seed)[0], "jpeg")}}]
    content.append({"type": "text", "text": "Describe the image."})
    messages = [{"role": "system", "content": "Your task is to analyse images."}, {"role": "user", "content": content}]
    answer = client(d).chat.completions.create(model=MODEL, messages=messages, max_tokens=60)
    assert answer.choices[0].message.content.strip()


def test_a_three_turn_chat_reuses_the_earlier_turns_rows(served):
    d = served()
    image = data_uri(draw_scene(21)[0])
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": "Describe the image."}]}]
    prompts, cached = [], []
    for follow_up in ("What shapes are there?", "How many are red?", None):
        answer = client(d).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
        prompts.append(answer.usage.prompt_tokens)
        cached.append(answer.usage.prompt_tokens_details.cached_tokens)
        if follow_up:
            messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                         {"role": "user", "content": follow_up}]
    assert cached[0] < prompts[0] - d.engine.shapes.image_tokens  # the image was encoded the first time
    assert cached[1] > prompts[0] and cached[2] > prompts[1]  # each later turn kept the whole earlier prompt


def test_response_format_with_a_flat_schema_constrains_the_answer(served):
    d = served()
    image, scene = draw_scene(4)
    schema = {"type": "object", "properties": {"present": {"type": "boolean"}}, "required": ["present"]}
    answer = client(d).chat.completions.create(
        model=MODEL, temperature=0, response_format={"type": "json_schema",
                                                     "json_schema": {"name": "check", "strict": True, "schema": schema}},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                               {"type": "text", "text": f"Is there a {scene.shapes[0].kind}?"}]}])
    assert isinstance(json.loads(answer.choices[0].message.content)["present"], bool)


def test_frigates_review_schema_yields_answers_that_validate(served):
    """Frigate's review description request: its strict response_format (the schema its pydantic
    model gives, built as Frigate builds it: tests/schemas.py) with two frames; the demo model knows
    nothing of reviews, so only validity is asked of the answer, and json_object gives an object."""
    d = served()
    schema = frigate_review_schema(["a person at the gate"])
    frames = [{"type": "image_url", "image_url": {"url": data_uri(draw_scene(seed)[0], "jpeg"), "detail": "low"}}
              for seed in (5, 6)]
    answer = client(d).chat.completions.create(
        model=MODEL, temperature=0, max_tokens=760,  # the KV rows left after two frames
        response_format={"type": "json_schema", "json_schema": {"name": "review_metadata", "strict": True,
                                                                "schema": schema}},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Describe the activity in these frames."},
                                               *frames]}])
    assert answer.choices[0].finish_reason == "stop", (answer.usage, answer.choices[0].message.content)
    value = json.loads(answer.choices[0].message.content)
    jsonschema.validate(value, schema)
    ReviewMetadata.model_validate(value)
    loose = client(d).chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe the image as JSON."}])
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(loose.choices[0].message.content), dict)
    else:  # out of tokens inside the object: OpenAI's own behaviour, said by finish_reason
        assert loose.choices[0].finish_reason == "length"


def test_stop_seed_and_max_completion_tokens_are_honoured(served):
    d = served()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(draw_scene(2)[0])}},
                                             {"type": "text", "text": "Describe the image."}]}]
    full = client(d).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=60)
    text = full.choices[0].message.content
    word = text.split()[2]
    stopped = client(d).chat.completions.create(model=MODEL, messages=messages, temperature=0, stop=[word])
    assert stopped.choices[0].message.content == text[:text.index(word)]
    assert stopped.choices[0].finish_reason == "stop"
    short = client(d).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_completion_tokens=2)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    sampled = [client(d).chat.completions.create(model=MODEL, messages=messages, temperature=1.5, seed=7,
                                                 max_tokens=20).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def _bad_inputs(image: str, tiny: str, huge: str):
    user = lambda *parts: {"model": MODEL, "messages": [{"role": "user", "content": list(parts)}]}  # noqa: E731
    text = {"type": "text", "text": "What is this?"}
    url = lambda u: {"type": "image_url", "image_url": {"url": u}}  # noqa: E731
    return [
        ("malformed JSON", b'{"model": "x", "messages": [', 400, None),
        ("messages not a list", {"model": MODEL, "messages": "hello"}, 400, "messages"),
        ("non-image data URI", user(text, url("data:text/plain;base64,aGVsbG8=")), 400,
         "messages[0].content[1].image_url.url"),
        ("truncated image", user(text, url(image[:len(image) // 2 // 4 * 4])), 400, "messages[0].content[1].image_url.url"),
        ("oversized image", user(text, url(huge)), 400, "messages[0].content[1].image_url.url"),
        ("unsupported schema keyword", {**user(text), "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"not": {"type": "string"}}}}}, 400, "response_format"),
        ("prompt over the KV capacity", user(*[url(tiny)] * 16, text), 400, "messages"),
        ("n: 3", {**user(text), "n": 3}, 400, "n"),
        ("tools", {**user(text), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ("http image URL", user(text, url("http://example.invalid/a.jpg")), 400, "messages[0].content[1].image_url.url"),
        ("temperature out of range", {**user(text), "temperature": 1000}, 400, "temperature"),
        ("unknown model", {**user(text), "model": "gpt-4o"}, 404, "model"),
    ]


def test_every_bad_input_is_a_4xx_in_openais_shape_logged_once_while_mqtt_serves(served, json_logs):
    d = served(http={"max_body_bytes": 3_000_000}, frames={"max_pixels": 1_000_000})
    image = data_uri(draw_scene(1)[0])
    tiny = data_uri(Image.new("RGB", (8, 8), (0, 0, 255)))
    huge = data_uri(Image.new("RGB", (1200, 1000), (0, 0, 255)))  # 1.2 megapixels, a small PNG
    cases = _bad_inputs(image, tiny, huge)
    for name, body, status, param in cases:
        got, _, error = post(d, body)
        assert got == status, (name, error)
        assert set(error["error"]) == {"message", "type", "param", "code"}, name
        assert error["error"]["param"] == param, (name, error)
        assert error["error"]["message"], name
    assert post(d, {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3_000_001}]})[0] == 413
    status, _, error = post(d, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, key="sk-wrong")
    assert status == 401 and error["error"]["code"] == "invalid_api_key"
    assert post(d, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, key=None)[0] == 401
    refusals = [line for line in json_logs() if line.get("event") == "http request refused"]
    assert len(refusals) == len(cases) + 3  # each logged once
    d.ask(id="after-bad-http", text="Hi", max_tokens=5)  # MQTT kept serving meanwhile
    _, final = d.client.answer(d.topics.answer("after-bad-http"), timeout=30)
    assert final["finish_reason"] in ("stop", "length")
    assert d.service.stats_message().model_extra["interfaces"]["mqtt"]["stop" if final["finish_reason"] == "stop"
                                                                       else "length"] >= 1


def test_a_full_queue_is_429_with_retry_after(served):
    engine = FakeEngine(token_delay_s=0.3, extra_words=10)
    d = served(engine=engine, requests={"queue_size": 1})
    body = {"model": "model", "messages": [{"role": "user", "content": "hi"}]}
    results = []
    threads = [threading.Thread(target=lambda: results.append(post(d, body))) for _ in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(60)
    busy = [r for r in results if r[0] == 429]
    assert busy and all(int(r[1]["retry-after"]) >= 1 and r[2]["error"]["code"] == "rate_limit_exceeded" for r in busy)
    assert any(r[0] == 200 for r in results)


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(served):
    engine = FakeEngine(token_delay_s=0.2, extra_words=200)
    d = served(engine=engine)
    connection = http.client.HTTPConnection("127.0.0.1", d.service.http.port, timeout=30)
    body = {"model": "model", "stream": True, "messages": [{"role": "user", "content": "talk"}]}
    connection.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    assert response.read(6) == b"data: "  # the first event came: the job runs
    connection.sock.shutdown(socket.SHUT_RDWR)
    response.close()
    connection.close()
    counts = lambda: d.service.stats.by_interface.get("http", {})  # noqa: E731
    wait_for(lambda: counts().get("cancelled", 0) == 1, timeout=30, what="the stream's job cancelled")
    assert d.service.inbox.running is None


def test_serve_refuses_a_public_listen_address_without_keys():
    from daemon.config import EX_CONFIG

    assert cli_main(["serve", "--http", "0.0.0.0:0"]) == EX_CONFIG


@pytest.mark.slow
def test_vlmd_serve_http_answers_as_a_process(tmp_path):
    """The real command line: `vlmd serve --http HOST:PORT` in its own process, its embedded broker."""
    port = free_port()
    env = {**os.environ, "VLMD_EMBEDDED_BROKER__PORT": "0", "XDG_STATE_HOME": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--device-id", "http-proc", "--http",
                                f"127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in api.models.list().data] == [MODEL]
        answer = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
        assert answer.choices[0].message.content
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors.decode()[-2000:]
