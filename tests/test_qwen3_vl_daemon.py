"""The daemon's end-to-end path on a tiny random Qwen3-VL checkpoint: an MQTT question on a
camera frame, a follow-up that reuses the image prefix, a typed answer and a conversation's
second turn, and `vlmd ask` with an image, all through the reference backend."""

from __future__ import annotations

import json

from PIL import Image

from daemon.cli import main
from daemon.service import Service, load_engine
from tests import model_dims
from tests.fixtures_daemon import Collector, make_config, noise_png, wait_frames

IMAGE_TOKENS = 9  # tests/model_factory_qwen3vl.py: a 96 px graph, 3 x 3 merged tokens


def test_mqtt_questions_follow_up_typed_answer_and_conversation(mosquitto, tiny_qwen3_vl):
    model = {"path": str(tiny_qwen3_vl.path), "backend": "reference", "precision": "bf16", "kv_capacity": 256,
             "prefill_chunk": 32}
    config = make_config(mosquitto.url, model=model)
    service = Service(config, engine_factory=load_engine)
    client = Collector(mosquitto.host, mosquitto.port, [config.root + "/#"])
    service.start()
    try:
        topics = service.topics
        assert client.next(30, topics.status()).payload == b"online"
        client.publish(topics.frame("cam"), noise_png(5, size=(96, 64)), qos=0)
        wait_frames(service, "cam", 1)
        finals = {}
        requests = [
            {"id": "first", "text": "What is in the image?", "camera": "cam", "max_tokens": 6},
            {"id": "follow", "text": "And what colour is it?", "camera": "cam", "max_tokens": 6},
            {"id": "typed", "text": "Is there a person?", "camera": "cam", "format": {"type": "boolean"}},
            {"id": "talk1", "text": "Describe it.", "camera": "cam", "conversation": "q3", "max_tokens": 4},
            {"id": "talk2", "text": "Why?", "conversation": "q3", "max_tokens": 4},
        ]
        for request in requests:
            client.publish(topics.ask(), request)
            chunks, final = client.answer(topics.answer(request["id"]), timeout=120)
            assert final["finish_reason"] in ("stop", "length"), final
            assert "".join(c["delta"] for c in chunks) == final["text"]
            finals[request["id"]] = final
        assert finals["first"]["usage"]["prompt_tokens"] > IMAGE_TOKENS
        assert finals["first"]["timings"]["images_encoded"] == 1
        assert finals["follow"]["timings"]["prefix_reused"] and finals["follow"]["timings"]["images_encoded"] == 0
        assert isinstance(finals["typed"]["value"], bool)
        assert finals["talk2"]["turn"] == 2 and finals["talk2"]["timings"]["history_rows"] > IMAGE_TOKENS
    finally:
        service.stop(2.0)
        client.close()


def test_vlmd_ask_with_an_image(capsys, tmp_path, tiny_qwen3_vl):
    image = tmp_path / "frame.png"
    Image.fromarray(model_dims.random_image(seed=2, height=120, width=160)).save(image)
    code = main(["ask", "--model", str(tiny_qwen3_vl.path), "--image", str(image), "--max-tokens", "5",
                 "--precision", "fp32", "--json", "What is this?"])
    out, err = capsys.readouterr()
    assert code == 0, err
    final = json.loads(out.rstrip("\n").rsplit("\n", 1)[1])
    assert final["finish_reason"] in ("stop", "length") and final["timings"]["images_encoded"] == 1
    assert final["usage"]["prompt_tokens"] > IMAGE_TOKENS
