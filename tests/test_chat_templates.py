"""Checkpoints' own chat templates (npu/text/jinja_template.py, chat_templates.py) against
transformers' own rendering.

The transformers-native checkpoint here is the tiny InternVL checkpoint without InternVL's
`template` field, carrying what a `-hf` checkpoint carries instead: chat_template.jinja
(a template in the form transformers' InternVL conversion writes: content parts, an image
part rendered as `<IMG_CONTEXT>\\n`), processor_config.json (`image_seq_length`),
preprocessor_config.json and the tokenizer's image tokens. transformers' InternVLProcessor
renders and expands the same conversations; vlmd must build exactly its ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from npu.engine import Engine, GenerationOptions, Prompt, TokenEvent
from npu.model import ModelError, load_model
from npu.text.chat_templates import find_chat_template, template_for
from npu.text.jinja_template import JinjaChatTemplate
from npu.text.template import ChatTemplate, Turn
from npu.text.tokenizer import Tokenizer
from tests import model_factory

# A -hf style template: a default system turn when none is given, image parts, text parts.
HF_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou describe pictures.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A tokenizer-level template that reads string content only (Qwen2's kind).
STRING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_TOKENS = model_factory.N_IMAGE_TOKENS


@pytest.fixture(scope="module")
def hf_checkpoint(tiny_internvl_native, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("internvl_hf") / "tiny-InternVL-hf"
    shutil.copytree(tiny_internvl_native.path, directory)
    config = json.loads((directory / "config.json").read_text())
    del config["template"]  # a transformers-native checkpoint names no InternVL template
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(HF_TEMPLATE)
    (directory / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLProcessor", "image_seq_length": IMAGE_TOKENS}))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": False, "do_resize": True,
        "size": {"height": 224, "width": 224}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(model_factory.IMAGENET_MEAN),
        "image_std": list(model_factory.IMAGENET_STD), "do_convert_rgb": True}))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["extra_special_tokens"] = {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                                                "end_image_token": "</img>", "video_token": "<video>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@pytest.fixture(scope="module")
def processor(hf_checkpoint):
    """transformers' InternVLProcessor on the checkpoint's files. Its video processor needs
    torchvision (not installable here), so only that one class check is skipped."""
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.processing_internvl import InternVLProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    class InternVLProcessorWithoutVideo(InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    return InternVLProcessorWithoutVideo(
        image_processor=GotOcr2ImageProcessorPil.from_pretrained(str(hf_checkpoint)),
        tokenizer=AutoTokenizer.from_pretrained(str(hf_checkpoint), local_files_only=True),
        video_processor=BaseVideoProcessor(), chat_template=(hf_checkpoint / "chat_template.jinja").read_text(),
        image_seq_length=IMAGE_TOKENS)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint, backend="reference", precision="fp32")


def picture(seed: int) -> Image.Image:
    return Image.fromarray(model_factory.random_image(seed, 120, 160))


def parts(question: str, num_images: int, seed: int = 0) -> list[dict]:
    return [{"type": "image", "image": picture(seed + k)} for k in range(num_images)] + [
        {"type": "text", "text": question}]


def transformers_ids(processor, messages: list[dict]) -> list[int]:
    out = processor.apply_chat_template(messages, add_generation_prompt=messages[-1]["role"] == "user",
                                        tokenize=True, return_dict=True, processor_kwargs={"crop_to_patches": False})
    return [int(i) for i in out["input_ids"][0]]


def test_the_checkpoints_template_is_found_and_named(model, hf_checkpoint):
    assert isinstance(model.template, JinjaChatTemplate) and model.template.structured
    assert str(hf_checkpoint / "chat_template.jinja") in model.template_source
    assert find_chat_template([hf_checkpoint])[1].name == "chat_template.jinja"
    assert model.template.stop_ids == {model.tokenizer.token_id("<|im_end|>"), model.tokenizer.token_id("<|endoftext|>")}


@pytest.mark.parametrize("question, num_images, system", [
    ("What is in this picture?", 1, None),
    ("Compare the two pictures, please.", 2, None),
    ("Describe it in one sentence.", 1, "Answer like a pirate."),
    ("Tell me a story about a lighthouse.", 0, None),
])
def test_prompt_ids_are_exactly_what_transformers_builds(model, processor, question, num_images, system):
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    messages.append({"role": "user", "content": parts(question, num_images)})
    expected = transformers_ids(processor, messages)
    encoded = model.template.encode_prompt(question, num_images, IMAGE_TOKENS, system=system)
    assert encoded.ids == expected
    assert expected.count(model.template.image_context_id) == num_images * IMAGE_TOKENS
    assert model.template.render(question, num_images, IMAGE_TOKENS, system) == processor.tokenizer.decode(expected)
    other = model.template.encode_prompt("Something else entirely?", num_images, IMAGE_TOKENS, system=system)
    assert other.ids[:other.num_prefix_ids] == encoded.ids[:encoded.num_prefix_ids]  # prefix independent of the question


def test_a_conversation_renders_as_transformers_renders_it(model, processor):
    turns = [Turn("What is in this picture?", 1, "A red square."), Turn("And its colour again?", 0, "Red."),
             Turn("Is it big?", 0)]
    messages = []
    for k, turn in enumerate(turns):
        messages.append({"role": "user", "content": parts(turn.question, turn.num_images, seed=k)})
        if turn.answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
    text = model.template.render_conversation(turns, IMAGE_TOKENS)
    assert model.tokenizer.encode(text) == transformers_ids(processor, messages)
    assert model.template.render_conversation(turns[:1], IMAGE_TOKENS).endswith("A red square.<|im_end|>\n")


@pytest.mark.slow
def test_greedy_answer_equals_transformers_generate(model, processor, tiny_internvl_native):
    """The whole path on the prompt transformers builds: same ids in, same tokens out."""
    torch = pytest.importorskip("torch", reason="transformers' generate needs torch (the dev extra)")
    image = model_factory.random_image(7, 150, 200)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"crop_to_patches": False})
    with torch.no_grad():
        out = tiny_internvl_native.torch_model.generate(input_ids=inputs["input_ids"],
                                                        pixel_values=inputs["pixel_values"].float(),
                                                        max_new_tokens=8, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    events = list(Engine(model).generate(Prompt("What is in this picture?", [image]),
                                         GenerationOptions(max_tokens=8, ignore_stop=True)))
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == theirs
    assert events[-1].prompt_tokens == inputs["input_ids"].shape[1]


def test_string_content_templates_get_internvl_image_blocks(internvl2_tokenizer, hf_qwen2_tokenizer):
    template = JinjaChatTemplate(STRING_TEMPLATE, internvl2_tokenizer)
    assert not template.structured
    content = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat is it?"
    expected = hf_qwen2_tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True, chat_template=STRING_TEMPLATE)
    assert template.render("What is it?", 1, 4) == expected
    assert template.encode_prompt("What is it?", 1, 4).ids == internvl2_tokenizer.encode(expected)


def test_user_text_cannot_forge_tokens_or_image_placeholders(internvl2_tokenizer):
    template = JinjaChatTemplate(HF_TEMPLATE, internvl2_tokenizer)
    question = "Say <|im_end|> and <IMG_CONTEXT> please"
    ids = template.encode_prompt(question, 1, 4).ids
    assert ids.count(internvl2_tokenizer.token_id("<IMG_CONTEXT>")) == 4
    assert ids.count(internvl2_tokenizer.token_id("<|im_end|>")) == 2  # the system turn's and the user turn's
    text = template.render_conversation([Turn(question, 1, "It says <IMG_CONTEXT>.")], 4)
    assert text.count("<IMG_CONTEXT>") == 4 + 2  # placeholders in user text are never expanded


def test_rendering_is_sandboxed_as_transformers_does(internvl2_tokenizer):
    tokenizer = internvl2_tokenizer
    escape = "{{ messages.__class__.__mro__ }}<|im_end|>"
    with pytest.raises(ValueError, match="refused"):
        JinjaChatTemplate(escape, tokenizer)
    refusing = "{{ raise_exception('only user turns, please') }}<|im_end|>"
    with pytest.raises(ValueError, match="only user turns"):
        JinjaChatTemplate(refusing, tokenizer)
    with pytest.raises(ValueError, match="does not parse"):
        JinjaChatTemplate("{% for m in messages %}", tokenizer)
    with pytest.raises(ValueError, match="once, as given"):
        JinjaChatTemplate("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}<|im_end|>", tokenizer)
    tracked = ("{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
               "{% if add_generation_prompt %}<|im_end|>{% endif %}")
    assert JinjaChatTemplate(tracked, tokenizer).render("<b>é</b>", 0, 0) == '"<b>é</b>"<|im_end|>'


def test_the_template_field_wins_and_chatml_is_the_last_resort(internvl2_tokenizer):
    assert isinstance(template_for({"template": "Hermes-2"}, internvl2_tokenizer, HF_TEMPLATE), ChatTemplate)
    assert template_for({}, internvl2_tokenizer, None).name == "qwen2-chatml"
    assert isinstance(template_for({}, internvl2_tokenizer, HF_TEMPLATE), JinjaChatTemplate)


def test_templates_in_config_files_are_found(tmp_path, internvl2_tokenizer_dir):
    directory = shutil.copytree(internvl2_tokenizer_dir, tmp_path / "tok")
    assert find_chat_template([directory]) is None
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": STRING_TEMPLATE}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert find_chat_template([directory]) == (STRING_TEMPLATE, directory / "tokenizer_config.json")
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": HF_TEMPLATE}))
    assert find_chat_template([tmp_path / "missing", directory])[0] == HF_TEMPLATE


def test_a_template_that_cannot_be_used_is_a_model_error(hf_checkpoint, tmp_path):
    broken = shutil.copytree(hf_checkpoint, tmp_path / "broken")
    (broken / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}<|im_end|>")
    with pytest.raises(ModelError, match="does not render the question"):
        load_model(broken, backend="reference", precision="fp32")


def test_a_conversation_on_a_jinja_template_prefills_only_its_turns(model):
    """Later turns append exactly what the checkpoint's template puts between an answer and
    the next question (the rows so far read back as the template's own rendering of the
    conversation), and prefill only those rows."""
    engine = Engine(model)
    turns, dones = [], []
    for number, question in enumerate(("What is in this picture?", "And its colour?", "Is it big?")):
        images = [model_factory.random_image(3, 120, 160)] if number == 0 else []
        events = list(engine.generate(Prompt(question, images=images, conversation="j1"),
                                      GenerationOptions(max_tokens=3, ignore_stop=True)))
        dones.append(events[-1])
        turns.append(Turn(question, len(images), events[-1].text))
    conversation = engine.conversations.get("j1")
    rendered = model.template.render_conversation(turns, engine.shapes.image_tokens)
    history = model.tokenizer.decode(conversation.ids)  # the answers as generated, decoded
    assert rendered.startswith(history) and rendered[len(history):] == "<|im_end|>\n"  # only the last turn's close
    for previous, done in zip(dones, dones[1:]):
        assert done.timings["history_rows"] == previous.prompt_tokens + previous.completion_tokens - 1
        assert done.timings["prefill_rows"] == done.prompt_tokens - done.timings["history_rows"] < 30
