"""tools/train_demo_model.py: the labels it trains on and that the same seed gives the same model.

Training itself takes minutes (tools/eval_demo_model.py measures the shipped result);
these tests check the parts a silent mistake would spoil: the per-token auxiliary labels
must sit where InternVL's pixel shuffle puts each image token, and two runs with the same
recipe must write the same weights.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.commands.demo import scenes
from npu.text.template import Turn

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import demo_data  # noqa: E402
import train_demo_model as training  # noqa: E402


def test_cell_labels_mark_the_cells_under_each_shape():
    scene = scenes.Scene(
        shapes=(scenes.Shape("star", "green", "left", 0.12), scenes.Shape("square", "red", "right", 0.12)),
        background="plain",
    )
    size = (224, 224)
    _, mask = scenes._render(scene, np.random.default_rng(0), size, with_mask=True)
    labels = dict(zip(demo_data.AUX_FIELDS, demo_data.cell_labels(scene, mask).reshape(-1, 8, 8)))  # row-major
    kinds, colours = labels["kind"], labels["colour"]
    # Left slot: centre at x = 0.2 * 224 ~ 45 px -> column 1; y = 112 px -> rows 3..4.
    assert kinds[3:5, 1].tolist() == [1 + scenes.KINDS.index("star")] * 2
    assert colours[3:5, 1].tolist() == [1 + list(scenes.COLOURS).index("green")] * 2
    assert kinds[3:5, 6].tolist() == [1 + scenes.KINDS.index("square")] * 2
    assert colours[3:5, 6].tolist() == [1 + list(scenes.COLOURS).index("red")] * 2
    assert (kinds[0] == 0).all() and (kinds[:, 3:5] == 0).all()  # top row and the centre are background
    assert set(np.unique(kinds)) <= {-100, 0, 1 + scenes.KINDS.index("star"), 1 + scenes.KINDS.index("square")}


def test_image_token_order_is_row_major_over_2x2_patch_blocks():
    """cell_labels assumes token r * 8 + c covers patch rows 2r..2r+1 and columns 2c..2c+1;
    check that against the pixel shuffle transformers' InternVL runs."""
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration(training.model_config(training.build_tokenizer()))
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    patches = torch.stack([rows, cols], dim=-1).float()[None]  # (1, 16, 16, 2): each patch knows its place
    shuffled = model.model.pixel_shuffle(patches, scale_factor=0.5).reshape(64, 4, 2)  # (64 tokens, 4 patches, 2)
    for token in range(64):
        r, c = divmod(token, 8)
        places = {tuple(int(v) for v in p) for p in shuffled[token]}
        assert places == {(2 * r, 2 * c), (2 * r, 2 * c + 1), (2 * r + 1, 2 * c), (2 * r + 1, 2 * c + 1)}


def test_draw_scene_with_mask_draws_the_same_scene():
    for seed in range(20):
        image, scene = scenes.draw_scene(seed)
        image_m, scene_m, mask = scenes.draw_scene_with_mask(seed)
        assert scene_m == scene and np.array_equal(np.asarray(image), np.asarray(image_m))
        assert mask.shape == (image.size[1], image.size[0])
        assert set(np.unique(mask).tolist()) == set(range(len(scene.shapes) + 1))


def test_shared_prefix_gives_the_same_loss_and_gradients(monkeypatch, tmp_path):
    """The decoder computes the prompt part every sequence of an image shares once and
    reuses its KV cache, in buckets of similar length; loss and gradients must equal
    running every sequence whole in one padded batch."""
    import random

    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(0)
    tok = training.build_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    model = InternVLForConditionalGeneration(training.model_config(tok)).float()
    head = torch.nn.Linear(model.config.text_config.hidden_size, sum(demo_data.AUX_SIZES))
    batch = demo_data.make_batch(np.random.default_rng(5), random.Random(5), training.chat_template(tmp_path),
                                 demo_data.Mix(), 3)
    assert (batch.image_index < 0).any() and len(set(batch.segment_types)) > 3  # text-only rows, several kinds
    results = []
    for shared, buckets in ((False, 1), (True, 3)):
        monkeypatch.setattr(training, "SHARED_PREFIX", shared)
        monkeypatch.setattr(training, "BUCKETS", buckets)
        model.zero_grad()
        loss, aux_loss, *_ = training.forward(model, head, batch)
        (loss + aux_loss).backward()
        grads = [p.grad.clone() for p in model.model.language_model.parameters() if p.grad is not None]
        results.append((loss.item(), grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for full, shared in zip(results[0][1], results[1][1]):
        assert torch.allclose(full, shared, atol=1e-7, rtol=1e-4)


def test_conversations_are_tokenised_as_the_engine_renders_them(tmp_path):
    """A one-turn prompt gives ChatTemplate.encode_prompt's ids; a conversation gives the
    ids of ChatTemplate.render_conversation's text, answered (training) or with the last
    turn open (asking), and the answer spans hold the answers."""
    tok = training.build_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    template = training.chat_template(tmp_path)
    question = "What colour is the star? Answer with one of: red, blue."
    one = demo_data.encode_conversation(template, [Turn(question, 1)])
    assert one.ids == template.encode_prompt(question, 1, demo_data.NUM_IMAGE_TOKENS).ids
    turns = [Turn("Describe the image.", 1, "a red star on the left"), Turn("Is there a star?", 0, "yes"),
             Turn("Where is the star?", 0, "on the left")]
    text = template.render_conversation(turns, demo_data.NUM_IMAGE_TOKENS)
    encoded = demo_data.encode_conversation(template, turns, types=["caption", "is there", "where is"])
    sep = template.spec.sep
    assert encoded.ids == template.tokenizer.encode(text)
    assert [template.tokenizer.decode(encoded.ids[a:b]) for a, b, _ in encoded.answers] == [
        turn.answer + sep for turn in turns]
    asked = demo_data.encode_conversation(template, [*turns[:2], Turn("Where is the star?", 0)])
    assert asked.ids == template.tokenizer.encode(
        template.render_conversation([*turns[:2], Turn("Where is the star?", 0)], demo_data.NUM_IMAGE_TOKENS))
    assert [(kind, turn) for _, kind, turn in encoded.kind_words] == [("star", 1), ("star", 2)]
    assert template.tokenizer.decode(encoded.ids[: encoded.num_prefix_ids]).endswith("</img>\n")


@pytest.mark.slow
def test_same_recipe_writes_the_same_weights(tmp_path):
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert training.main(["--out", str(out), "--steps", "4", "--threads", "1"]) == 0  # 1 vision-only
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    # ... and training moved the weights away from the seeded init.
    assert training.main(["--out", str(tmp_path / "c"), "--steps", "0", "--threads", "1"]) == 0
    assert hashlib.sha256((tmp_path / "c" / "model.safetensors").read_bytes()).hexdigest() != digests[0]
