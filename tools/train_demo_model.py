"""Train the tiny demo InternVL2 shipped in npu/assets/demo_model/.

    python tools/train_demo_model.py [--out DIR] [--threads 1] [--batch 16]
    python tools/train_demo_model.py --init DIR --start-phase 1   # resume after phase 1

The model has InternVL2's exact architecture, only tiny: InternViT blocks (224x224,
patch 14), pixel shuffle 0.5 (64 image tokens, as in InternVL2-1B), the MLP projector
and Qwen2 decoder layers with grouped-query attention and tied embeddings. It learns to
caption and answer questions about the synthetic scenes of daemon/scenes.py, and
nothing else: it is a demonstration of the pipeline, not a general VLM.

The tokenizer is a byte-level BPE like Qwen2's (trained here on the prompt corpus, so
common words are single tokens) plus InternVL2's twelve added tokens, so the runtime
reads it through the same code paths as a real checkpoint. Prompts are rendered with
npu.tokenizer.ChatTemplate (Hermes-2, InternVL2-1B's Chinese system message) when that
module is importable, else with the identical rendering below.

Needs the dev extra (torch, transformers). Training follows RECIPE (four phases, 11100
steps of 16 scenes; about 108 minutes with 1 thread on a 2-core machine shared with other
jobs). Seeded: the tokenizer, the weights' init and every batch follow from the phase
seeds; CPU kernels with a fixed thread count are deterministic in practice. Scenes are
drawn fresh every step from one numpy stream per phase; tools/eval_demo_model.py draws
held-out scenes with `draw_scene(9_000_000 + i)`, which these streams never produce.
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
FRAME_SIZES = ((224, 224), (320, 240), (256, 192), (288, 288))


@dataclass(frozen=True)
class Phase:
    steps: int
    lr: float  # peak; linear warmup, then cosine down to 10 %
    warmup: int
    seed: int  # seeds the scene stream, the question picks and torch
    caption_share: float  # fraction of samples that are captions
    frame_sizes: tuple[tuple[int, int], ...]


# The recipe of the shipped model. Each later phase restarts the schedule with a fresh
# optimizer from the previous phase's bf16 weights (held-out exact captions after each
# phase: 25 %, 62 %, 75 %, 88 %). Phase 2 drops portrait frames and asks for more captions,
# whose every word binds to the image; phase 3 evens captions and questions again.
RECIPE = (
    Phase(3000, 2e-3, 150, 1234, 0.5, FRAME_SIZES + ((240, 320),)),
    Phase(3600, 1.5e-3, 50, 1235, 0.6, FRAME_SIZES),
    Phase(1500, 1e-3, 50, 1236, 0.5, FRAME_SIZES),
    # Phase 4 (H12): a longer, lower-LR fine-tune on more captions, whose shape-kind
    # words were the remaining errors after phase 3.
    Phase(3000, 6e-4, 50, 1237, 0.65, FRAME_SIZES),
)
# Tried after phase 4 and not kept: Phase(900, 4e-4, 50, 1238, 0.3, FRAME_SIZES), a short
# question-heavy phase, lowered both figures (exact captions 88 % -> 86.5 %, answers
# 76.5 % -> 73.8 %).


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
        from npu.template import ChatTemplate
        from npu.tokenizer import Tokenizer
    except ImportError:
        print("npu.template not importable: rendering Hermes-2 prompts here", flush=True)
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

def sample_pair(scene: scenes.Scene, rng: random.Random, caption_share: float) -> tuple[str, str]:
    """Mostly captions (they carry every binding), else a question of a random kind."""
    if rng.random() < caption_share:
        return rng.choice(scenes.CAPTION_PROMPTS), scene.caption()
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for question, answer in scene.questions():
        by_kind.setdefault(question.split()[0] + question.split()[1], []).append((question, answer))
    question, answer = rng.choice(rng.choice(list(by_kind.values())))
    return question_variants(question, rng), answer


def make_batch(np_rng, py_rng, tok, encode_prompt, im_end_id: int, pad_id: int, size: int, phase: Phase):
    """(pixel_values [B,3,224,224], input_ids [B,T], attention_mask [B,T], labels [B,T]);
    labels are -100 except on the answer and its closing <|im_end|>."""
    import torch

    images, rows, label_rows = [], [], []
    for _ in range(size):
        frame = phase.frame_sizes[py_rng.randrange(len(phase.frame_sizes))]
        image, scene = scenes.draw_scene(np_rng, size=frame)
        question, answer = sample_pair(scene, py_rng, phase.caption_share)
        prompt_ids = encode_prompt(question)
        answer_ids = tok.encode(answer).ids + [im_end_id]
        images.append(image)
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((size, length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((size, length), -100, dtype=torch.long)  # (B, T)
    attention = torch.zeros((size, length), dtype=torch.long)  # (B, T)
    for i, (row, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(row)] = 1
    return pixel_values(images), input_ids, attention, labels


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
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_phase(model, tok, encode_prompt, phase: Phase, args, out: Path, label: str) -> None:
    import torch

    torch.manual_seed(phase.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, betas=(0.9, 0.95), weight_decay=0.01)
    np_rng, py_rng = np.random.default_rng(phase.seed), random.Random(phase.seed)
    im_end, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    start, smoothed = time.time(), None
    for step in range(phase.steps):
        lr = lr_at(step, phase.steps, phase.lr, phase.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pixels, ids, attention, labels = make_batch(np_rng, py_rng, tok, encode_prompt, im_end, pad, args.batch, phase)
        loss = model(pixel_values=pixels, input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % 25 == 0 or step == phase.steps - 1:
            print(f"{label} step {step} loss {smoothed:.4f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        if args.export_every and step and step % args.export_every == 0:
            export(model, tok, out)
            if args.keep_checkpoints:  # numbered copies, to evaluate candidates later
                export(model, tok, out.parent / f"{out.name}-{label.replace(' ', '')}-step{step}")
    # Later phases start from the bf16 weights a checkpoint holds, as a resumed run would.
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    export(model, tok, out)
    print(f"{label}: {phase.steps} steps in {time.time() - start:.0f}s -> {out}", flush=True)


def train(args) -> None:
    import torch
    from transformers import InternVLForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(RECIPE[0].seed)
    tok = build_tokenizer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    encode_prompt = prompt_encoder(tok, out)
    if args.init:  # resume at --start-phase from an exported checkpoint
        model = InternVLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    else:
        model = InternVLForConditionalGeneration(model_config(tok)).float()
    print(f"params {sum(p.numel() for p in model.parameters()):,}; vocab {tok.get_vocab_size()}", flush=True)
    for index in range(args.start_phase, len(RECIPE)):
        run_phase(model, tok, encode_prompt, RECIPE[index], args, out, f"phase {index + 1}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest on a shared 2-core machine")
    parser.add_argument("--export-every", type=int, default=250, help="also write the checkpoint every N steps")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="also keep each periodic checkpoint as OUT-phaseN-stepS next to OUT")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--init", help="start from this exported checkpoint instead of random weights")
    parser.add_argument("--start-phase", type=int, default=0, help="0-based index into RECIPE (with --init)")
    args = parser.parse_args(argv)
    if args.start_phase and not args.init:
        parser.error("--start-phase needs --init (the checkpoint the earlier phases produced)")
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
