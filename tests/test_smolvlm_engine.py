"""The engine on a SmolVLM checkpoint (reference backend, loaded as a user loads it) against
transformers: greedy tokens equal with an image, for a follow-up on the same image (prefix
reused), and through a three-turn conversation (each turn prefilling only its own rows)."""

from __future__ import annotations

import numpy as np
import pytest

from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt, TokenEvent
from npu.model import load_model
from npu.text.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
BUDGET = 10


@pytest.fixture(scope="module")
def engine(tiny_smolvlm):
    model = load_model(tiny_smolvlm.path, backend="reference", precision="fp32", kv_capacity=511, prefill_chunk=128,
                       history_lengths=(128, 256))
    return Engine(model)


def _ask(engine: Engine, prompt: Prompt) -> tuple[list[int], DoneEvent]:
    tokens, done = [], None
    for event in engine.generate(prompt, GenerationOptions(max_tokens=BUDGET)):
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        elif isinstance(event, DoneEvent):
            done = event
    return tokens, done


def _hf(tiny, ids: list[int], image: np.ndarray) -> list[int]:
    from tests.smolvlm_factory import END_OF_UTTERANCE_ID, pixel_values

    with torch.no_grad():
        out = tiny.torch_model.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values(image),
                                        max_new_tokens=BUDGET, do_sample=False, eos_token_id=END_OF_UTTERANCE_ID,
                                        pad_token_id=END_OF_UTTERANCE_ID)
    answer = out[0, len(ids):].tolist()
    return answer[:-1] if answer and answer[-1] == END_OF_UTTERANCE_ID else answer  # the stop is not emitted


def test_the_model_loads_as_the_smolvlm_family(engine):
    model = engine.model
    assert model.family.name == "smolvlm" and model.describe()["family"] == "smolvlm"
    assert engine.shapes.image_tokens == 64 and engine.shapes.vision_layout == "nhwc"
    assert model.template.image_context_id == 49190
    assert model.tokenizer.token_id("<end_of_utterance>") in model.template.stop_ids


def test_greedy_parity_image_follow_up_and_three_turns(engine, tiny_smolvlm):
    from tests.smolvlm_factory import image_block, sample_image

    tok = Tokenizer.from_dir(tiny_smolvlm.path)
    image = sample_image(11)

    def user(question: str, with_image: bool) -> str:
        return ("User:" + image_block() if with_image else "User: ") + question + "<end_of_utterance>\nAssistant:"

    ids = tok.encode("<|im_start|>" + user("What is in the image?", True))
    first, done = _ask(engine, Prompt("What is in the image?", images=[image], image_key="img:11"))
    assert done.prompt_tokens == len(ids) and done.timings["images_encoded"] == 1
    assert first == _hf(tiny_smolvlm, ids, image) and len(set(first)) > 2

    follow_ids = tok.encode("<|im_start|>" + user("Is there a dog? Yes or no.", True))
    follow, done = _ask(engine, Prompt("Is there a dog? Yes or no.", images=[image], image_key="img:11"))
    assert done.timings["prefix_reused"] and done.timings["images_encoded"] == 0
    assert follow == _hf(tiny_smolvlm, follow_ids, image)

    # each later turn: the answers as generated, then the template's text up to the new question
    questions = ("What is in the image?", "And the left side?", "What colour is it?")
    convo = list(ids)
    for turn, question in enumerate(questions, 1):
        if turn > 1:
            convo += tok.encode("<end_of_utterance>\n" + user(question, False))
        prompt = Prompt(question, images=[image] if turn == 1 else [], image_key="img:11", conversation="c1")
        answer, done = _ask(engine, prompt)
        assert done.prompt_tokens == len(convo), question
        if turn > 1:
            assert 0 < done.timings["prefill_rows"] < len(convo)  # only the turn's own rows
        assert answer == _hf(tiny_smolvlm, convo, image), question
        convo += answer
