"""The daemon's end-to-end path on a small random SmolVLM checkpoint: a camera frame and a
question over a real mosquitto, answered with the image in the prompt, a follow-up on the same
frame reusing its prefix, each answer the engine's own greedy answer on the same frame."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from daemon.service import Service, load_engine
from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt
from npu.model import load_model
from tests.fixtures_daemon import Collector, make_config, noise_png, wait_frames

pytestmark = pytest.mark.broker
BUILD = {"backend": "reference", "precision": "bf16", "kv_capacity": 256, "prefill_chunk": 128}


def test_a_frame_and_questions_over_mqtt(mosquitto, tiny_smolvlm):
    config = make_config(mosquitto.url, model={"path": str(tiny_smolvlm.path), **BUILD})
    service = Service(config, engine_factory=load_engine)
    client = Collector(mosquitto.host, mosquitto.port, [config.root + "/#"])
    frame = noise_png(21, size=(96, 64))
    service.start()
    try:
        topics = service.topics
        assert client.next(30, topics.status()).payload == b"online"
        client.publish(topics.frame("cam"), frame, qos=0)
        wait_frames(service, "cam", 1)
        finals = {}
        for request_id, text in (("first", "What is in the image?"), ("follow", "Is there a dog?")):
            client.publish(topics.ask(), {"id": request_id, "text": text, "camera": "cam", "max_tokens": 8})
            chunks, final = client.answer(topics.answer(request_id), timeout=120)
            assert final["finish_reason"] in ("stop", "length"), final
            assert "".join(c["delta"] for c in chunks) == final["text"]
            finals[request_id] = final
    finally:
        service.stop(2.0)
        client.close()
    first, follow = finals["first"], finals["follow"]
    assert first["usage"]["prompt_tokens"] > 64  # the image's 64 <image> rows are counted
    assert first["timings"]["images_encoded"] == 1 and not first["timings"]["prefix_reused"]
    assert follow["timings"]["images_encoded"] == 0 and follow["timings"]["prefix_reused"]

    engine = Engine(load_model(tiny_smolvlm.path, **{k: v for k, v in BUILD.items()}))
    rgb = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB"))
    for request_id, text in (("first", "What is in the image?"), ("follow", "Is there a dog?")):
        done = [e for e in engine.generate(Prompt(text, images=[rgb], image_key="cam:1"),
                                           GenerationOptions(max_tokens=8)) if isinstance(e, DoneEvent)][0]
        assert finals[request_id]["text"] == done.text, request_id
    other = [e for e in engine.generate(Prompt("What is in the image?", images=[255 - rgb]),
                                        GenerationOptions(max_tokens=8)) if isinstance(e, DoneEvent)][0]
    assert other.text != first["text"]  # the answer follows the image
