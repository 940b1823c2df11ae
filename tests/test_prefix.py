"""The follow-up decisions (npu/prefix.py, npu/prefill.py pricing) without a model."""

from types import SimpleNamespace

import numpy as np
import pytest

from npu.engine.kv_cache import KVSnapshot, PrefixEntry, PrefixStore
from npu.engine.prefill import plan_seconds
from npu.engine.prefix import find_follow_up, follow_up_start, prefix_key
from npu.engine.prompt import EncodedPrompt, Prompt

# Only the fields the planner reads: chunk 16, history groups at rows 16 and 32.
SHAPES = SimpleNamespace(chunk=16, history_groups={16: 2, 32: 3})
IMAGE = np.zeros((4, 4, 3), np.uint8)


def entry(length: int, with_embeds: bool = True) -> PrefixEntry:
    snapshot = KVSnapshot(length, np.zeros((1, length, 2)), np.zeros((1, length, 2)))  # (n_layers, length, kv_dim)
    return PrefixEntry(tuple(range(length)), snapshot, np.zeros((length, 4)) if with_embeds else None)


def test_prefix_key_needs_images_and_an_image_key():
    assert prefix_key(Prompt("q"), "Hermes-2") is None
    assert prefix_key(Prompt("q", images=[IMAGE]), "Hermes-2") is None
    assert prefix_key(Prompt("q", images=[IMAGE], image_key="cam1:1", system="s"), "Hermes-2") == (
        "cam1:1", 1, "s", "Hermes-2")


def test_find_follow_up_refuses_image_rows_beyond_the_snapshot():
    store = PrefixStore(2)
    stored = entry(10)
    store.put("k", stored.token_ids, stored.snapshot, stored.embeds)
    ids = list(range(10)) + [99, 98]
    assert find_follow_up(store, "k", EncodedPrompt(ids, 10, np.arange(2, 6))).snapshot is stored.snapshot
    assert find_follow_up(store, "k", EncodedPrompt(ids, 10, np.arange(8, 12))) is None
    assert find_follow_up(store, None, EncodedPrompt(ids, 10, np.arange(2, 6))) is None


@pytest.mark.parametrize("policy, expected", [("never", 20), ("always", 16)])
def test_fixed_policies(policy, expected):
    assert follow_up_start(entry(20), 40, SHAPES, policy, {}) == expected


def test_auto_resumes_without_measurements_or_saved_inputs():
    measured = {0: 1.0, 1: 1e-3, 2: 1e-3, 3: 1e-3}
    assert follow_up_start(entry(20), 40, SHAPES, "auto", {}) == 20
    assert follow_up_start(entry(20, with_embeds=False), 40, SHAPES, "always", measured) == 20


def test_auto_picks_the_cheapest_plan():
    # Resume at 20: 12 decode calls (16..31 minus 16..19 done) then group 3; replay from 16: group 2, group 3.
    assert plan_seconds(SHAPES, 20, 40, {0: 1.0, 3: 1.0}) == 13.0
    assert plan_seconds(SHAPES, 20, 40, {3: 1.0}) is None
    dear_decode = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    assert follow_up_start(entry(20), 40, SHAPES, "auto", dear_decode) == 16
    cheap_decode = {0: 1e-6, 1: 1.0, 2: 1.0, 3: 1.0}
    assert follow_up_start(entry(20), 40, SHAPES, "auto", cheap_decode) == 20
