"""Reference graphs vs transformers fp32, graph by graph, on tiny random checkpoints.

The graphs are driven the way the engine drives them (first prefill chunk, history
chunks, then decode through group 0 with the board's masks) and every layer's
output, K/V rows and the logits are compared with one full transformers forward.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers oracle needs torch (the dev extra)")
pytest.importorskip("transformers", reason="the transformers oracle needs transformers (the dev extra)")

from npu.reference.blueprint import Blueprint, BlueprintError  # noqa: E402
from npu.reference.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from npu.reference import build_reference_sessions  # noqa: E402
from npu.session import BF16, MASK_BLOCKED, SessionError  # noqa: E402
from tests import model_factory as mf  # noqa: E402

CAPACITY, CHUNK, HISTORY = 48, 16, 2
FP32_TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def checkpoints(tiny_internvl_native, tiny_internvl_original, tiny_qwen2):
    return {"native": tiny_internvl_native, "original": tiny_internvl_original, "qwen2": tiny_qwen2}


@pytest.fixture(scope="module")
def fp32_graphs(checkpoints):
    return {
        name: build_reference_sessions(tm.path, "fp32", CAPACITY, CHUNK, HISTORY) for name, tm in checkpoints.items()
    }


# ---------------------------------------------------------------- transformers side


def _text_parts(tm: mf.TinyModel):
    model = tm.torch_model
    base = model.model.language_model if tm.has_vision else model.model
    return base, model.lm_head


def token_embeddings(tm: mf.TinyModel, length: int, seed: int = 0) -> np.ndarray:
    """Rows of the checkpoint's embedding table for `length` random token ids, float32 (length, hidden)."""
    base, _ = _text_parts(tm)
    ids = np.random.default_rng(seed).integers(0, 151643, size=length)
    return base.embed_tokens.weight.detach()[torch.from_numpy(ids)].numpy().copy()


def transformers_forward(tm: mf.TinyModel, embeds: np.ndarray):
    """(per-layer outputs (n_layers, L, hidden), keys, values (n_layers, L, kv_dim), logits (L, vocab))."""
    base, lm_head = _text_parts(tm)
    captured = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in base.layers]
    try:
        with torch.no_grad():
            out = base(inputs_embeds=torch.from_numpy(embeds)[None], use_cache=True)
            logits = lm_head(out.last_hidden_state)[0].numpy()
    finally:
        for hook in hooks:
            hook.remove()
    length = embeds.shape[0]
    layers = np.stack([c[0].numpy() for c in captured])
    cache = out.cache.layers
    keys = np.stack([layer.keys[0].transpose(0, 1).reshape(length, -1).numpy() for layer in cache])
    values = np.stack([layer.values[0].transpose(0, 1).reshape(length, -1).numpy() for layer in cache])
    return layers, keys, values, logits


# ---------------------------------------------------------------- graph side (engine-like driver)


def decode_mask(position: int, capacity: int, dtype) -> np.ndarray:
    mask = np.full((1, 1, capacity + 1), MASK_BLOCKED, np.float32)  # (1, 1, capacity + 1)
    mask[0, 0, :position] = 0
    mask[0, 0, capacity] = 0
    return mask.astype(dtype)


def chunk_mask(history: int, chunk: int, dtype) -> np.ndarray:
    mask = np.full((1, chunk, history + chunk), MASK_BLOCKED, np.float32)  # (1, chunk, history + chunk)
    mask[0, :, :history] = 0
    mask[0, :, history:][np.tril_indices(chunk)] = 0
    return mask.astype(dtype)


def run_graphs(graphs, embeds: np.ndarray, use_history: bool = True):
    """Drive the layer graphs over `embeds`; returns per-layer outputs, keys, values, post logits of the last row."""
    layer0 = graphs.layers[0]
    io = layer0.inputs(0)[3].dtype
    capacity = layer0.inputs(0)[0].shape[1]
    chunk = layer0.inputs(1)[3].shape[1]
    n_layers, length, hidden = len(graphs.layers), embeds.shape[0], embeds.shape[1]
    kv_dim = layer0.inputs(0)[0].shape[2]
    cache_k = np.zeros((n_layers, capacity, kv_dim), io)  # (n_layers, capacity, kv_dim)
    cache_v = np.zeros((n_layers, capacity, kv_dim), io)
    outs = np.zeros((n_layers, length, hidden), np.float32)  # (n_layers, L, hidden)
    position = 0
    while position < length and position % chunk == 0:
        group = position // chunk + 1
        if group >= layer0.num_groups or (group >= 2 and not use_history):
            break
        rows = min(chunk, length - position)
        x = np.zeros((1, chunk, hidden), io)
        x[0, :rows] = embeds[position : position + rows]
        indices = np.arange(position, position + chunk, dtype=np.uint32)[None]
        mask = chunk_mask(position, chunk, io)
        for i, layer in enumerate(graphs.layers):
            history_shape = layer.inputs(group)[0].shape
            k_in = cache_k[i : i + 1, :position] if position else np.zeros(history_shape, io)
            v_in = cache_v[i : i + 1, :position] if position else np.zeros(history_shape, io)
            feed = {"K_cache": k_in, "V_cache": v_in, "indices": indices, "input": x, "mask": mask}
            k, v, out = layer.run(feed, group)
            cache_k[i, position : position + rows] = k[0, :rows]
            cache_v[i, position : position + rows] = v[0, :rows]
            outs[i, position : position + rows] = out[0, :rows]
            x = out.copy()
        position += rows
    for p in range(position, length):
        x = embeds[p][None, None].astype(io)
        feed_common = {"indices": np.array([[p]], np.uint32), "mask": decode_mask(p, capacity, io)}
        for i, layer in enumerate(graphs.layers):
            feed = {**feed_common, "K_cache": cache_k[i : i + 1], "V_cache": cache_v[i : i + 1], "input": x}
            k, v, out = layer.run(feed, 0)
            cache_k[i, p], cache_v[i, p] = k[0, 0], v[0, 0]
            outs[i, p] = out[0, 0]
            x = out.copy()
    logits = graphs.post.run({"input": outs[-1, -1][None, None].astype(io)})[0][0, 0].astype(np.float32)
    return outs, cache_k[:, :length].astype(np.float32), cache_v[:, :length].astype(np.float32), logits


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["native", "original"])
def test_vision_features_match_transformers(checkpoints, fp32_graphs, name):
    tm, vision = checkpoints[name], fp32_graphs[name].vision
    image = mf.random_image(seed=3)
    with torch.no_grad():
        expected = tm.torch_model.model.get_image_features(pixel_values=mf.pixel_values(image[None])).pooler_output
    (features,) = vision.run({"input": image[None]})
    assert features.shape == (1, mf.N_IMAGE_TOKENS, mf.TEXT_DIMS["hidden_size"])
    assert features.dtype == np.float32
    np.testing.assert_allclose(features, expected.numpy(), **FP32_TOL)


def test_rms_norm_qk_norm_vision_in_both_namings(tmp_path):
    """InternViT-6B-style vision (RMSNorm, q/k norm): both namings match transformers."""
    native = mf.build_internvl_native(tmp_path / "native", seed=9, norm_type="rms_norm", use_qk_norm=True)
    original = mf.build_internvl_original(tmp_path / "original", model=native.torch_model)
    image = mf.random_image(seed=6)
    with torch.no_grad():
        expected = native.torch_model.model.get_image_features(pixel_values=mf.pixel_values(image[None])).pooler_output
    for tm in (native, original):
        blueprint, weights = load_checkpoint(tm.path)
        assert blueprint.vision.norm == "rms_norm" and blueprint.vision.qk_norm
        assert "vision.layers.0.q_norm.weight" in weights and "vision.layers.0.norm1.bias" not in weights
        vision = build_reference_sessions((blueprint, weights), "fp32", CAPACITY, CHUNK).vision
        np.testing.assert_allclose(vision.run({"input": image[None]})[0], expected.numpy(), **FP32_TOL)


@pytest.mark.parametrize("name", ["native", "original", "qwen2"])
def test_layers_and_logits_match_transformers(checkpoints, fp32_graphs, name):
    tm = checkpoints[name]
    # chunk 1 (group 1), chunk 2 (history group 2), a partial chunk 3 (group 3, padded), then decode.
    embeds = token_embeddings(tm, 2 * CHUNK + 5 + 3)
    expected_layers, expected_k, expected_v, expected_logits = transformers_forward(tm, embeds)
    outs, keys, values, logits = run_graphs(fp32_graphs[name], embeds)
    np.testing.assert_allclose(keys, expected_k, **FP32_TOL)
    np.testing.assert_allclose(values, expected_v, **FP32_TOL)
    np.testing.assert_allclose(outs, expected_layers, **FP32_TOL)
    np.testing.assert_allclose(logits, expected_logits[-1], **FP32_TOL)
    assert int(np.argmax(logits)) == int(np.argmax(expected_logits[-1]))


@pytest.mark.parametrize("length, use_history", [(CHUNK - 5, True), (CHUNK + 4, False)])
def test_partial_chunk_and_decode_without_history(checkpoints, fp32_graphs, length, use_history):
    """A padded first chunk alone; a prompt longer than the chunk finishing through decode."""
    tm = checkpoints["native"]
    embeds = token_embeddings(tm, length, seed=1)
    expected_layers, expected_k, _, expected_logits = transformers_forward(tm, embeds)
    outs, keys, _, logits = run_graphs(fp32_graphs["native"], embeds, use_history=use_history)
    np.testing.assert_allclose(outs, expected_layers, **FP32_TOL)
    np.testing.assert_allclose(keys, expected_k, **FP32_TOL)
    np.testing.assert_allclose(logits, expected_logits[-1], **FP32_TOL)


# ---------------------------------------------------------------- bf16 precision


def test_bf16_graphs_use_bf16_at_every_float_boundary(checkpoints):
    graphs = build_reference_sessions(checkpoints["native"].path, "bf16", CAPACITY, CHUNK, HISTORY)
    sessions = [graphs.vision, *graphs.layers, graphs.post]
    for session in sessions:
        for group in range(session.num_groups):
            for spec in session.inputs(group) + session.outputs(group):
                if spec.name == "indices":
                    assert spec.dtype == np.uint32
                elif session.name == "vision" and spec.name == "input":
                    assert spec.dtype == np.uint8
                else:
                    assert spec.dtype == BF16, (session.name, group, spec)
    (features,) = graphs.vision.run({"input": mf.random_image(seed=3)[None]})
    assert features.dtype == BF16


def test_bf16_graphs_stay_close_to_fp32(checkpoints, fp32_graphs):
    tm = checkpoints["native"]
    bf16 = build_reference_sessions(tm.path, "bf16", CAPACITY, CHUNK, HISTORY)
    embeds = token_embeddings(tm, CHUNK + 6, seed=4).astype(BF16).astype(np.float32)
    outs32, keys32, _, logits32 = run_graphs(fp32_graphs["native"], embeds)
    outs16, keys16, _, logits16 = run_graphs(bf16, embeds)
    scale = np.abs(outs32).max()
    assert np.abs(outs16 - outs32).max() < 0.03 * scale
    assert np.abs(keys16 - keys32).max() < 0.03 * np.abs(keys32).max()
    assert np.abs(logits16 - logits32).max() < 0.03 * np.abs(logits32).max()
    image = mf.random_image(seed=5)[None]
    f32 = fp32_graphs["native"].vision.run({"input": image})[0]
    f16 = bf16.vision.run({"input": image})[0].astype(np.float32)
    assert np.abs(f16 - f32).max() < 0.01 * np.abs(f32).max()


# ---------------------------------------------------------------- graph contract


def test_shapes_of_every_group(fp32_graphs):
    graphs = fp32_graphs["native"]
    bp = graphs.blueprint
    layer = graphs.layers[0]
    assert layer.num_groups == 2 + HISTORY
    shapes = lambda specs: {s.name: s.shape for s in specs}  # noqa: E731
    assert shapes(layer.inputs(0)) == {
        "K_cache": (1, CAPACITY, bp.kv_dim), "V_cache": (1, CAPACITY, bp.kv_dim), "indices": (1, 1),
        "input": (1, 1, bp.hidden), "mask": (1, 1, CAPACITY + 1),
    }
    assert shapes(layer.inputs(1)) == {
        "K_cache": (1, 1, bp.kv_dim), "V_cache": (1, 1, bp.kv_dim), "indices": (1, CHUNK),
        "input": (1, CHUNK, bp.hidden), "mask": (1, CHUNK, CHUNK),
    }
    for g in range(2, 2 + HISTORY):
        assert shapes(layer.inputs(g)) == {
            "K_cache": (1, CHUNK * (g - 1), bp.kv_dim), "V_cache": (1, CHUNK * (g - 1), bp.kv_dim),
            "indices": (1, CHUNK), "input": (1, CHUNK, bp.hidden), "mask": (1, CHUNK, CHUNK * g),
        }
    for g in range(layer.num_groups):
        n = layer.inputs(g)[3].shape[1]
        assert [s.name for s in layer.inputs(g)] == ["K_cache", "V_cache", "indices", "input", "mask"]
        assert shapes(layer.outputs(g)) == {
            "K_cache_out": (1, n, bp.kv_dim), "V_cache_out": (1, n, bp.kv_dim), "output": (1, n, bp.hidden),
        }
    assert [(s.name, s.shape) for s in graphs.vision.inputs(0)] == [("input", (1, 224, 224, 3))]
    assert [(s.name, s.shape) for s in graphs.vision.outputs(0)] == [("output", (1, 64, bp.hidden))]
    assert [(s.name, s.shape) for s in graphs.post.inputs(0)] == [("input", (1, 1, bp.hidden))]
    assert [(s.name, s.shape) for s in graphs.post.outputs(0)] == [("output", (1, 1, bp.vocab))]
    assert [layer.name for layer in graphs.layers] == ["layer0", "layer1"]


def _zeros_feed(session, group):
    return {s.name: np.zeros(s.shape, s.dtype) for s in session.inputs(group)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_feeds_are_checked_strictly(checkpoints, precision):
    graphs = build_reference_sessions(checkpoints["qwen2"].path, precision, CAPACITY, CHUNK, 0)
    layer, post = graphs.layers[0], graphs.post
    other = np.float32 if precision == "bf16" else BF16
    feed = _zeros_feed(layer, 0)
    layer.run(feed, 0)  # the well-formed feed runs
    bad_cases = [
        {**feed, "mask": feed["mask"].astype(other)},  # wrong dtype
        {**feed, "indices": feed["indices"].astype(np.int32)},
        {**feed, "input": np.zeros((1, 2, feed["input"].shape[2]), feed["input"].dtype)},  # wrong shape
        {k: v for k, v in feed.items() if k != "V_cache"},  # missing
        {**feed, "extra": feed["indices"]},  # unexpected
    ]
    for bad in bad_cases:
        with pytest.raises(SessionError):
            layer.run(bad, 0)
    with pytest.raises(SessionError):
        layer.run(feed, 1)  # group 0's shapes fed to group 1
    with pytest.raises(SessionError):
        layer.run(feed, 7)
    with pytest.raises(SessionError):
        post.run({"input": np.zeros((1, 1, graphs.blueprint.hidden), other)})


def test_text_only_checkpoint_has_no_vision_graph(checkpoints, fp32_graphs):
    graphs = fp32_graphs["qwen2"]
    assert graphs.vision is None
    assert graphs.blueprint.vision is None and graphs.blueprint.n_image_tokens == 0
    assert len(graphs.layers) == 2


def test_mask_values_are_honoured(checkpoints, fp32_graphs):
    """Skipping blocked rows equals the full softmax; other mask values are added as given."""
    layer = fp32_graphs["native"].layers[0]
    rng = np.random.default_rng(7)
    feed = _zeros_feed(layer, 0)
    feed["K_cache"][...] = rng.standard_normal(feed["K_cache"].shape)
    feed["V_cache"][...] = rng.standard_normal(feed["V_cache"].shape)
    feed["input"][...] = rng.standard_normal(feed["input"].shape)
    feed["indices"][...] = 20
    blocked = decode_mask(20, CAPACITY, np.float32)
    blocked[0, 0, [3, 11]] = MASK_BLOCKED
    almost = blocked.copy()
    almost[almost == MASK_BLOCKED] = -9000.0  # not skipped, yet exp() underflows to 0 all the same
    out_blocked = [a.copy() for a in layer.run({**feed, "mask": blocked}, 0)]
    out_almost = [a.copy() for a in layer.run({**feed, "mask": almost}, 0)]
    for a, b in zip(out_blocked, out_almost):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    soft = np.zeros_like(blocked)
    soft[0, 0, 5] = -1.5  # a mild penalty changes the answer
    penalised = layer.run({**feed, "mask": soft}, 0)[2].copy()  # outputs are reused buffers: copy
    assert not np.allclose(penalised, layer.run({**feed, "mask": np.zeros_like(soft)}, 0)[2])
    # A row with nothing open keeps every column: the same softmax up to the float32
    # rounding of score - 65536 (a quantum of 1/128), not a crash or an empty softmax.
    all_blocked = np.full_like(blocked, MASK_BLOCKED)
    shifted = layer.run({**feed, "mask": all_blocked}, 0)[2].copy()
    np.testing.assert_allclose(shifted, layer.run({**feed, "mask": np.zeros_like(soft)}, 0)[2], atol=0.02)


def test_build_rejects_bad_arguments(checkpoints):
    path = checkpoints["qwen2"].path
    with pytest.raises(ValueError, match="precision"):
        build_reference_sessions(path, "int8")
    with pytest.raises(ValueError, match="exceed"):
        build_reference_sessions(path, "fp32", kv_capacity=32, prefill_chunk=16, history_groups=2)


# ---------------------------------------------------------------- checkpoints and blueprints


def test_both_namings_load_to_identical_weights(checkpoints):
    bp_native, native = load_checkpoint(checkpoints["native"].path)
    bp_original, original = load_checkpoint(checkpoints["original"].path)
    assert native.names() == original.names()
    for name in native.names():
        np.testing.assert_array_equal(native.f32(name), original.f32(name), err_msg=name)
    assert bp_native.vision.n_image_tokens == bp_original.vision.n_image_tokens == 64
    assert (bp_native.n_heads, bp_native.n_kv_heads, bp_native.head_dim) == (4, 2, 16)
    assert bp_native.template == bp_original.template == "Hermes-2"
    assert bp_native.rope_theta == bp_original.rope_theta == mf.ROPE_THETA
    assert (bp_native.kind, bp_original.kind) == ("internvl-native", "internvl-original")


def test_real_internvl2_1b_config_reads(checkpoints):
    """The original config dialect at InternVL2-1B's real dimensions (448 px -> 256 tokens)."""
    config = json.loads((checkpoints["original"].path / "config.json").read_text())
    config["force_image_size"] = 448
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    config["vision_config"].update(vision)
    config["llm_config"].update(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, intermediate_size=4864)
    bp = Blueprint.from_config(config)
    assert (bp.vision.n_image_tokens, bp.vision.projector_in, bp.kv_dim, bp.head_dim) == (256, 4096, 128, 64)
    config["ps_version"] = "v1"
    with pytest.raises(BlueprintError, match="ps_version"):
        Blueprint.from_config(config)
    config["ps_version"] = "v2"
    config["llm_config"].update(architectures=["InternLM2ForCausalLM"], model_type="internlm2")
    with pytest.raises(BlueprintError, match="InternLM2ForCausalLM"):
        Blueprint.from_config(config)
    with pytest.raises(BlueprintError, match="unsupported model"):
        Blueprint.from_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_broken_checkpoints_fail_with_a_reason(checkpoints, tmp_path):
    from safetensors.numpy import save_file

    from npu.reference.checkpoint import read_safetensors

    broken = shutil.copytree(checkpoints["qwen2"].path, tmp_path / "renamed")
    tensors = {k: np.asarray(v, np.float32) for k, v in read_safetensors(broken / "model.safetensors").items()}
    tensors["model.layers.0.self_attn.qkv_fused.weight"] = tensors.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not understood"):
        load_checkpoint(broken)
    del tensors["model.layers.0.self_attn.qkv_fused.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing layers.0.q.weight"):
        load_checkpoint(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_checkpoint(broken)


@pytest.mark.parametrize(
    "hf_name, canonical",
    [
        ("lm_head.weight", "lm_head"),
        ("language_model.lm_head.weight", "lm_head"),
        ("model.language_model.layers.3.self_attn.o_proj.weight", "layers.3.o.weight"),
        ("language_model.model.layers.3.mlp.down_proj.weight", "layers.3.down.weight"),
        ("model.layers.0.self_attn.k_proj.bias", "layers.0.k.bias"),
        ("model.vision_tower.encoder.layer.1.lambda_2", "vision.layers.1.ls2"),
        ("vision_model.encoder.layers.1.ls2", "vision.layers.1.ls2"),
        ("vision_model.encoder.layers.0.attn.qkv.bias", "vision.layers.0.qkv.bias"),
        ("mlp1.3.weight", "projector.fc2.weight"),
        ("multi_modal_projector.linear_1.bias", "projector.fc1.bias"),
        ("mlp1.2.weight", None),  # index 2 is the GELU: no weights
        ("vision_model.encoder.layers.0.attn.unknown.weight", None),
    ],
)
def test_hf_names_map_to_canonical_names(hf_name, canonical):
    from npu.reference.checkpoint import canonical_name

    assert canonical_name(hf_name) == canonical
