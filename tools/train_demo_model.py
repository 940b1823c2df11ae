"""Train the tiny demo InternVL2 shipped in npu/assets/demo_model/.

    python tools/train_demo_model.py [--out DIR] [--threads 2] [--val-every 200]

The model has InternVL2's exact architecture, only tiny: InternViT blocks (224x224,
patch 14), pixel shuffle 0.5 (64 image tokens, as in InternVL2-1B), the MLP projector
and Qwen2 decoder layers with grouped-query attention and tied embeddings. It learns to
caption and answer questions about the synthetic scenes of daemon/commands/demo/scenes.py in the
phrasings of daemon/commands/demo/questions.py (with and without format hints, in conversations
of up to three turns), to reply "I only know shapes and colours." to anything else, and
nothing more: it is a demonstration of the pipeline, not a general VLM.

The tokenizer is a byte-level BPE like Qwen2's (trained here on the prompt corpus, so
common words are single tokens) plus InternVL2's twelve added tokens, so the runtime
reads it through the same code paths as a real checkpoint. Prompts are rendered from
npu's ChatTemplate (Hermes-2, InternVL2-1B's Chinese system message), so training and
inference tokenise them identically. The data (tools/demo_data.py) is built on a thread
ahead of the loop.

How it learns in under 15 minutes on two CPU cores (RECIPE, one run):
- the first steps train only the vision side, on an auxiliary task: a linear head reads
  the shape kind, colour and place under each of the 64 image tokens (labels from the
  scene's shape map), a dense signal that teaches the tiny InternViT shapes far sooner
  than caption words sent back through the decoder would;
- then every step draws fresh scenes, encodes each image once and holds a few
  conversations about it (demo_data.Mix); the decoder runs the prompt part those
  sequences share (system message, image) once per image and reuses its KV cache for
  the rest, in a few buckets of similar length, which gives exactly the loss and
  gradients of running each sequence whole in about half the time; captions and other
  answers weigh the same in the loss;
- two more auxiliary heads train the binding a question needs: a probe scores image
  tokens against the embeddings of the kind words, and a head at the question's kind
  word ("is there a *star*?") predicts what the image says about that kind (present,
  colour, place). Without the latter the decoder answered "is there a ...?" from the
  number of shapes (about 66 % right); with it, over 99 %.
None of the auxiliary heads is part of the exported checkpoint.

Seeded: the tokenizer, the weights' init and every batch follow from RECIPE.seed; CPU
kernels with a fixed thread count are deterministic in practice. Held-out scenes
(tools/eval_demo_model.py, `draw_scene(9_000_000 + i)`) and validation scenes
(VALIDATION_SEED) come from seeds the training stream never uses; held-out
out-of-world prompts from the held-out half of tools/out_of_world.py.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import demo_data  # noqa: E402
import out_of_world  # noqa: E402
from daemon.commands.demo import questions as scene_questions, scenes  # noqa: E402
from demo_data import AUX_SIZES, NUM_IMAGE_TOKENS, QUESTION_FACT_SIZES, Batch, Mix  # noqa: E402
from npu.text.template import INTERNVL2_SYSTEM, ChatTemplate  # noqa: E402
from npu.text.tokenizer import Tokenizer  # noqa: E402

DEFAULT_OUT = REPO / "npu" / "assets" / "demo_model"
# transformers' image processor config for the demo model: resample 2 is PIL's bilinear filter
PREPROCESSOR_CONFIG = {"image_processor_type": "GotOcr2ImageProcessor", "do_resize": True,
                       "size": {"height": demo_data.IMAGE_SIZE, "width": demo_data.IMAGE_SIZE}, "resample": 2,
                       "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                       "image_mean": list(demo_data.IMAGENET_MEAN), "image_std": list(demo_data.IMAGENET_STD),
                       "crop_to_patches": False, "do_convert_rgb": True}
# InternVL2-1B's added tokens, in its id order (appended after the BPE vocabulary).
ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
BPE_VOCAB = 1024
VALIDATION_SEED = 8_000_000
SHARED_PREFIX = True  # compute the common prompt prefix once per image (same result, less work)
BUCKETS = 6  # sequences with one image run in this many groups of similar length (less padding)


@dataclass(frozen=True)
class Phase:
    steps: int
    lr: float  # peak; linear warmup, then cosine down to 5 % over all steps
    warmup: int
    seed: int  # seeds the scene stream, the question picks and torch
    images: int  # scenes per step
    aux_weight: float
    vision_steps: int = 0  # first steps train only the vision side, on the aux labels
    vision_images: int = 32  # scenes per vision-only step
    mix: Mix = field(default_factory=Mix)  # what each step asks about its scenes


RECIPE = Phase(steps=1950, lr=2e-3, warmup=100, seed=1234, images=12, aux_weight=0.5,
               vision_steps=400, vision_images=32, mix=Mix(caption_weight=2.5))


# ---- tokenizer and template ----------------------------------------------------------

def corpus() -> list[str]:
    """Text the BPE is trained on: every prompt and answer the training draws (its own
    seed, not the training stream's)."""
    rng, np_rng = random.Random(0), np.random.default_rng(0)
    lines = list(scenes.CAPTION_PROMPTS)
    for _ in range(1500):
        scene = scenes.random_scene(np_rng)
        lines.append(scene.caption())
        for turns in demo_data.conversations(scene, rng, Mix(typed=0.5)):
            lines += [text for turn in turns for text in (turn.text, turn.answer)]
    lines += out_of_world.corpus_words() + [scene_questions.OUT_OF_WORLD_REPLY] * 100
    # Frequent enough that BPE merges the system message and role names into a few
    # tokens, as Qwen2's vocabulary does: short prompts keep training and prefill cheap.
    return lines + [INTERNVL2_SYSTEM, "system\n", "user\n", "assistant\n"] * 2000


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer as BPE, decoders, models, pre_tokenizers, trainers

    tok = BPE(models.BPE())
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


def chat_template(tokenizer_dir: Path) -> ChatTemplate:
    """npu's Hermes-2 template over the tokenizer saved in `tokenizer_dir`: the one the
    engine renders prompts with."""
    return ChatTemplate.from_checkpoint({"template": "Hermes-2"}, Tokenizer.from_dir(tokenizer_dir))


# ---- model -----------------------------------------------------------------------------

def model_config(tok):
    from transformers import InternVLConfig

    vocab = tok.get_vocab_size(with_added_tokens=True)
    vision = dict(
        hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=384,
        image_size=demo_data.IMAGE_SIZE, patch_size=14, attention_bias=True, norm_type="layer_norm",
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


class WordProbe(torch.nn.Module):
    """A second auxiliary head, from the first step with text on: scores each image token
    against the (tied) embeddings of the four kind words, plus a learned "background"
    vector. It pulls an image token towards the embedding of " triangle" when a
    triangle covers it, so a question's kind word can find its shape by matching (what
    "is there a triangle?", "what colour is the triangle?" and "where is the triangle?"
    need). Only training uses it; the exported checkpoint does not contain it."""

    def __init__(self, model, tok):
        super().__init__()
        self.ids = [tok.token_to_id("\u0120" + kind) for kind in scenes.KINDS]
        self._embeddings = [model.get_input_embeddings()]  # the model's own: not a submodule of the probe
        hidden = model.config.text_config.hidden_size
        self.background = torch.nn.Parameter(torch.randn(1, hidden) * 0.02)  # (1, hidden)
        self.scale = torch.nn.Parameter(torch.tensor(4.0))

    def forward(self, features, kinds):  # (B, 64, hidden), (B, 64) -> loss
        vectors = torch.cat([self.background, self._embeddings[0].weight[self.ids]])  # (5, hidden)
        return _cell_loss(features @ vectors.T * self.scale, kinds)


# ---- forward -----------------------------------------------------------------------------

def forward(model, aux_head, batch: Batch, probe=None, fact_head=None):
    """(answer loss, aux loss, answer logits, their targets, their answer segments, image
    features): the vision tower runs once per image and its 64 tokens are spliced into
    every sequence about that image, as the runtime splices them at the <IMG_CONTEXT>
    positions."""
    features = model.model.get_image_features(
        pixel_values=batch.pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
    ).pooler_output  # (B, 64, hidden)
    aux = aux_head(features).split(AUX_SIZES, dim=-1)  # (B, 64, 1 + classes) per field
    aux_loss = sum(_cell_loss(logits, batch.cells[:, field]) for field, logits in enumerate(aux))
    if batch.input_ids.shape[0] == 0:  # a vision-only step
        return aux_loss.new_zeros(()), aux_loss, None, None, None, features
    if probe is not None:
        aux_loss = aux_loss + probe(features, batch.cells[:, 0])
    hidden = decode(model, features, batch)  # (N, T, hidden)
    if fact_head is not None:
        aux_loss = aux_loss + kind_fact_loss(fact_head, hidden, batch)
    targets = batch.labels[:, 1:]  # (N, T-1): position t predicts token t+1
    where = targets != -100
    logits = model.lm_head(hidden[:, :-1][where])  # (answer tokens, vocab)
    per_token = F.cross_entropy(logits, targets[where], reduction="none")
    loss = (per_token * batch.weights[:, 1:][where]).sum()
    return loss, aux_loss, logits, targets[where], batch.segments[:, 1:][where], features


def kind_fact_loss(fact_head, hidden, batch: Batch):
    """At a question's kind word, read off what the image says about that kind: trains the
    first hop of "is there a star?" (the word finds its shape) directly, instead of only
    through the answer two tokens later, which a model otherwise learns to guess from
    the number of shapes."""
    if batch.fact_rows.numel() == 0:
        return hidden.sum() * 0
    states = hidden[batch.fact_rows, batch.fact_at]  # (questions, hidden)
    logits = fact_head(states).split(QUESTION_FACT_SIZES, dim=-1)
    total = 0
    for field, scores in enumerate(logits):
        if (batch.facts[:, field] != -100).any():
            total = total + F.cross_entropy(scores, batch.facts[:, field], ignore_index=-100)
    return total


def decode(model, features, batch: Batch):
    """The decoder's last hidden states (N, T, hidden) over every sequence (zeros at padding
    and shared-prefix positions, which nothing reads). The prefix every sequence with an
    image shares (system message, user role, image) runs once per image with a KV cache,
    which each sequence's rest then continues from; the rests run in BUCKETS groups of
    similar length; sequences without an image or with several in two more."""
    from transformers import DynamicCache

    ids, lengths = batch.input_ids, batch.attention.sum(dim=1)  # (N, T), (N,)
    embed, lm = model.get_input_embeddings(), model.model.language_model
    image_id = model.config.image_token_id
    hidden = features.new_zeros((*ids.shape, features.shape[-1]))  # (N, T, hidden)
    start = batch.num_prefix if SHARED_PREFIX else 0
    image_rows = (batch.image_index >= 0).nonzero()[:, 0]
    prefix = None
    if start and image_rows.numel():
        head = ids[image_rows[:1], :start].expand(features.shape[0], start)  # (B, P)
        embeds = embed(head).masked_scatter((head == image_id).unsqueeze(-1), features)
        prefix = lm(inputs_embeds=embeds, use_cache=True).cache  # (B, kv heads, P, dim) per layer
    groups = [(rows, start if prefix is not None else 0) for rows in _buckets(image_rows, lengths, BUCKETS)]
    groups += [(rows, 0) for rows in _buckets((batch.image_index < 0).nonzero()[:, 0], lengths, 2)]
    for rows, offset in groups:
        if rows.numel() == 0:
            continue
        end = int(lengths[rows].max())
        suffix = ids[rows, offset:end]  # (R, S)
        embeds = embed(suffix)
        spots = (suffix == image_id).unsqueeze(-1)
        if spots.any():  # each row's images' tokens, in prompt order
            shown = torch.cat([features[batch.row_images[row]] for row in rows.tolist()])  # (images, 64, hidden)
            embeds = embeds.masked_scatter(spots, shown.to(embeds.dtype))
        cache = None
        if offset:
            pick = batch.image_index[rows]
            cache = DynamicCache([(layer.keys[pick], layer.values[pick]) for layer in prefix.layers])
        positions = torch.arange(offset, end)
        out = lm(inputs_embeds=embeds, attention_mask=batch.attention[rows, :end], cache=cache,
                 use_cache=cache is not None, position_ids=positions.expand(len(rows), -1), cache_position=positions)
        hidden[rows[:, None], positions[None, :]] = out.last_hidden_state
    return hidden


def _buckets(rows, lengths, count: int):
    """`rows` by length, cut into `count` groups of about the same size."""
    if rows.numel() == 0:
        return []
    order = rows[torch.sort(lengths[rows], stable=True).indices]
    return [group for group in torch.tensor_split(order, min(count, len(order))) if group.numel()]


def _cell_loss(logits, labels):
    """Mean cross-entropy over shape cells plus mean over background cells: shapes cover a
    few of the 64 cells, and an average over all cells would mostly teach "background"."""
    flat, labels = logits.flatten(0, 1), labels.flatten()  # (B*64, classes), (B*64,)
    shape, background = labels > 0, labels == 0
    loss = F.cross_entropy(flat[shape], labels[shape]) if shape.any() else flat.sum() * 0
    return loss + (F.cross_entropy(flat[background], labels[background]) if background.any() else 0)


def exact_segments(logits, targets, segments, count: int):
    """Per answer: is every token of it the argmax? With teacher forcing that is exactly
    "greedy decoding reproduces the answer", so one forward pass measures exact match."""
    wrong = (logits.argmax(-1) != targets).to(torch.long)
    errors = torch.zeros(count, dtype=torch.long).index_add_(0, segments, wrong)
    return errors == 0  # (answers,)


# ---- export ----------------------------------------------------------------------------

def export(model, tok, out: Path) -> None:
    """A normal HF checkpoint dir: bf16 safetensors, config.json with "template", tokenizer.json."""
    import copy

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
    # How the training images were resized (PIL bilinear, `scene_batch`): vlmd resizes frames the same way.
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- validation --------------------------------------------------------------------------

def validation_batch(template, phase: Phase, images: int) -> Batch:
    """Fixed scenes from their own seed range (not the training stream, not the held-out
    scenes tools/eval_demo_model.py draws)."""
    return demo_data.make_batch(np.random.default_rng(VALIDATION_SEED), random.Random(VALIDATION_SEED),
                                template, phase.mix, images)


def validate(model, aux_head, batch: Batch, kind_ids: list[int]) -> dict[str, float]:
    """Exact match per answer on the validation batch (greedy-equivalent): first-turn
    captions, questions and out-of-world replies, and later turns; plus the caption kind
    words and the aux head's kind per shape cell, where errors used to sit."""
    model.eval()
    with torch.no_grad():
        _, _, logits, targets, segments, features = forward(model, aux_head, batch)
        ok = exact_segments(logits, targets, segments, len(batch.segment_types))
        aux_kinds = aux_head(features)[..., : AUX_SIZES[0]].argmax(-1)  # (B, 64)
    model.train()
    types = batch.segment_types
    groups = {"captions": lambda t: t == "caption", "questions": lambda t: t in scenes.QUESTION_TYPES,
              "out of world": lambda t: t == "out of world", "later turns": lambda t: t.endswith(":later")}
    figures = {name: ok[torch.tensor([test(t) for t in types])].float().mean().item() for name, test in groups.items()}
    is_kind = torch.isin(targets, torch.tensor(kind_ids))
    shape_cells = batch.cells[:, 0] > 0
    figures["kind words"] = (logits.argmax(-1) == targets)[is_kind].float().mean().item()
    figures["aux kind cells"] = (aux_kinds == batch.cells[:, 0])[shape_cells].float().mean().item()
    return figures


# ---- the run -------------------------------------------------------------------------------

def train(args) -> None:
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
    template = chat_template(out)
    if args.init:
        model = InternVLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    else:
        model = InternVLForConditionalGeneration(model_config(tok)).float()
    # Reads each image token's shape kind, colour and place; only training uses it, and it is
    # not part of the exported checkpoint.
    aux_head = torch.nn.Linear(model.config.text_config.hidden_size, sum(AUX_SIZES))
    probe = WordProbe(model, tok)
    fact_head = torch.nn.Linear(model.config.text_config.hidden_size, sum(QUESTION_FACT_SIZES))
    params = [*model.parameters(), *aux_head.parameters(), *probe.parameters(), *fact_head.parameters()]
    print(f"params {sum(p.numel() for p in model.parameters()):,}; vocab {tok.get_vocab_size()}", flush=True)
    optimizer = torch.optim.AdamW(params, lr=phase.lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = [(phase.vision_images, False) if step < phase.vision_steps else (phase.images, True)
                for step in range(phase.steps)]
    batches = demo_data.BatchStream(phase.seed, template, phase.mix, schedule)
    check = validation_batch(template, phase, args.val_images) if args.val_every else None
    kind_ids = [tok.token_to_id("Ġ" + kind) for kind in scenes.KINDS]
    model.train()
    start, smoothed = time.time(), None
    for step, batch in zip(range(phase.steps), batches):
        lr = lr_at(step, phase.steps, phase.lr, phase.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
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
