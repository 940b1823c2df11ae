"""SmolVLM's reference graphs (npu/reference/smolvlm_graphs.py) against transformers.

The graphs are driven here the way the board runtimes drive them (StackFlow d9084ba
`main_vlm/src/runner/LLM.hpp`: the first chunk through group 1 at row 0, decode through
group 0 with the new row written at the token's KV row; later turns through a history
group), with the image features replacing the `<image>` rows of the embeddings. Greedy
answers must equal transformers' `generate` on the same ids and pixels: an image, a
follow-up on the same image, and a three-turn conversation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from npu.reference.checkpoint import CheckpointError
from npu.reference.blueprint import BlueprintError
from npu.reference.idefics3 import SmolVLMBlueprint, load_idefics3_checkpoint
from npu.reference.smolvlm_graphs import build_smolvlm_sessions, patch_position_ids, pixel_shuffle
from npu.session import BF16, MASK_BLOCKED
from npu.text.tokenizer import Tokenizer
from tests.fixtures_models import model_factory

torch = pytest.importorskip("torch")
CAPACITY, CHUNK, HISTORY = 511, 128, (128, 256)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    model_factory()  # skips without the dev extra
    from tests import smolvlm_factory

    return smolvlm_factory, smolvlm_factory.build_smolvlm(tmp_path_factory.mktemp("tiny_smolvlm"))


@pytest.fixture(scope="module")
def graphs(smol):
    return build_smolvlm_sessions(smol[1].path, precision="fp32", kv_capacity=CAPACITY, prefill_chunk=CHUNK,
                                  history_lengths=HISTORY)


class Driver:
    """The graphs run as a board runtime runs them: one KV cache, rows written in order."""

    def __init__(self, graphs, embed: np.ndarray):
        self.g, self.embed = graphs, embed
        bp = graphs.blueprint
        self.k = np.zeros((bp.n_layers, 1, CAPACITY, bp.kv_dim), np.float32)  # (layers, 1, capacity, kv_dim)
        self.v = np.zeros_like(self.k)
        self.rows = 0

    def prefill(self, ids: list[int], image: np.ndarray | None, image_token: int) -> np.ndarray:
        """Rows for `ids` after the cached ones; returns the last row's hidden state."""
        x = self.embed[ids].astype(np.float32)  # (n, hidden)
        if image is not None:
            features = self.g.vision.run({"pixel_values": image[None]})[0][0]
            x[np.asarray(ids) == image_token] = features
        n, start = len(ids), self.rows
        group = 1 if start == 0 else 2 + next(i for i, h in enumerate(HISTORY) if h >= start)
        assert n <= CHUNK
        hist = 0 if group == 1 else HISTORY[group - 2]
        mask = np.full((1, CHUNK, hist + CHUNK), MASK_BLOCKED, np.float32)
        mask[0, :, :start] = 0.0
        for r in range(CHUNK):
            mask[0, r, hist : hist + r + 1] = 0.0
        data = np.zeros((1, CHUNK, x.shape[1]), np.float32)
        data[0, :n] = x
        indices = np.arange(start, start + CHUNK, dtype=np.uint32)[None]  # (1, chunk)
        for i, layer in enumerate(self.g.layers):
            spec = {s.name: s for s in layer.inputs(group)}
            k_in = self.k[i][:, :hist] if hist else np.zeros(spec["K_cache"].shape, np.float32)
            v_in = self.v[i][:, :hist] if hist else np.zeros(spec["V_cache"].shape, np.float32)
            k_out, v_out, out = layer.run({"K_cache": k_in, "V_cache": v_in, "indices": indices, "input": data,
                                           "mask": mask}, group)
            self.k[i][0, start : start + n] = k_out[0, :n]
            self.v[i][0, start : start + n] = v_out[0, :n]
            data = out.copy()
        self.rows += n
        return data[0, n - 1]

    def step(self, token: int) -> np.ndarray:
        p = self.rows
        mask = np.full((1, 1, CAPACITY + 1), MASK_BLOCKED, np.float32)
        mask[0, 0, :p] = 0.0
        mask[0, 0, -1] = 0.0
        data = self.embed[[token]].astype(np.float32)[None]  # (1, 1, hidden)
        for i, layer in enumerate(self.g.layers):
            k_out, v_out, out = layer.run({"K_cache": self.k[i], "V_cache": self.v[i],
                                           "indices": np.array([[p]], np.uint32), "input": data, "mask": mask}, 0)
            self.k[i][0, p] = k_out[0, 0]
            self.v[i][0, p] = v_out[0, 0]
            data = out.copy()
        self.rows += 1
        return data[0, 0]

    def greedy(self, hidden: np.ndarray, max_tokens: int, stop: int) -> list[int]:
        out: list[int] = []
        while len(out) < max_tokens:
            token = int(np.argmax(self.g.post.run({"input": hidden.reshape(1, 1, -1)})[0]))
            out.append(token)
            if token == stop or len(out) == max_tokens:
                break
            hidden = self.step(token)
        return out


def _hf_greedy(model, ids: list[int], pixels, max_tokens: int, stop: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=stop, pad_token_id=stop)
    return out[0, len(ids):].tolist()


def test_graphs_have_the_published_names_shapes_and_dtypes(smol):
    f, tiny = smol
    graphs = build_smolvlm_sessions(tiny.path, precision="bf16", kv_capacity=CAPACITY, prefill_chunk=CHUNK)
    (image,) = graphs.vision.inputs(0)
    (features,) = graphs.vision.outputs(0)
    assert (image.name, image.shape, image.dtype) == ("pixel_values", (1, f.IMAGE_SIZE, f.IMAGE_SIZE, 3), np.uint8)
    assert (features.name, features.shape, features.dtype) == ("last_hidden_state", (1, 64, 64), np.float32)
    layer = graphs.layers[0]
    decode = {s.name: (s.shape, s.dtype) for s in layer.inputs(0)}
    prefill = {s.name: (s.shape, s.dtype) for s in layer.inputs(1)}
    assert [s.name for s in layer.inputs(0)] == ["K_cache", "V_cache", "indices", "input", "mask"]
    assert decode["indices"] == ((1, 1), np.uint32) and prefill["indices"] == ((1, CHUNK), np.uint32)
    assert decode["K_cache"] == ((1, CAPACITY, 32), BF16) and prefill["K_cache"] == ((1, 1, 64), BF16)
    assert decode["mask"] == ((1, 1, CAPACITY + 1), BF16) and prefill["mask"] == ((1, CHUNK, CHUNK), BF16)
    assert [(s.name, s.shape) for s in layer.outputs(1)] == [
        ("K_cache_out", (1, CHUNK, 32)), ("V_cache_out", (1, CHUNK, 32)), ("output", (1, CHUNK, 64))]
    assert [(s.name, s.shape, s.dtype) for s in graphs.post.outputs(0)] == [("output", (1, 1, f.VOCAB_SIZE), BF16)]


def test_pixel_shuffle_follows_transformers_view_order():
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    x = np.random.default_rng(0).standard_normal((32 * 32, 6)).astype(np.float32)
    for scale in (2, 4):
        want = SmolVLMConnector.pixel_shuffle(None, torch.from_numpy(x)[None], scale)[0].numpy()
        np.testing.assert_array_equal(pixel_shuffle(x, scale), want)
    blocks = x.reshape(8, 4, 8, 4, 6)  # (by, ky, bx, kx, C)
    # what it amounts to: each 4x4 block one token, tokens row-major, channels in (ky, kx, C) order
    np.testing.assert_array_equal(pixel_shuffle(x, 4), blocks.transpose(0, 2, 1, 3, 4).reshape(64, -1))
    # near misses: the last permute left out (tokens column-major), or kx before ky inside a token
    for wrong in (blocks.transpose(2, 0, 1, 3, 4), blocks.transpose(0, 2, 3, 1, 4)):
        assert not np.array_equal(pixel_shuffle(x, 4), wrong.reshape(64, -1))


def test_patch_positions_are_transformers_buckets():
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionEmbeddings

    for side in (8, 27, 32):
        config = type("C", (), {"hidden_size": 4, "image_size": side * 2, "patch_size": 2, "num_channels": 3})()
        embeddings = SmolVLMVisionEmbeddings(config)
        with torch.no_grad():
            embeddings.position_embedding.weight.copy_(torch.arange(side * side, dtype=torch.float32)[:, None])
            embeddings.patch_embedding.weight.zero_()
            embeddings.patch_embedding.bias.zero_()
            got = embeddings(torch.zeros(1, 3, side * 2, side * 2), torch.ones(1, side, side, dtype=torch.bool))
        np.testing.assert_array_equal(patch_position_ids(side), got[0, :, 0].numpy().astype(np.int64))


def test_vision_graph_matches_transformers(smol, graphs):
    f, tiny = smol
    for seed in (1, 2):
        image = f.sample_image(seed)
        got = graphs.vision.run({"pixel_values": image[None]})[0][0]
        with torch.no_grad():
            want = tiny.torch_model.model.get_image_features(f.pixel_values(image), None,
                                                            return_dict=True).pooler_output[0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _prompt(tok: Tokenizer, f, question: str, image: bool) -> list[int]:
    user = "User:" + f.image_block() if image else "User: "
    return tok.encode(f"<|im_start|>{user}{question}<end_of_utterance>\nAssistant:")


def test_greedy_parity_image_follow_up_and_three_turns(smol, graphs):
    f, tiny = smol
    tok = Tokenizer.from_dir(tiny.path)
    _, weights = load_idefics3_checkpoint(tiny.path)
    embed = np.asarray(weights["embed"], np.float32)
    image, stop, budget = f.sample_image(3), f.END_OF_UTTERANCE_ID, 10
    pixels = f.pixel_values(image)

    # an image and a question
    ids = _prompt(tok, f, "What is in the image?", image=True)
    assert ids.count(f.IMAGE_TOKEN_ID) == f.N_IMAGE_TOKENS
    run = Driver(graphs, embed)
    answer = run.greedy(run.prefill(ids, image, f.IMAGE_TOKEN_ID), budget, stop)
    assert answer == _hf_greedy(tiny.torch_model, ids, pixels, budget, stop)
    assert len(set(answer)) > 2, "a degenerate repeat tests nothing"

    # a follow-up on the same image: the image prefix's rows kept, only the new question's rows run
    prefix = ids.index(f.IMAGE_TOKEN_ID) + f.N_IMAGE_TOKENS + 1
    follow = ids[:prefix] + tok.encode("Is there a dog? Yes or no.<end_of_utterance>\nAssistant:")
    again = Driver(graphs, embed)
    again.prefill(ids[:prefix], image, f.IMAGE_TOKEN_ID)
    short = again.greedy(again.prefill(follow[prefix:], None, f.IMAGE_TOKEN_ID), budget, stop)
    assert short == _hf_greedy(tiny.torch_model, follow, pixels, budget, stop)

    # three turns: each later turn prefills only its own rows after the cached conversation
    convo, turn_answers = list(ids), [answer]
    for question in ("And the left side?", "What colour is it?"):
        turn = tok.encode(f"<end_of_utterance>\nUser: {question}<end_of_utterance>\nAssistant:")
        history = convo + [t for t in turn_answers[-1] if t != stop]
        new_rows = history[run.rows:] + turn
        hidden = run.prefill(new_rows, None, f.IMAGE_TOKEN_ID)
        convo = history + turn
        assert run.rows == len(convo)
        got = run.greedy(hidden, budget, stop)
        assert got == _hf_greedy(tiny.torch_model, convo, pixels, budget, stop), question
        turn_answers.append(got)
    assert turn_answers[1] != turn_answers[2]


def test_answers_depend_on_the_image(smol, graphs):
    f, tiny = smol
    tok = Tokenizer.from_dir(tiny.path)
    embed = np.asarray(load_idefics3_checkpoint(tiny.path)[1]["embed"], np.float32)
    ids = _prompt(tok, f, "Describe the picture in one sentence.", image=True)
    answers = set()
    for seed in (4, 5, 6):
        run = Driver(graphs, embed)
        answers.add(tuple(run.greedy(run.prefill(ids, f.sample_image(seed), f.IMAGE_TOKEN_ID), 6,
                                     f.END_OF_UTTERANCE_ID)))
    assert len(answers) == 3


def test_checkpoint_problems_are_named(smol, tmp_path):
    f, tiny = smol
    config = json.loads((tiny.path / "config.json").read_text())
    bp = SmolVLMBlueprint.from_config(config)
    assert (bp.image_token_id, bp.n_image_tokens, bp.text.kv_dim) == (f.IMAGE_TOKEN_ID, 64, 32)
    bad = dict(config, text_config=dict(config["text_config"], rope_parameters={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(BlueprintError, match="RoPE"):
        SmolVLMBlueprint.from_config(bad)
    with pytest.raises(BlueprintError, match="not a SmolVLM"):
        SmolVLMBlueprint.from_config({"model_type": "qwen2"})
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"model.text_model.embed_tokens.weight": np.zeros((f.VOCAB_SIZE, 64), np.float32),
               "model.vision_model.mystery.weight": np.zeros(3, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mystery"):
        load_idefics3_checkpoint(tmp_path)
