"""Engine logic against small exact fake graphs (strict feeds, real attention, real tokenizer).

The fake layer graphs compute genuine causal attention over the K/V rows the engine
feeds them, with the board's mask semantics, so any mistake in cache rows, positions,
masks, chunk padding or history feeding changes the tokens. Every fake checks its feed
with `npu.session.check_feed`, so names, shapes and dtypes must match the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npu.engine import (DoneEvent, Engine, EngineError, GenerationOptions, ImageError, NumericError, Prompt,
                        PromptTooLong, RequestError, TokenEvent, UnsupportedOptions, argmax_logits, bf16_order_keys,
                        plan_prefill)
from npu.model import ModelError, read_shapes
from npu.engine.sampling import Sampler, SamplingParams, top_k_indices
from npu.image import IMAGENET_MEAN, IMAGENET_STD
from npu.session import BF16, TensorSpec, check_feed
from npu.text.template import ChatTemplate
from npu.text.tokenizer import Tokenizer
from tests.tokenizer_files import require_qwen2_vocab, write_internvl2_tokenizer

HIDDEN, KV_DIM, N_LAYERS, IMAGE_TOKENS, VISION_SIDE = 8, 4, 2, 4, 28
F32 = np.dtype(np.float32)
U32 = np.dtype(np.uint32)


def spec(name, shape, dtype):
    return TensorSpec(name, tuple(shape), np.dtype(dtype))


class FakeLayer:
    """One decoder layer: exact single-head attention with the board's graph contract."""

    def __init__(self, index, capacity, chunk, history_lengths, dtype, seed=0):
        self.name = f"layer{index}"
        rng = np.random.default_rng(seed * 100 + index)
        self.wq, self.wk, self.wv = (rng.standard_normal((HIDDEN, KV_DIM)) for _ in range(3))
        self.wo = rng.standard_normal((KV_DIM, HIDDEN)) / 2
        self.dtype = np.dtype(dtype)
        self._in = [[spec("K_cache", (1, capacity, KV_DIM), dtype), spec("V_cache", (1, capacity, KV_DIM), dtype),
                     spec("indices", (1, 1), U32), spec("input", (1, 1, HIDDEN), dtype),
                     spec("mask", (1, 1, capacity + 1), dtype)]]
        self._out = [self._outputs(1)]
        if chunk:
            for history in (0, *history_lengths):
                kv_rows = history if history else 1  # group 1's placeholders: any shape the build chose
                self._in.append([spec("K_cache", (1, kv_rows, KV_DIM), dtype), spec("V_cache", (1, kv_rows, KV_DIM), dtype),
                                 spec("indices", (1, chunk), U32), spec("input", (1, chunk, HIDDEN), dtype),
                                 spec("mask", (1, chunk, history + chunk), dtype)])
                self._out.append(self._outputs(chunk))
        self.num_groups = len(self._in)
        self.calls: list[int] = []

    def _outputs(self, rows):
        return [spec("K_cache_out", (1, rows, KV_DIM), self.dtype), spec("V_cache_out", (1, rows, KV_DIM), self.dtype),
                spec("output", (1, rows, HIDDEN), self.dtype)]

    def inputs(self, group=0):
        return list(self._in[group])

    def outputs(self, group=0):
        return list(self._out[group])

    def run(self, feed, group=0):
        check_feed(self, feed, group)
        self.calls.append(group)
        x = feed["input"][0].astype(np.float64)  # (rows, hidden)
        pos = feed["indices"][0].astype(np.float64)  # (rows,)
        x = x + 0.5 * np.sin(pos[:, None] * np.linspace(0.1, 1.0, HIDDEN))
        k_new, v_new, q = x @ self.wk, x @ self.wv, x @ self.wq  # (rows, kv_dim)
        # The engine's stored rows are in the graph dtype; use the same rounding for new rows.
        k_new = k_new.astype(self.dtype).astype(np.float64)
        v_new = v_new.astype(self.dtype).astype(np.float64)
        if group == 1:
            keys, values = k_new, v_new
        else:
            keys = np.concatenate([feed["K_cache"][0].astype(np.float64), k_new])
            values = np.concatenate([feed["V_cache"][0].astype(np.float64), v_new])
        scores = q @ keys.T / np.sqrt(KV_DIM) + feed["mask"][0].astype(np.float64)  # (rows, columns)
        scores -= scores.max(axis=1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=1, keepdims=True)
        out = x + np.tanh(weights @ values) @ self.wo
        return [k_new[None].astype(self.dtype), v_new[None].astype(self.dtype), out[None].astype(self.dtype)]


class FakePost:
    """Logits = tanh(hidden) @ W; `forced` maps a call number to a token that wins it."""

    def __init__(self, vocab, dtype, forced=None, seed=0):
        self.name, self.num_groups = "post", 1
        self.vocab = vocab
        self.w = np.random.default_rng(seed).standard_normal((HIDDEN, vocab)).astype(np.float32)  # (hidden, vocab)
        self.dtype = np.dtype(dtype)
        self.forced = dict(forced or {})
        self.calls = 0
        self.seen: list[np.ndarray] = []  # every logits row computed, float32

    def inputs(self, group=0):
        return [spec("input", (1, 1, HIDDEN), self.dtype)]

    def outputs(self, group=0):
        return [spec("output", (1, 1, self.vocab), self.dtype)]

    def logits(self, feed):
        check_feed(self, feed, 0)
        logits = np.tanh(feed["input"][0, 0].astype(np.float32)) @ self.w  # (vocab,)
        self.seen.append(logits.copy())  # before forcing: what the graphs computed
        if self.calls in self.forced:
            logits[self.forced[self.calls]] = logits.max() + 10
        self.calls += 1
        return logits

    def run(self, feed, group=0):
        return [self.logits(feed).astype(self.dtype).reshape(1, 1, -1)]


class FakeTopkPost(FakePost):
    """A --post_topk build: the k best (values, indices) instead of logits."""

    def __init__(self, vocab, dtype, k=5, **kwargs):
        super().__init__(vocab, dtype, **kwargs)
        self.k = k

    def outputs(self, group=0):
        return [spec("values", (1, 1, self.k), self.dtype), spec("indices", (1, 1, self.k), np.int32)]

    def run(self, feed, group=0):
        logits = self.logits(feed)
        best = np.argsort(-logits)[:self.k]
        return [logits[best].astype(self.dtype).reshape(1, 1, -1), best.astype(np.int32).reshape(1, 1, -1)]


class FakeIdsOnlyPost(FakeTopkPost):
    """A --post_topk build that returns only the candidate ids, no scores."""

    def outputs(self, group=0):
        return [spec("indices", (1, 1, self.k), np.int32)]

    def run(self, feed, group=0):
        return [super().run(feed, group)[1]]


class PoisonedPost(FakePost):
    """Returns `poison` (NaN or inf) as one logit from call `at` on: a bf16 overflow."""

    def __init__(self, vocab, dtype, poison, at, **kwargs):
        super().__init__(vocab, dtype, **kwargs)
        self.poison, self.at = poison, at

    def run(self, feed, group=0):
        outputs = super().run(feed, group)
        if self.calls > self.at:
            outputs[0][0, 0, 17] = self.poison
        return outputs


class FakeVision:
    def __init__(self, dtype):
        self.name, self.num_groups, self.dtype = "vision", 1, np.dtype(dtype)
        self.calls = 0

    def inputs(self, group=0):
        return [spec("pixels", (1, VISION_SIDE, VISION_SIDE, 3), np.uint8)]

    def outputs(self, group=0):
        return [spec("features", (1, IMAGE_TOKENS, HIDDEN), self.dtype)]

    def run(self, feed, group=0):
        check_feed(self, feed, 0)
        return self.features(feed["pixels"][0])

    def features(self, pixels):
        self.calls += 1
        quads = pixels.astype(np.float32).reshape(2, 14, 2, 14, 3).mean(axis=(1, 3)) / 64  # (2, 2, 3)
        base = quads.reshape(IMAGE_TOKENS, 3)
        features = np.concatenate([base, base[:, :1] * np.arange(1, HIDDEN - 2)], axis=1) - 1  # (tokens, hidden)
        return [features[None].astype(self.dtype)]


class FakeNormalisedVision(FakeVision):
    """AXERA's InternVL3 convention: float32 NCHW pixels normalised on the host (ImageNet
    mean/std); undoes the normalisation and computes what FakeVision computes."""

    def inputs(self, group=0):
        return [spec("image", (1, 3, VISION_SIDE, VISION_SIDE), np.float32)]

    def run(self, feed, group=0):
        check_feed(self, feed, 0)
        mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
        pixels = (feed["image"][0].transpose(1, 2, 0) * std + mean) * 255  # (H, W, 3) back to 0..255
        return self.features(np.rint(pixels).astype(np.uint8))


class FakeEmbeddings:
    """Deterministic embedding rows computed from the id (no table)."""

    def __init__(self):
        self.freqs = np.linspace(0.001, 0.05, HIDDEN)

    def lookup(self, ids, out):
        ids = np.asarray(ids, dtype=np.float64)
        out[...] = np.sin(np.outer(ids, self.freqs) + np.arange(HIDDEN))


@dataclass
class FakeModel:
    vision: FakeVision | None
    layers: list
    post: FakePost
    embeddings: FakeEmbeddings
    tokenizer: Tokenizer
    template: ChatTemplate
    notes: tuple = field(default_factory=tuple)


@pytest.fixture(scope="module")
def tokenizer_and_template(tmp_path_factory):
    require_qwen2_vocab()
    directory = write_internvl2_tokenizer(tmp_path_factory.mktemp("tok"))
    tokenizer = Tokenizer.from_dir(directory)
    return tokenizer, ChatTemplate.from_checkpoint({"template": "Hermes-2"}, tokenizer)


@pytest.fixture
def make_model(tokenizer_and_template):
    tokenizer, template = tokenizer_and_template

    def make(capacity=200, chunk=16, history=(16, 32, 48), dtype=F32, vision=True, post=None, forced=None):
        layers = [FakeLayer(i, capacity, chunk, history if chunk else (), dtype) for i in range(N_LAYERS)]
        post = post or FakePost(tokenizer.vocab_size, dtype, forced=forced)
        return FakeModel(FakeVision(dtype) if vision else None, layers, post, FakeEmbeddings(), tokenizer, template)

    return make


def run(engine, prompt, **options):
    events = list(engine.generate(prompt, GenerationOptions(**options)))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent) and all(isinstance(e, TokenEvent) for e in events[:-1])
    assert [e.index for e in tokens] == list(range(len(tokens)))
    return [e.token_id for e in tokens], done


def image(seed=0, size=(40, 50)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


LONG_QUESTION = "Describe the scene in detail, then list every object, its colour and its position. " * 2


# ----------------------------------------------------------------------------- pure parts


def test_plan_prefill_picks_the_smallest_history_that_holds_the_cached_rows():
    history = {16: 2, 32: 3}
    assert plan_prefill(0, 40, 16, history) == [(1, 0, 16), (2, 16, 16), (3, 32, 8)]
    assert plan_prefill(0, 18, 16, {}) == [(1, 0, 16), (0, 16, 1), (0, 17, 1)]
    assert plan_prefill(0, 3, 0, {}) == [(0, 0, 1), (0, 1, 1), (0, 2, 1)]
    # a follow-up continuing at row 14: one chunk at 14 (history 16 holds 14 rows), the rest at 30
    assert plan_prefill(14, 40, 16, history) == [(2, 14, 16), (3, 30, 10)]
    # past the longest history: one row at a time
    assert plan_prefill(33, 36, 16, history) == [(0, 33, 1), (0, 34, 1), (0, 35, 1)]
    # histories in steps of four chunks (a 512-step build at chunk 128): every chunk still prefills
    steps = {64: 2, 128: 3}
    assert plan_prefill(0, 100, 16, steps) == [(1, 0, 16), (2, 16, 16), (2, 32, 16), (2, 48, 16), (2, 64, 16),
                                              (3, 80, 16), (3, 96, 4)]
    assert plan_prefill(130, 150, 16, steps) == [(0, row, 1) for row in range(130, 150)]


def test_argmax_logits_reads_bf16_in_place_like_float_argmax():
    rng = np.random.default_rng(0)
    for values in (rng.standard_normal(1000), -np.abs(rng.standard_normal(1000)) - 1, np.full(7, -3.0)):
        logits = values.astype(BF16)
        assert argmax_logits(logits) == int(np.argmax(logits.astype(np.float32)))
        assert argmax_logits(values.astype(np.float32)) == int(np.argmax(values.astype(np.float32)))


@given(seed=st.integers(0, 2**32 - 1), top_k=st.integers(1, 80), top_p=st.floats(0.1, 1.0))
@settings(max_examples=40, deadline=None)
def test_bf16_top_k_keys_pick_what_float32_sampling_picks(seed, top_k, top_p):
    rng = np.random.default_rng(seed)
    # Distinct bf16 values (no ties at the k-th) of both signs, from their bit patterns, and -inf.
    patterns = rng.choice(np.arange(1, 0x4000, dtype=np.int16), 4000, replace=False)  # (4000,) up to +-2.0
    patterns[:2000] |= np.int16(-0x8000)  # the sign bit: negatives
    values = np.concatenate([patterns.view(BF16), np.array([-np.inf], BF16)])
    keys = bf16_order_keys(values)
    assert np.array_equal(np.argsort(keys, kind="stable"), np.argsort(values.astype(np.float64), kind="stable"))
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, seed=seed)
    ids = top_k_indices(keys, top_k)
    via_keys = Sampler(params).sample_candidates(values[ids].astype(np.float32), ids)
    assert via_keys == Sampler(params).sample(values.astype(np.float32))


def test_read_shapes_takes_every_dimension_from_the_graphs(make_model):
    shapes = read_shapes(make_model(capacity=77, chunk=8, history=(8, 16)))
    assert (shapes.capacity, shapes.kv_dim, shapes.hidden, shapes.chunk) == (77, KV_DIM, HIDDEN, 8)
    assert shapes.history_groups == {8: 2, 16: 3}
    assert shapes.first_chunk_kv_shape == (1, 1, KV_DIM)
    assert (shapes.image_tokens, shapes.vision_size) == (IMAGE_TOKENS, (VISION_SIDE, VISION_SIDE))


def test_read_shapes_refuses_layers_that_disagree(make_model):
    model = make_model()
    model.layers[1] = FakeLayer(1, 99, 16, (16,), F32)
    with pytest.raises(ModelError, match="layer1"):
        read_shapes(model)


# ----------------------------------------------------------------------------- prefill paths


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_every_prefill_path_gives_the_same_tokens(make_model, dtype):
    """History groups, classic (remainder through decode) and decode-only builds agree."""
    prompt = Prompt(LONG_QUESTION, images=[image()])
    results, logits = {}, {}
    for name, chunk, history in (("history", 16, (16, 32, 48, 64, 80)), ("steps", 16, (48, 96)),
                                 ("classic", 16, ()), ("decode-only", 0, ())):
        model = make_model(chunk=chunk, history=history, dtype=dtype)
        tokens, done = run(Engine(model), prompt, max_tokens=10, ignore_stop=True)
        assert done.completion_tokens == 10 and done.finish_reason == "length"
        assert done.prompt_tokens % 16 != 0  # the last prompt chunk is a padded one
        results[name], logits[name] = tokens, np.stack(model.post.seen)
        groups = set(model.layers[0].calls)
        assert groups == {"history": set(range(7)), "steps": {0, 1, 2, 3}, "classic": {0, 1},
                          "decode-only": {0}}[name]
        if name == "steps":  # chunks at rows 16, 32, 48 against the 48-row history, later ones the 96-row one
            n_chunks = -(-done.prompt_tokens // 16)
            assert model.layers[0].calls[:n_chunks] == [1, 2, 2, 2, 3, 3, 3][:n_chunks]
    if dtype == F32:
        for name in ("history", "steps", "classic"):
            assert results[name] == results["decode-only"], name
            np.testing.assert_allclose(logits[name], logits["decode-only"], rtol=1e-4, atol=1e-4)
    else:  # bf16 rounding differs between chunked and one-row graphs: most tokens still agree
        assert sum(a == b for a, b in zip(results["history"], results["decode-only"])) >= 5


def test_kv_cache_is_allocated_once_and_decode_feeds_are_views(make_model):
    engine = Engine(make_model())
    keys = engine.cache.keys
    run(engine, Prompt("hi"), max_tokens=3)
    run(engine, Prompt("hello", images=[image()]), max_tokens=3)
    assert engine.cache.keys is keys
    for layer, feed in enumerate(engine._decode_feeds):
        assert np.shares_memory(feed["K_cache"], keys[layer]) and feed["K_cache"].shape[1] == engine.shapes.capacity


# ----------------------------------------------------------------------------- limits and errors


def test_prompt_beyond_capacity_is_refused_with_numbers(make_model):
    engine = Engine(make_model(capacity=60))
    n = engine.count_prompt_tokens(Prompt(LONG_QUESTION))
    assert n > 60
    with pytest.raises(PromptTooLong, match=f"{n} tokens.*holds 60") as info:
        next(engine.generate(Prompt(LONG_QUESTION)))
    assert info.value.code == "too_long"


def test_answer_is_cut_at_capacity_with_length(make_model):
    engine = Engine(make_model(capacity=64))
    prompt = Prompt("What is this?")
    n = engine.count_prompt_tokens(prompt)
    tokens, done = run(engine, prompt, max_tokens=500, ignore_stop=True)
    assert len(tokens) == 64 - n and done.finish_reason == "length"
    assert done.prompt_tokens == n and done.completion_tokens == len(tokens)


def test_image_count_mismatch_and_bad_images_are_image_errors(make_model, tokenizer_and_template):
    _, template = tokenizer_and_template
    with pytest.raises(ImageError, match="no vision graph"):
        next(Engine(make_model(vision=False)).generate(Prompt("hi", images=[image()])))
    with pytest.raises(ImageError, match="uint8 RGB"):
        next(Engine(make_model()).generate(Prompt("hi", images=[image().astype(np.float32)])))

    class ShortTemplate:  # renders one <IMG_CONTEXT> too few
        name, stop_ids, image_context_id = template.name, template.stop_ids, template.image_context_id

        def encode_prompt(self, *args, **kwargs):
            encoded = template.encode_prompt(*args, **kwargs)
            ids = list(encoded.ids)
            ids.remove(template.image_context_id)
            return type(encoded)(ids, encoded.num_prefix_ids - 1)

    model = make_model()
    model.template = ShortTemplate()
    with pytest.raises(ImageError, match=f"{IMAGE_TOKENS - 1} <IMG_CONTEXT> tokens") as info:
        next(Engine(model).generate(Prompt("hi", images=[image()])))
    assert info.value.code == "bad_image"


def test_image_features_replace_the_context_rows(make_model):
    """Changing the pixels changes the answer; the same pixels give the same answer."""
    engine = Engine(make_model())
    a, _ = run(engine, Prompt("What is it?", images=[image(1)]), max_tokens=8, ignore_stop=True)
    b, _ = run(engine, Prompt("What is it?", images=[image(2)]), max_tokens=8, ignore_stop=True)
    a2, done = run(engine, Prompt("What is it?", images=[image(1)]), max_tokens=8, ignore_stop=True)
    assert a == a2 and a != b
    assert done.timings["images_encoded"] == 1 and done.prompt_tokens > IMAGE_TOKENS


def test_float32_nchw_vision_graphs_get_host_normalised_pixels(make_model):
    """A vision graph taking float32 [1,3,H,W] (normalised by the host) answers as the uint8
    NHWC graph computing the same function does."""
    nhwc = make_model()
    nchw = make_model()
    nchw.vision = FakeNormalisedVision(F32)
    assert read_shapes(nchw).vision_layout == "nchw" and read_shapes(nhwc).vision_layout == "nhwc"
    prompt = Prompt("What is it?", images=[image(1, size=(60, 90))])
    a, _ = run(Engine(nhwc), prompt, max_tokens=8, ignore_stop=True)
    b, done = run(Engine(nchw), prompt, max_tokens=8, ignore_stop=True)
    assert a == b and done.timings["images_encoded"] == 1 and nchw.vision.calls == 1


def test_several_images_each_run_the_vision_graph(make_model):
    model = make_model()
    _, done = run(Engine(model), Prompt("Compare them.", images=[image(1), image(2)]), max_tokens=2)
    assert model.vision.calls == 2 and done.timings["images_encoded"] == 2


# ----------------------------------------------------------------------------- stopping


def test_stop_token_ends_the_answer_and_is_not_emitted(make_model, tokenizer_and_template):
    _, template = tokenizer_and_template
    im_end = next(iter(sorted(template.stop_ids)))
    engine = Engine(make_model(forced={3: im_end}))
    tokens, done = run(engine, Prompt("hi"), max_tokens=50)
    assert len(tokens) == 3 and im_end not in tokens
    assert done.finish_reason == "stop" and done.completion_tokens == 3


def test_cancel_is_checked_between_graph_calls(make_model):
    model = make_model()
    engine = Engine(model)
    checks = []

    def should_stop():
        checks.append(len(model.layers[0].calls) + len(model.layers[1].calls))
        return len(checks) > 40  # in the middle of decoding

    events = list(engine.generate(Prompt("hi"), GenerationOptions(max_tokens=100, ignore_stop=True), should_stop))
    done = events[-1]
    assert done.finish_reason == "cancelled"
    assert 0 < done.completion_tokens < 100
    assert done.text == "".join(e.delta for e in events[:-1])
    # no layer ran after the check that said stop
    assert len(model.layers[0].calls) + len(model.layers[1].calls) == checks[-1]


def test_cancel_during_prefill_gives_an_empty_cancelled_answer(make_model):
    events = list(Engine(make_model()).generate(Prompt("hi", images=[image()]), should_stop=lambda: True))
    assert len(events) == 1 and events[0].finish_reason == "cancelled" and events[0].text == ""
    assert "ttft_ms" not in events[0].timings and None not in events[0].timings.values()


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_repeats_and_differs_from_greedy(make_model):
    engine = Engine(make_model())
    prompt = Prompt("Tell me a story.")
    options = dict(max_tokens=12, temperature=1.5, top_p=0.95, top_k=50, seed=7, ignore_stop=True)
    a, _ = run(engine, prompt, **options)
    b, _ = run(engine, prompt, **options)
    greedy, _ = run(engine, prompt, max_tokens=12, ignore_stop=True)
    assert a == b and a != greedy
    penalised, _ = run(engine, prompt, max_tokens=12, ignore_stop=True, repetition_penalty=1.3)
    assert len(penalised) == 12 and penalised != greedy  # the penalty reached the logits
    # greedy with a penalty: every step takes the argmax of the penalised logits, recomputed here
    post = engine.model.post
    history = list(engine._encode(prompt).ids)
    for logits, token in zip(post.seen[-12:], penalised):
        penalised_logits = logits.copy()
        seen = np.unique(history)
        values = penalised_logits[seen]
        penalised_logits[seen] = np.where(values > 0, values / 1.3, values * 1.3)
        assert token == int(np.argmax(penalised_logits))
        history.append(token)


def test_topk_post_graphs_sample_from_candidates(make_model, tokenizer_and_template):
    tokenizer, _ = tokenizer_and_template
    prompt = Prompt("What now?")
    greedy, _ = run(Engine(make_model()), prompt, max_tokens=8, ignore_stop=True)
    topk_model = make_model(post=FakeTopkPost(tokenizer.vocab_size, F32))
    topk_greedy, _ = run(Engine(topk_model), prompt, max_tokens=8, ignore_stop=True)
    assert topk_greedy == greedy
    calls_before = topk_model.post.calls
    sampled, _ = run(Engine(topk_model), prompt, max_tokens=8, ignore_stop=True, temperature=1.0, seed=3)
    assert len(sampled) == 8
    # each sampled id is one of the k candidates that step's post graph returned
    candidates = [set(np.argsort(-logits)[:topk_model.post.k].tolist()) for logits in topk_model.post.seen[calls_before:]]
    assert len(candidates) == 8 and all(token in best for token, best in zip(sampled, candidates))
    assert sampled != topk_greedy  # sampled, not greedy


# ----------------------------------------------------------------------------- follow-ups


@pytest.mark.parametrize("history", [(16, 32, 48, 64, 80, 96), (48, 96)], ids=["16-step", "48-step"])
def test_follow_up_reuses_the_prefix_and_matches_a_cold_run(make_model, history):
    model = make_model(history=history)
    engine = Engine(model, prefix_replay="never")  # the resume path; replay is tested below
    system = "Answer in a few words."  # so the prefix does not end on a chunk boundary
    first = Prompt("What is in the picture?", images=[image(5)], image_key="cam1:1", system=system)
    run(engine, first, max_tokens=4)
    assert model.vision.calls == 1 and len(engine.prefixes) == 1
    run(engine, Prompt("Another image.", images=[image(6)], image_key="cam1:2"), max_tokens=2)  # overwrites the cache
    follow_up = Prompt(LONG_QUESTION, images=[image(5)], image_key="cam1:1", system=system)
    resume = engine._encode(first).num_prefix_ids
    assert resume % 16  # the snapshot does not end on a chunk boundary
    seen_before, calls_before = len(model.post.seen), len(model.layers[0].calls)
    warm, done = run(engine, follow_up, max_tokens=10, ignore_stop=True)
    assert model.vision.calls == 2  # no vision run for the follow-up
    assert done.timings["prefix_reused"] is True and done.timings["images_encoded"] == 0
    # the question's rows went in chunks from the snapshot's end, each through a history group
    assert done.timings["prefill_rows"] == done.prompt_tokens - resume
    n_chunks = -(-done.timings["prefill_rows"] // 16)
    groups = model.layers[0].calls[calls_before:calls_before + n_chunks + 1]
    assert min(groups[:n_chunks]) >= 2 and groups[n_chunks] == 0  # then the first decode step

    cold_model = make_model(history=history)
    cold, cold_done = run(Engine(cold_model, max_prefixes=0), follow_up, max_tokens=10, ignore_stop=True)
    assert warm == cold and cold_done.timings["prefix_reused"] is False and cold_model.vision.calls == 1
    assert 0 not in cold_model.layers[0].calls[:n_chunks]
    np.testing.assert_allclose(np.stack(model.post.seen[seen_before:]), np.stack(cold_model.post.seen),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("history", [(), (16, 32, 48)])
def test_follow_up_replay_skips_vision_and_matches_a_cold_run(make_model, history):
    model = make_model(history=history)
    engine = Engine(model, prefix_replay="always")
    run(engine, Prompt("What is in the picture?", images=[image(5)], image_key="cam1:1"), max_tokens=4)
    follow_up = Prompt(LONG_QUESTION, images=[image(5)], image_key="cam1:1")
    prompt_len = engine.count_prompt_tokens(follow_up)
    snapshot_len = engine.prefixes.find(("cam1:1", 1, None, engine.model.template.name),
                                        engine._encode(follow_up).ids).snapshot.length
    warm, done = run(engine, follow_up, max_tokens=10, ignore_stop=True)
    assert model.vision.calls == 1 and done.timings["prefix_reused"] is True
    replay_from = max(h for h in (0, *history) if h < snapshot_len)
    assert done.timings["prefill_rows"] == prompt_len - replay_from
    cold, _ = run(Engine(make_model(history=history), max_prefixes=0), follow_up, max_tokens=10, ignore_stop=True)
    assert warm == cold


def test_follow_up_plan_is_priced_with_measured_graph_times(make_model):
    model = make_model(chunk=64, history=())  # the prefix (48 rows) ends inside the first chunk
    engine = Engine(model)  # "auto"
    first = Prompt("What is in the picture?", images=[image(5)], image_key="cam1:1")
    run(engine, first, max_tokens=2)
    assert {0, 1} <= set(engine.stack_seconds)  # the first chunk and decode were timed
    follow_up = Prompt(LONG_QUESTION, images=[image(5)], image_key="cam1:1")
    prompt_len = engine.count_prompt_tokens(follow_up)
    resume_rows = prompt_len - engine._encode(first).num_prefix_ids
    engine.stack_seconds.update({0: 1.0, 1: 1e-3})  # decode calls dear: replay from row 0
    _, done = run(engine, follow_up, max_tokens=2)
    assert done.timings["prefix_reused"] and done.timings["prefill_rows"] == prompt_len
    engine.stack_seconds.update({0: 1e-6, 1: 1.0})  # decode calls nearly free: resume
    # the first question again, so the cache holds no more of the follow-up than the snapshot does
    # (the same follow-up twice keeps all but its last row: automatic prefix reuse)
    run(engine, first, max_tokens=2)
    _, done = run(engine, follow_up, max_tokens=2)
    assert done.timings["prefix_reused"] and done.timings["prefill_rows"] == resume_rows
    assert model.vision.calls == 1
    with pytest.raises(ValueError, match="prefix_replay"):
        Engine(model, prefix_replay="sometimes")


def test_given_prices_choose_the_plan_and_are_kept(make_model):
    # A board's published prices (npu.engine.costs) decide, and measuring never overwrites them.
    model = make_model(chunk=64, history=())
    first = Prompt("What is in the picture?", images=[image(5)], image_key="cam1:1")
    follow_up = Prompt(LONG_QUESTION, images=[image(5)], image_key="cam1:1")
    for prices, replays in (({0: 1.0, 1: 1e-3}, True), ({0: 1e-6, 1: 1.0}, False)):
        engine = Engine(model, prices=prices)
        run(engine, first, max_tokens=2)
        prompt_len = engine.count_prompt_tokens(follow_up)
        _, done = run(engine, follow_up, max_tokens=2)
        expected = prompt_len if replays else prompt_len - engine._encode(first).num_prefix_ids
        assert done.timings["prefix_reused"] and done.timings["prefill_rows"] == expected
        assert engine.stack_seconds == prices


def test_prefix_is_not_reused_across_keys_or_system_prompts(make_model):
    model = make_model()
    engine = Engine(model)
    run(engine, Prompt("a?", images=[image(1)], image_key="k1"), max_tokens=1)
    _, done = run(engine, Prompt("b?", images=[image(2)], image_key="k2"), max_tokens=1)
    first_image_row = engine._encode(Prompt("b?", images=[image(2)])).context_rows[0]
    assert done.timings["cached_rows"] <= first_image_row  # the cache's rows match only up to the image
    prompt = Prompt("b?", images=[image(1)], image_key="k1", system="Be terse.")
    _, done = run(engine, prompt, max_tokens=1)
    assert done.timings["cached_rows"] <= engine._encode(prompt).context_rows[0] and model.vision.calls == 3


# ----------------------------------------------------------------------------- events and timings


def test_deltas_concatenate_to_the_text_and_timings_are_reported(make_model):
    engine = Engine(make_model())
    events = list(engine.generate(Prompt("Say something.", images=[image()]),
                                  GenerationOptions(max_tokens=20, ignore_stop=True)))
    done = events[-1]
    assert "".join(e.delta for e in events[:-1]) == done.text
    assert done.text == engine.model.tokenizer.decode([e.token_id for e in events[:-1]])
    timings = done.timings
    assert set(timings) >= {"image_ms", "prefill_ms", "ttft_ms", "decode_ms", "decode_tokens_per_s",
                            "prefix_reused", "images_encoded"}
    assert timings["ttft_ms"] >= timings["prefill_ms"] > 0 and timings["decode_tokens_per_s"] > 0


def test_generation_options_refuse_bad_values():
    with pytest.raises(ValueError):
        GenerationOptions(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationOptions(temperature=-1)


# Byte-level fragments (ids < 256 are single bytes, e.g. halves of a multi-byte character),
# ordinary words, and InternVL's special tokens that are not stop tokens.
ANSWER_TOKENS = st.lists(st.one_of(st.integers(0, 255), st.integers(256, 151642), st.integers(151646, 151654)),
                         min_size=1, max_size=12)


@pytest.fixture
def small_engine(make_model):
    return Engine(make_model(capacity=64, chunk=16, history=()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=ANSWER_TOKENS)
def test_streamed_deltas_always_concatenate_to_the_decoded_answer(small_engine, answer):
    model = small_engine.model
    model.post.calls, model.post.forced = 0, dict(enumerate(answer))
    events = list(small_engine.generate(Prompt("go"), GenerationOptions(max_tokens=len(answer))))
    deltas, done = [e.delta for e in events[:-1]], events[-1]
    assert [e.token_id for e in events[:-1]] == answer
    assert done.text == "".join(deltas)  # exactly: a held-back broken tail is dropped
    assert model.tokenizer.decode(answer).startswith(done.text)


# ----------------------------------------------------------------------------- load_model


def test_load_model_refuses_mismatched_backends_and_options(tiny_qwen2, tmp_path):
    from npu.model import load_model

    with pytest.raises(ModelError, match="use backend 'reference'"):
        load_model(tiny_qwen2.path, backend="axengine")
    with pytest.raises(ModelError, match="unknown precision"):
        load_model(tiny_qwen2.path, precision="fp16")
    with pytest.raises(ModelError, match="unknown backend"):
        load_model(tiny_qwen2.path, backend="gpu")
    (tmp_path / "qwen2_p128_l0_together.axmodel").write_bytes(b"")
    with pytest.raises(ModelError, match="reference backend needs the Hugging Face checkpoint"):
        load_model(tmp_path, backend="reference")


def test_load_model_reads_a_text_only_checkpoint(tiny_qwen2, tmp_path, monkeypatch):
    from npu.model import load_model

    monkeypatch.setenv("VLMD_CACHE_DIR", str(tmp_path))
    model = load_model(tiny_qwen2.path, precision="fp32", kv_capacity=64, prefill_chunk=16, history_groups=2)
    info = model.describe()
    assert info["vision"] is None and info["kv_capacity"] == 64 and info["history_lengths"] == [16, 32]
    assert info["dtype"] == "float32" and info["template"] == model.template.name
    _, done = run(Engine(model), Prompt("Hi"), max_tokens=3, ignore_stop=True)
    assert done.completion_tokens == 3


# ----------------------------------------------------------------------------- request errors and failures


def test_sampling_on_a_post_graph_without_scores_is_refused_before_any_graph_call(make_model, tokenizer_and_template):
    tokenizer, _ = tokenizer_and_template
    model = make_model(post=FakeIdsOnlyPost(tokenizer.vocab_size, F32))
    engine = Engine(model)
    greedy, _ = run(engine, Prompt("What now?"), max_tokens=3, ignore_stop=True)
    assert len(greedy) == 3
    calls = (len(model.layers[0].calls), model.post.calls)
    for options in ({"temperature": 0.7}, {"repetition_penalty": 1.2}):
        with pytest.raises(UnsupportedOptions) as refused:
            list(engine.generate(Prompt("What now?"), GenerationOptions(max_tokens=3, **options)))
        assert isinstance(refused.value, RequestError) and refused.value.code == "bad_request"
        assert "greedy" in refused.value.message
    assert (len(model.layers[0].calls), model.post.calls) == calls, "refused only after running graphs"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_chosen_logit_fails_the_request_instead_of_becoming_a_token(make_model, tokenizer_and_template,
                                                                                 dtype, poison):
    tokenizer, _ = tokenizer_and_template
    model = make_model(dtype=dtype, post=PoisonedPost(tokenizer.vocab_size, dtype, poison, at=3))
    engine = Engine(model)
    prompt = Prompt("What is it?", images=[image(1)], image_key="cam:1")
    tokens = []
    with pytest.raises(NumericError) as failed:
        for event in engine.generate(prompt, GenerationOptions(max_tokens=20, ignore_stop=True)):
            tokens.append(event)
    assert len(tokens) == 3 and 17 not in [t.token_id for t in tokens]
    error = failed.value
    assert not isinstance(error, RequestError) and error.code == "numeric_error"
    assert error.prompt_tokens == engine.count_prompt_tokens(prompt) and "non-finite" in error.message
    assert len(engine.prefixes) == 0, "a prefix taken during a poisoned run must not be reused"
    with pytest.raises(NumericError):  # sampled: the sampler refuses the same logits
        list(engine.generate(prompt, GenerationOptions(max_tokens=20, temperature=1.0, seed=1, ignore_stop=True)))


def test_a_graph_failure_after_prefill_reports_the_prompt_length(make_model):
    from npu.session import SessionError

    class Broken(FakeLayer):
        def run(self, feed, group=0):
            if group == 0 and len(self.calls) > 2:
                raise SessionError("AX_ENGINE_RunSync failed")
            return super().run(feed, group)

    model = make_model()
    model.layers[1] = Broken(1, 200, 16, (16, 32, 48), F32)
    engine = Engine(model)
    prompt = Prompt("Tell me a story.")
    with pytest.raises(EngineError) as failed:
        list(engine.generate(prompt, GenerationOptions(max_tokens=20, ignore_stop=True)))
    assert not isinstance(failed.value, RequestError) and failed.value.code == "engine_error"
    assert failed.value.prompt_tokens == engine.count_prompt_tokens(prompt) > 0

