"""Golden parity: the engine on fp32 reference graphs gives transformers' greedy tokens.

The model is the test factory's random-weight InternVLForConditionalGeneration with its
(tied) token embeddings scaled by 1/4, a power of two so the weights stay exact in bf16.
Unscaled, the embeddings dominate the residual stream and greedy decoding repeats one
token forever; scaled, the answers vary more. Image prompts on a random model still
settle into repeats after a few tokens, so besides the tokens the test compares every
step's logits (recorded at the post graph) with transformers' to float32 tolerance,
which no attention, RoPE, mask or cache mistake survives.

It is saved as bf16 in both namings (transformers-native via `save_pretrained`, and
InternVLChatModel's names, sharded). transformers runs the float32 model whose
parameters are exactly those bf16 values, with `pixel_values` = the same resized
uint8 image normalised with ImageNet mean/std and `input_ids` = the engine's rendered
prompt ids. Stop tokens: the checkpoint's generation config has no eos id, so
`generate` always makes `max_new_tokens`; the engine is told `ignore_stop=True`, so
both produce exactly 24 tokens and are compared token by token.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="transformers parity needs torch (the dev extra)")
pytest.importorskip("transformers", reason="transformers parity needs transformers (the dev extra)")

from npu.engine import Engine, GenerationOptions, Prompt, TokenEvent  # noqa: E402
from npu.image import to_vision_input  # noqa: E402
from npu.model import load_model  # noqa: E402
from tests import model_factory  # noqa: E402
from tests.tokenizer_files import write_internvl2_tokenizer  # noqa: E402

NEW_TOKENS = 24
EMBEDDING_SCALE = 0.25
LONG_QUESTION = ("Look at the picture carefully. Count every object you can see, name its colour, say where it is,"
                 " and then explain what the whole scene might be used for and why. ") * 2


def scaled_internvl(seed: int = 0) -> torch.nn.Module:
    with torch.no_grad():
        model = model_factory.make_internvl(seed)  # the factory's weights, before saving
        for name, param in model.named_parameters():
            if "embed_tokens" in name:
                param.mul_(EMBEDDING_SCALE)
    return model


class RecordingPost:
    """Wraps the post session and keeps a float32 copy of every logits output."""

    def __init__(self, post):
        self.post, self.name, self.num_groups = post, post.name, post.num_groups
        self.logits: list[np.ndarray] = []

    def inputs(self, group=0):
        return self.post.inputs(group)

    def outputs(self, group=0):
        return self.post.outputs(group)

    def run(self, feed, group=0):
        outputs = self.post.run(feed, group)
        self.logits.append(outputs[0].reshape(-1).astype(np.float32))
        return outputs


@pytest.fixture(scope="module", autouse=True)
def embeddings_cache(tmp_path_factory):
    """Exported embeddings go to a temporary cache, not the user's ~/.cache/vlmd."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLMD_CACHE_DIR", str(tmp_path_factory.mktemp("parity-cache")))
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    model = scaled_internvl()
    native = tmp_path_factory.mktemp("parity_native")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(native)
    config = json.loads((native / "config.json").read_text())
    config["template"] = model_factory.TEMPLATE
    (native / "config.json").write_text(json.dumps(config, indent=2))
    write_internvl2_tokenizer(native)
    original = model_factory.build_internvl_original(tmp_path_factory.mktemp("parity_original"), model=model)
    return {"model": model, "native": native, "original": original.path}


@pytest.fixture(scope="module")
def transformers_tokens(checkpoints):
    """Greedy tokens from transformers, memoised per (prompt ids, image)."""
    memo: dict = {}

    def generate(ids: list[int], pixels: np.ndarray | None) -> list[int]:
        key = (tuple(ids), None if pixels is None else pixels.tobytes())
        if key not in memo:
            kwargs = {} if pixels is None else {"pixel_values": model_factory.pixel_values(pixels)}
            with torch.no_grad():
                out = checkpoints["model"].generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                                    do_sample=False, return_dict_in_generate=True,
                                                    output_logits=True, **kwargs)
            logits = np.stack([step[0].numpy() for step in out.logits])  # (new tokens, vocab)
            memo[key] = (out.sequences[0, len(ids):].tolist(), logits)
        return memo[key]

    return generate


CASES = {
    # name: (naming, with image, question, prefill_chunk, history_groups, kv_capacity)
    "image": ("native", True, "What is in this picture?", 128, 0, 1023),
    "image-original-naming": ("original", True, "What is in this picture?", 128, 0, 1023),
    "text-only": ("native", False, "Tell me a short story about a lighthouse.", 128, 0, 1023),
    "chunks-with-history": ("native", True, LONG_QUESTION, 16, 12, 256),
    "chunks-classic-remainder-through-decode": ("original", True, LONG_QUESTION, 16, 0, 256),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_match_transformers(case, checkpoints, transformers_tokens):
    naming, with_image, question, chunk, history, capacity = CASES[case]
    model = load_model(checkpoints[naming], backend="reference", precision="fp32", kv_capacity=capacity,
                       prefill_chunk=chunk, history_groups=history)
    model.post = recorder = RecordingPost(model.post)
    engine = Engine(model)
    image = model_factory.random_image(seed=3, height=300, width=400)
    prompt = Prompt(question, images=[image] if with_image else [])
    ids = model.template.encode_prompt(question, len(prompt.images), engine.shapes.image_tokens).ids
    if chunk == 16:
        assert len(ids) > 6 * chunk  # several prefill chunks
    events = list(engine.generate(prompt, GenerationOptions(max_tokens=NEW_TOKENS, ignore_stop=True)))
    ours = [e.token_id for e in events if isinstance(e, TokenEvent)]
    pixels = to_vision_input(image, *engine.shapes.vision_size) if with_image else None
    theirs, their_logits = transformers_tokens(ids, pixels)
    assert len(theirs) == NEW_TOKENS
    assert ours == theirs
    # the post graph ran once per token (the last token's logits are never needed)
    our_logits = np.stack(recorder.logits)  # (new tokens, vocab)
    np.testing.assert_allclose(our_logits, their_logits[:len(our_logits)], rtol=0, atol=2e-4 * np.abs(their_logits).max())
    assert events[-1].prompt_tokens == len(ids)
