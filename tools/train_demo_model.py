"""Train the tiny demo InternVL2 shipped in npu/assets/demo_model/.

    python tools/train_demo_model.py [--out DIR] [--threads 2] [--val-every 200]

The model has InternVL2's exact architecture, only tiny: InternViT blocks (224x224,
patch 14), pixel shuffle 0.5 (64 image tokens, as in InternVL2-1B), the MLP projector
and Qwen2 decoder layers with grouped-query attention and tied embeddings. It learns to
caption and answer questions about the synthetic scenes of daemon/scenes.py, and
nothing else: it is a demonstration of the pipeline, not a general VLM.

The tokenizer is a byte-level BPE like Qwen2's (trained here on the prompt corpus, so
common words are single tokens) plus InternVL2's twelve added tokens, so the runtime
reads it through the same code paths as a real checkpoint. Prompts are rendered with
npu.text.template.ChatTemplate (Hermes-2, InternVL2-1B's Chinese system message) when that
module is importable, else with the identical rendering below.

How it learns in under 15 minutes on two CPU cores (RECIPE, one run of 2400 steps):
- the first 600 steps train only the vision side, on an auxiliary task: a linear head
  reads the shape kind, colour and place under each of the 64 image tokens (labels from
  the scene's shape map), a dense signal that teaches the tiny InternViT shapes far
  sooner than caption words sent back through the decoder would;
- then every step draws 12 fresh scenes, encodes each image once and asks a caption and
  up to four questions about it; the decoder runs the prompt part those sequences share
  (system message, image) once per image and reuses its KV cache for the rest, which
  gives exactly the loss and gradients of running each sequence whole in about half
  the time; captions and questions weigh the same in the loss;
- two more auxiliary heads train the binding a question needs: a probe scores image
  tokens against the embeddings of the kind words, and a head at the question's kind
  word ("is there a *star*?") predicts what the image says about that kind (present,
  colour, place). Without the latter the decoder answered "is there a ...?" from the
  number of shapes (about 66 % right); with it, over 99 %.
None of the auxiliary heads is part of the exported checkpoint.

Seeded: the tokenizer, the weights' init and every batch follow from RECIPE.seed; CPU
kernels with a fixed thread count are deterministic in practice. Held-out scenes
(tools/eval_demo_model.py, `draw_scene(9_000_000 + i)`) and validation scenes
(VALIDATION_SEED) come from seeds the training stream never uses.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon import scenes  # noqa: E402

DEFAULT_OUT = REPO / "npu" / "assets" / "demo_model"
IMAGE_SIZE = 224
NUM_IMAGE_TOKENS = 64  # (224 / 14)^2 patches * 0.5^2 pixel shuffle
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HERMES2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
# InternVL2-1B's added tokens, in its id order (appended after the BPE vocabulary).
ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
BPE_VOCAB = 640
# Source frame sizes the training draws (the engine resizes any frame to 224x224).
FRAME_SIZES = ((224, 224), (320, 240), (256, 192), (288, 288), (240, 320))
# What the auxiliary head reads off each image token, and the Shape attribute it comes from.
AUX_FIELDS = {"kind": scenes.KINDS, "colour": tuple(scenes.COLOURS), "place": scenes.POSITIONS}
AUX_ATTRS = ("kind", "colour", "position")
AUX_MIN_COVER = 0.2  # a shape labels an image token when it covers this much of its cell
AUX_SIZES = tuple(1 + len(values) for values in AUX_FIELDS.values())
VALIDATION_SEED = 8_000_000
SHARED_PREFIX = True  # compute the common prompt prefix once per image (same result, less work)


@dataclass(frozen=True)
class Phase:
    steps: int
    lr: float  # peak; linear warmup, then cosine down to 5 % over all steps
    warmup: int
    seed: int  # seeds the scene stream, the question picks and torch
    images: int  # scenes per step
    questions: int  # questions per scene, besides its caption
    aux_weight: float
    vision_steps: int = 0  # first steps train only the vision side, on the aux labels
    vision_images: int = 32  # scenes per vision-only step


RECIPE = Phase(steps=2400, lr=2e-3, warmup=100, seed=1234, images=12, questions=4, aux_weight=0.5,
               vision_steps=600, vision_images=32)


# ---- prompts -------------------------------------------------------------------------

def render_prompt(question: str) -> str:
    """The Hermes-2 prompt for one image and one question, as the engine renders it."""
    image = "<img>" + "<IMG_CONTEXT>" * NUM_IMAGE_TOKENS + "</img>\n"
    return (
        f"<|im_start|>system\n{HERMES2_SYSTEM}<|im_end|>"
        f"<|im_start|>user\n{image}{question}<|im_end|><|im_start|>assistant\n"
    )


def prompt_encoder(tok, tokenizer_dir: Path):
    """question -> prompt ids: npu's ChatTemplate when importable, so training and
    inference tokenise prompts identically; else the same rendering encoded here."""
    try:
        from npu.text.template import ChatTemplate
        from npu.text.tokenizer import Tokenizer
    except ImportError:
        print("npu.text.template not importable: rendering Hermes-2 prompts here", flush=True)
        return lambda question: tok.encode(render_prompt(question)).ids
    template = ChatTemplate.from_checkpoint({"template": "Hermes-2"}, Tokenizer.from_dir(tokenizer_dir))
    if template.render("q", 1, NUM_IMAGE_TOKENS) != render_prompt("q"):
        print("note: npu's Hermes-2 rendering differs from render_prompt; training uses npu's", flush=True)
    return lambda question: template.encode_prompt(question, 1, NUM_IMAGE_TOKENS).ids


def question_variants(question: str, rng: random.Random) -> str:
    """Cheap paraphrases a user may type: capitals, US spelling, no question mark."""
    if rng.random() < 0.4:
        question = question[0].upper() + question[1:]
    if "colour" in question and rng.random() < 0.4:
        question = question.replace("colour", "color")
    if question.endswith("?") and rng.random() < 0.15:
        question = question[:-1]
    return question


def corpus() -> list[str]:
    """Text the BPE is trained on: every prompt word and answer the scenes can produce."""
    lines = [render_prompt(p).replace("<IMG_CONTEXT>", "") for p in scenes.CAPTION_PROMPTS]
    rng = np.random.default_rng(0)
    for _ in range(400):
        scene = scenes.random_scene(rng)
        lines.append(scene.caption())
        for question, answer in scene.questions():
            lines += [question, question.capitalize(), question.replace("colour", "color"), answer]
    lines += [p.lower() for p in scenes.CAPTION_PROMPTS]
    # Frequent enough that BPE merges the system message and role names into a few
    # tokens, as Qwen2's vocabulary does: short prompts keep training and prefill cheap.
    return lines + [HERMES2_SYSTEM, "system\n", "user\n", "assistant\n"] * 2000


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    return tok


# ---- model -----------------------------------------------------------------------------

def model_config(tok):
    from transformers import InternVLConfig

    vocab = tok.get_vocab_size(with_added_tokens=True)
    vision = dict(
        hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=384,
        image_size=IMAGE_SIZE, patch_size=14, attention_bias=True, norm_type="layer_norm",
        layer_norm_eps=1e-6, hidden_act="gelu", layer_scale_init_value=0.1,
        use_mean_pooling=True, use_qk_norm=False,
    )
    text = dict(
        model_type="qwen2", vocab_size=vocab, hidden_size=128, intermediate_size=384,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, use_sliding_window=False,
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )
    return InternVLConfig(
        vision_config=vision, text_config=text,
        image_token_id=tok.token_to_id("<IMG_CONTEXT>"), image_seq_length=NUM_IMAGE_TOKENS,
        downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=True,
    )


def pixel_values(images: list[Image.Image]):
    """RGB frames -> normalised float [B,3,224,224], as the vision graph normalises uint8 input."""
    import torch

    arrays = [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for im in images]
    batch = np.stack(arrays).astype(np.float32) / 255.0  # (B, 224, 224, 3)
    batch = (batch - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())  # (B, 3, 224, 224)


# ---- data ------------------------------------------------------------------------------

def scene_pairs(scene: scenes.Scene, rng: random.Random, questions: int) -> list[tuple[str, str]]:
    """A caption and `questions` questions of distinct types (as the accuracy script asks
    one of each type), each a paraphrase a user may type."""
    pairs = [(rng.choice(scenes.CAPTION_PROMPTS), scene.caption())]
    by_type = scene.questions_by_type()
    for kind in rng.sample(sorted(by_type), min(questions, len(by_type))):
        question, answer = rng.choice(by_type[kind])
        pairs.append((question_variants(question, rng), answer))
    return pairs


def cell_labels(scene: scenes.Scene, mask: np.ndarray) -> np.ndarray:
    """Per image token (8x8 grid over the 224x224 input, row-major as InternVL's pixel
    shuffle orders them): the kind, colour and place (slot) of the shape covering it,
    as int64 (3, 64). 0 = background; -100 (ignored) where a shape covers the cell only
    slightly."""
    small = np.asarray(Image.fromarray(mask).resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST))
    grid, cell = int(NUM_IMAGE_TOKENS ** 0.5), IMAGE_SIZE // int(NUM_IMAGE_TOKENS ** 0.5)
    cells = small.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(NUM_IMAGE_TOKENS, cell * cell)
    labels = np.zeros((len(AUX_FIELDS), NUM_IMAGE_TOKENS), np.int64)  # (fields, 64)
    for index, shape in enumerate(scene.shapes):
        cover = (cells == index + 1).mean(axis=1)  # (64,)
        labels[:, cover > 0] = -100
        for field, values in enumerate(AUX_FIELDS.values()):
            labels[field, cover >= AUX_MIN_COVER] = 1 + values.index(getattr(shape, AUX_ATTRS[field]))
    return labels


def question_facts(scene: scenes.Scene, question: str, prompt_ids: list[int], tok) -> tuple[int, list[int]]:
    """For a question that names a shape kind ("is there a star?", "what colour is the
    star?", "where is the star?"): the prompt position of the kind word and what the
    image says about that kind: present (0/1), its colour and place (1-based; 0 when
    absent; -100 when several shapes share the kind). (-1, [-100] * 3) otherwise."""
    kind = question.rstrip("?").split()[-1]
    if kind not in scenes.KINDS:
        return -1, [-100, -100, -100]
    token = tok.token_to_id("\u0120" + kind)
    at = max(i for i, t in enumerate(prompt_ids) if t == token)
    same = [shape for shape in scene.shapes if shape.kind == kind]
    if len(same) == 1:
        return at, [1, 1 + list(scenes.COLOURS).index(same[0].colour), 1 + scenes.POSITIONS.index(same[0].position)]
    return at, [int(bool(same)), -100 if same else 0, -100 if same else 0]


QUESTION_FACT_SIZES = (2, 1 + len(scenes.COLOURS), 1 + len(scenes.POSITIONS))


@dataclass
class Batch:
    pixels: object  # float [B, 3, 224, 224]
    cells: object  # long [B, 3, 64]: aux labels (kind, colour, place) per image token
    image_index: object  # long [N]: which image each sequence shows
    input_ids: object  # long [N, T]
    attention: object  # long [N, T]
    labels: object  # long [N, T]: -100 except the answer and its <|im_end|>
    is_caption: object  # bool [N]
    kind_at: object  # long [N]: where the question's shape kind word sits, -1 for none
    kind_facts: object  # long [N, 3]: about that kind: present?, colour, place (0 none, -100 unknown)


def make_batch(np_rng, py_rng, tok, encode_prompt, phase: "Phase", images: int, text: bool = True) -> Batch:
    import torch

    im_end, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    frames, cells, rows, label_rows, image_index, is_caption, kind_at, kind_facts = [], [], [], [], [], [], [], []
    for i in range(images):
        size = FRAME_SIZES[py_rng.randrange(len(FRAME_SIZES))]
        image, scene, mask = scenes.draw_scene_with_mask(np_rng, size=size)
        frames.append(image)
        cells.append(cell_labels(scene, mask))
        for question, answer in (scene_pairs(scene, py_rng, phase.questions) if text else ()):
            prompt_ids = encode_prompt(question)
            answer_ids = tok.encode(answer).ids + [im_end]
            rows.append(prompt_ids + answer_ids)
            label_rows.append([-100] * len(prompt_ids) + answer_ids)
            image_index.append(i)
            is_caption.append(question in scenes.CAPTION_PROMPTS)
            at, facts = question_facts(scene, question, prompt_ids, tok)
            kind_at.append(at)
            kind_facts.append(facts)
    count, length = len(rows), max((len(r) for r in rows), default=0)
    input_ids = torch.full((count, length), pad, dtype=torch.long)  # (N, T)
    labels = torch.full((count, length), -100, dtype=torch.long)  # (N, T)
    attention = torch.zeros((count, length), dtype=torch.long)  # (N, T)
    for i, (row, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(row)] = 1
    return Batch(pixel_values(frames), torch.from_numpy(np.stack(cells)), torch.tensor(image_index, dtype=torch.long),
                 input_ids, attention, labels, torch.tensor(is_caption, dtype=torch.bool),
                 torch.tensor(kind_at, dtype=torch.long), torch.tensor(kind_facts, dtype=torch.long).reshape(-1, 3))


def word_probe(model, tok):
    """A second auxiliary head, from the first step with text on: scores each image token
    against the (tied) embeddings of the four kind words, plus a learned "background"
    vector. It pulls an image token towards the embedding of " triangle" when a
    triangle covers it, so a question's kind word can find its shape by matching (what
    "is there a triangle?", "what colour is the triangle?" and "where is the triangle?"
    need). Only training uses it; the exported checkpoint does not contain it."""
    import torch

    ids = [tok.token_to_id("\u0120" + kind) for kind in scenes.KINDS]
    hidden = model.config.text_config.hidden_size

    class WordProbe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.background = torch.nn.Parameter(torch.randn(1, hidden) * 0.02)  # (1, hidden)
            self.scale = torch.nn.Parameter(torch.tensor(4.0))

        def forward(self, features, kinds):  # (B, 64, hidden), (B, 64) -> loss
            vectors = torch.cat([self.background, model.get_input_embeddings().weight[ids]])  # (5, hidden)
            return _cell_loss(features @ vectors.T * self.scale, kinds)

    return WordProbe()


# ---- forward -----------------------------------------------------------------------------

def forward(model, aux_head, batch: Batch, probe=None, fact_head=None):
    """(answer loss, aux loss, answer logits, their targets, their rows, image features):
    the vision tower runs once per image and its 64 tokens are spliced into every
    sequence about that image, as the runtime splices them at the <IMG_CONTEXT> positions."""
    import torch
    import torch.nn.functional as F

    features = model.model.get_image_features(
        pixel_values=batch.pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
    ).pooler_output  # (B, 64, hidden)
    aux = aux_head(features).split(AUX_SIZES, dim=-1)  # (B, 64, 1 + classes) per field
    aux_loss = sum(_cell_loss(logits, batch.cells[:, field]) for field, logits in enumerate(aux))
    if batch.input_ids.shape[0] == 0:  # a vision-only step
        return aux_loss.new_zeros(()), aux_loss, None, None, None, features
    if probe is not None:
        aux_loss = aux_loss + probe(features, batch.cells[:, 0])
    hidden, start = decode(model, features, batch)  # (N, T - start, hidden): rows from `start` on
    if fact_head is not None:
        aux_loss = aux_loss + kind_fact_loss(fact_head, hidden, start, batch)
    targets = batch.labels[:, start + 1 :]  # (N, T-1-start): position t predicts token t+1
    where = targets != -100
    logits = model.lm_head(hidden[:, :-1][where])  # (answer tokens, vocab)
    per_token = F.cross_entropy(logits, targets[where], reduction="none")
    row = where.nonzero()[:, 0]
    # Captions and questions weigh the same: the mean over caption tokens plus the mean
    # over question answers (a one-word answer teaches as much binding as a caption).
    tokens = where.sum(dim=1).clamp(min=1).to(per_token.dtype)  # (N,)
    caption = batch.is_caption[row]
    questions = int((~batch.is_caption).sum().clamp(min=1))
    loss = per_token[caption].mean() + (per_token[~caption] / tokens[row][~caption]).sum() / questions
    return loss, aux_loss, logits, targets[where], row, features


def kind_fact_loss(fact_head, hidden, start: int, batch: Batch):
    """At a question's kind word, read off what the image says about that kind: trains the
    first hop of "is there a star?" (the word finds its shape) directly, instead of only
    through the answer two tokens later, which a model otherwise learns to guess from
    the number of shapes."""
    import torch.nn.functional as F

    rows = (batch.kind_at >= 0).nonzero()[:, 0]
    if rows.numel() == 0:
        return hidden.sum() * 0
    states = hidden[rows, batch.kind_at[rows] - start]  # (questions, hidden)
    logits = fact_head(states).split(QUESTION_FACT_SIZES, dim=-1)
    facts = batch.kind_facts[rows]  # (questions, 3)
    total = 0
    for field, scores in enumerate(logits):
        if (facts[:, field] != -100).any():
            total = total + F.cross_entropy(scores, facts[:, field], ignore_index=-100)
    return total


def decode(model, features, batch: Batch):
    """The decoder over every sequence, computing the part all sequences share (system
    message, image, up to where the questions differ) once per image: the prefix runs
    per image with a KV cache, which is then gathered per sequence for the suffixes.
    Returns (hidden states of positions start.., start)."""
    import torch

    ids = batch.input_ids  # (N, T)
    same = (ids == ids[:1]).all(dim=0)  # (T,)
    first_label = int((batch.labels != -100).float().argmax(dim=1).min())
    start = min(int(same.float().argmin()) if not same.all() else ids.shape[1], first_label - 1)
    if not SHARED_PREFIX or start < 1:
        start = 0
    embed = model.get_input_embeddings()
    lm = model.model.language_model
    image_id = model.config.image_token_id
    cache = None
    if start:
        prefix = ids[:1, :start].expand(features.shape[0], start)  # (B, P)
        embeds = embed(prefix).masked_scatter((prefix == image_id).unsqueeze(-1), features)
        cache = lm(inputs_embeds=embeds, use_cache=True).cache
        cache.reorder_cache(batch.image_index)  # (N, heads, P, dim) per layer
    suffix = ids[:, start:]  # (N, S)
    embeds = embed(suffix)
    spots = (suffix == image_id).unsqueeze(-1)
    if spots.any():
        embeds = embeds.masked_scatter(spots, features[batch.image_index].to(embeds.dtype))
    positions = torch.arange(start, ids.shape[1])
    out = lm(inputs_embeds=embeds, attention_mask=batch.attention, cache=cache, use_cache=cache is not None,
             position_ids=positions.expand(ids.shape[0], -1), cache_position=positions)
    return out.last_hidden_state, start


def _cell_loss(logits, labels):
    """Mean cross-entropy over shape cells plus mean over background cells: shapes cover a
    few of the 64 cells, and an average over all cells would mostly teach "background"."""
    import torch.nn.functional as F

    flat, labels = logits.flatten(0, 1), labels.flatten()  # (B*64, classes), (B*64,)
    shape, background = labels > 0, labels == 0
    loss = F.cross_entropy(flat[shape], labels[shape]) if shape.any() else flat.sum() * 0
    return loss + (F.cross_entropy(flat[background], labels[background]) if background.any() else 0)


def exact_rows(logits, targets, row, count: int):
    """Per sequence: is every answer token the argmax? With teacher forcing that is exactly
    "greedy decoding reproduces the answer", so one forward pass measures exact match."""
    import torch

    wrong = (logits.argmax(-1) != targets).to(torch.long)
    errors = torch.zeros(count, dtype=torch.long).index_add_(0, row, wrong)
    return errors == 0  # (N,)


# ---- export ----------------------------------------------------------------------------

def export(model, tok, out: Path) -> None:
    """A normal HF checkpoint dir: bf16 safetensors, config.json with "template", tokenizer.json."""
    import copy

    import torch

    out.mkdir(parents=True, exist_ok=True)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((out / "config.json").read_text())
    config["template"] = "Hermes-2"  # InternVL2's field: picks the chat template
    config["architectures"] = ["InternVLForConditionalGeneration"]
    config["text_config"]["rope_theta"] = config["text_config"]["rope_parameters"]["rope_theta"]
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "generation_config.json").unlink(missing_ok=True)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def validation_batch(tok, encode_prompt, phase: Phase, images: int) -> Batch:
    """Fixed scenes from their own seed range (not the training stream, not the held-out
    scenes tools/eval_demo_model.py draws)."""
    return make_batch(np.random.default_rng(VALIDATION_SEED), random.Random(VALIDATION_SEED), tok, encode_prompt,
                      Phase(0, 0.0, 0, 0, images, len(scenes.QUESTION_TYPES), 0.0), images)


def validate(model, aux_head, batch: Batch, kind_ids: list[int]) -> dict[str, float]:
    """Exact match of captions and answers on the validation batch (greedy-equivalent),
    plus where errors sit: caption kind words, and the aux head's kind per shape cell."""
    import torch

    model.eval()
    with torch.no_grad():
        _, _, logits, targets, row, features = forward(model, aux_head, batch)
        ok = exact_rows(logits, targets, row, batch.input_ids.shape[0])
        aux_kinds = aux_head(features)[..., : AUX_SIZES[0]].argmax(-1)  # (B, 64)
    model.train()
    first = batch.is_caption
    is_kind = torch.isin(targets, torch.tensor(kind_ids))
    shape_cells = batch.cells[:, 0] > 0
    return {
        "captions": ok[first].float().mean().item(),
        "answers": ok[~first].float().mean().item(),
        "kind words": (logits.argmax(-1) == targets)[is_kind].float().mean().item(),
        "aux kind cells": (aux_kinds == batch.cells[:, 0])[shape_cells].float().mean().item(),
    }


def train(args) -> None:
    import torch
    from transformers import InternVLForConditionalGeneration

    torch.set_num_threads(args.threads)
    phase = RECIPE
    if args.steps is not None:  # a shorter run keeps the recipe's share of vision-only steps
        share = RECIPE.vision_steps / RECIPE.steps
        phase = Phase(**{**RECIPE.__dict__, "steps": args.steps, "vision_steps": int(args.steps * share)})
    torch.manual_seed(phase.seed)
    tok = build_tokenizer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    encode_prompt = prompt_encoder(tok, out)
    if args.init:
        model = InternVLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    else:
        model = InternVLForConditionalGeneration(model_config(tok)).float()
    # Reads each image token's shape kind, colour and place; only training uses it, and it is
    # not part of the exported checkpoint.
    aux_head = torch.nn.Linear(model.config.text_config.hidden_size, sum(AUX_SIZES))
    probe = word_probe(model, tok)
    fact_head = torch.nn.Linear(model.config.text_config.hidden_size, sum(QUESTION_FACT_SIZES))
    params = [*model.parameters(), *aux_head.parameters(), *probe.parameters(), *fact_head.parameters()]
    print(f"params {sum(p.numel() for p in model.parameters()):,}; vocab {tok.get_vocab_size()}", flush=True)
    optimizer = torch.optim.AdamW(params, lr=phase.lr, betas=(0.9, 0.95), weight_decay=0.01)
    np_rng, py_rng = np.random.default_rng(phase.seed), random.Random(phase.seed)
    check = validation_batch(tok, encode_prompt, phase, args.val_images) if args.val_every else None
    kind_ids = [tok.token_to_id("Ġ" + kind) for kind in scenes.KINDS]
    model.train()
    start, smoothed = time.time(), None
    for step in range(phase.steps):
        lr = lr_at(step, phase.steps, phase.lr, phase.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        vision_only = step < phase.vision_steps
        batch = make_batch(np_rng, py_rng, tok, encode_prompt, phase,
                           phase.vision_images if vision_only else phase.images, text=not vision_only)
        loss, aux_loss, *_ = forward(model, aux_head, batch, probe, fact_head)
        optimizer.zero_grad(set_to_none=True)
        (loss + phase.aux_weight * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        pair = np.array([loss.item(), aux_loss.item()])
        smoothed = pair if smoothed is None else 0.95 * smoothed + 0.05 * pair
        last = step == phase.steps - 1
        if step % 25 == 0 or last:
            print(f"step {step} loss {smoothed[0]:.4f} aux {smoothed[1]:.4f} lr {lr:.2e} "
                  f"{time.time() - start:.0f}s", flush=True)
        if check is not None and step and (step % args.val_every == 0 or last):
            figures = validate(model, aux_head, check, kind_ids)
            print(f"step {step} validation: " + ", ".join(f"{k} {v:.1%}" for k, v in figures.items()), flush=True)
        if args.export_every and step and step % args.export_every == 0:
            export(model, tok, out)
    export(model, tok, out)
    print(f"{phase.steps} steps in {time.time() - start:.0f}s -> {out}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the recipe was timed with 2)")
    parser.add_argument("--steps", type=int, default=None, help="override RECIPE.steps (smoke tests)")
    parser.add_argument("--init", help="start from this exported checkpoint instead of random weights")
    parser.add_argument("--export-every", type=int, default=0, help="also write the checkpoint every N steps")
    parser.add_argument("--val-every", type=int, default=0,
                        help="print exact-match figures on fixed validation scenes every N steps (0 = off)")
    parser.add_argument("--val-images", type=int, default=64)
    args = parser.parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
