"""What a daemon runs is said at start and in its stats (issue 11 item 3): one log line with
the model's path, layout, backend, provider, precision, template, KV capacity, prefill
chunk and image tokens, and the same facts in the retained stats message. With the real
demo model on the reference backend and a real mosquitto."""

from __future__ import annotations

import json
import uuid

import pytest

from daemon.config import load_config
from daemon.service import Service
from npu.model import DEMO_MODEL_DIR
from tests.fixtures_daemon import Collector

pytestmark = pytest.mark.broker

FACTS = ("path", "layout", "backend", "provider", "precision", "template", "kv_capacity", "prefill_chunk",
         "image_tokens", "data_path", "data_path_reason")


def test_start_logs_the_model_once_and_stats_carry_it(json_logs, mosquitto, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMD_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config(None, env={}, overrides={
        "device_id": "facts" + uuid.uuid4().hex[:6], "stats": {"interval_s": 0.2},
        "mqtt": {"broker": mosquitto.url, "protocol": "5", "persistent_session": False},
        "model": {"kv_capacity": 300, "prefill_chunk": 32}})
    service = Service(config)  # the default engine factory: the demo model, reference backend
    client = Collector(mosquitto.host, mosquitto.port, [service.topics.stats()])
    try:
        service.start()
        assert service.client.wait_connected(15)
        for _ in range(20):
            service.tick()
            stats = json.loads(client.next(10, service.topics.stats()).payload)
            if stats.get("model"):
                break
    finally:
        service.stop(1.0)
        client.close()
    (line,) = [line for line in json_logs() if line.get("event") == "model loaded"]
    facts = {key: line[key] for key in FACTS}
    assert facts == {"path": str(DEMO_MODEL_DIR), "layout": "hf", "backend": "reference", "provider": None,
                     "precision": "bf16", "template": "Hermes-2", "kv_capacity": 300, "prefill_chunk": 32,
                     "image_tokens": 64, "data_path": "host", "data_path_reason": "reference backend: no device memory"}
    assert stats["model"] == facts
