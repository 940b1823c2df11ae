"""Held-out accuracy of the demo model on freshly drawn scenes.

    python tools/eval_demo_model.py [--model DIR] [--scenes 200] [--seed 9000000]
                                    [--backend ask|cli|engine|transformers] [--swap-rb]

For every scene (drawn with daemon/scenes.py from seeds the training never uses) it asks
for a caption with the demo's prompt and up to four questions, one of each kind (count,
presence, colour, place), and compares answers exactly. It also reports how often the
caption is right apart from the shape kinds (every colour, place and the count): the
part of the caption that colour-order, resize and splice bugs break.

Backends:
- `ask` (default): `vlmd ask --model DIR --image F.png --json Q` for every question, run
  in this process (`daemon.cli.main`, stdout captured): the public command's whole path,
  PNG file decoding included, without 1000 interpreter starts;
- `cli`: the same command as a subprocess per question (slow; use a small `--scenes`);
- `engine`: npu's Python API (`load_model` + `Engine`, greedy) on the decoded array;
- `transformers`: InternVLForConditionalGeneration.generate on the checkpoint (dev extra;
  a cross-check of the checkpoint itself, not of vlmd's pipeline).

`--swap-rb` feeds BGR instead of RGB, to show the captions depend on colour order.
Prints one line per failure and a JSON summary; exits 1 below --min-accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon import scenes  # noqa: E402

DEFAULT_MODEL = REPO / "npu" / "assets" / "demo_model"
CAPTION_PROMPT = "Describe the image shortly."
HELD_OUT_SEED = 9_000_000  # training draws from one numpy stream seeded 1234; never these
MAX_TOKENS = 40


def engine_asker(model_dir: Path, precision: str):
    """ask(rgb uint8 HWC, question) -> text through npu's engine, greedy."""
    from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt
    from npu.model import load_model

    engine = Engine(load_model(str(model_dir), backend="reference", precision=precision))
    options = GenerationOptions(max_tokens=MAX_TOKENS, temperature=0.0)

    def ask(rgb: np.ndarray, question: str, image_key: str) -> str:
        prompt = Prompt(text=question, images=[rgb], image_key=image_key)
        events = list(engine.generate(prompt, options))
        assert isinstance(events[-1], DoneEvent)
        return events[-1].text

    return ask


def _ask_command(model_dir: Path, precision: str, png: Path, question: str) -> list[str]:
    return ["ask", "--model", str(model_dir), "--image", str(png), "--precision", precision,
            "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--json", question]


def _png_for(folder: Path, rgb: np.ndarray, image_key: str) -> Path:
    from PIL import Image

    path = folder / f"{image_key.replace(':', '_')}.png"
    if not path.exists():
        Image.fromarray(rgb).save(path)
    return path


def ask_asker(model_dir: Path, precision: str):
    """ask(...) through `vlmd ask --json` in this process: the final JSON line's "text"."""
    import contextlib
    import io

    from daemon.cli import main as vlmd

    folder = Path(tempfile.mkdtemp(prefix="vlmd-eval-"))

    def ask(rgb: np.ndarray, question: str, image_key: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = vlmd(_ask_command(model_dir, precision, _png_for(folder, rgb, image_key), question))
        final = json.loads(out.getvalue().strip().splitlines()[-1])
        if code != 0:
            raise RuntimeError(f"vlmd ask exited {code}: {final}")
        return final["text"]

    return ask


def cli_asker(model_dir: Path, precision: str):
    """ask(...) through a `vlmd ask --json` process: the final JSON line's "text"."""
    folder = Path(tempfile.mkdtemp(prefix="vlmd-eval-"))

    def ask(rgb: np.ndarray, question: str, image_key: str) -> str:
        command = ["vlmd", *_ask_command(model_dir, precision, _png_for(folder, rgb, image_key), question)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])["text"]

    return ask


def transformers_asker(model_dir: Path, precision: str):
    """ask(...) with transformers' generate; preprocessing as in tools/train_demo_model.py."""
    import torch
    from PIL import Image
    from tokenizers import Tokenizer
    from transformers import InternVLForConditionalGeneration

    sys.path.insert(0, str(REPO / "tools"))
    import train_demo_model as training

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = InternVLForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype).eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    im_end = tok.token_to_id("<|im_end|>")

    @torch.no_grad()
    def ask(rgb: np.ndarray, question: str, image_key: str) -> str:
        pixels = training.pixel_values([Image.fromarray(rgb)]).to(dtype)
        ids = torch.tensor([tok.encode(training.render_prompt(question)).ids])
        out = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=im_end,
                             pad_token_id=im_end)
        return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)

    return ask


BACKENDS = {"ask": ask_asker, "cli": cli_asker, "engine": engine_asker, "transformers": transformers_asker}


def pick_questions(scene: scenes.Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One question of each type the scene has: count, presence, colour, place."""
    return [rng.choice(pairs) for pairs in scene.questions_by_type().values()]


def evaluate(ask, num_scenes: int, seed: int, swap_rb: bool = False, verbose: bool = True) -> dict:
    """Exact-match accuracy of captions and answers on `num_scenes` held-out scenes."""
    captions_ok = layouts_ok = answers_ok = answers_total = 0
    per_kind: dict[str, list[int]] = {}
    rng = random.Random(seed)
    start = time.time()
    for i in range(num_scenes):
        image, scene = scenes.draw_scene(seed + i)
        rgb = np.asarray(image)  # (H, W, 3) uint8
        if swap_rb:
            rgb = np.ascontiguousarray(rgb[:, :, ::-1])
        key = f"eval:{seed + i}"
        caption = ask(rgb, CAPTION_PROMPT, key)
        captions_ok += caption == scene.caption()
        layouts_ok += scenes.without_kinds(caption) == scenes.without_kinds(scene.caption())
        if verbose and caption != scene.caption():
            print(f"scene {seed + i} caption: got {caption!r}, want {scene.caption()!r}", flush=True)
        for question, answer in pick_questions(scene, rng):
            got = ask(rgb, question, key)
            kind = scenes.question_type(question)
            per_kind.setdefault(kind, [0, 0])[0] += got == answer
            per_kind[kind][1] += 1
            answers_ok += got == answer
            answers_total += 1
            if verbose and got != answer:
                print(f"scene {seed + i} {question!r}: got {got!r}, want {answer!r}", flush=True)
    return {
        "scenes": num_scenes,
        "caption_accuracy": captions_ok / num_scenes,
        "caption_colour_place_accuracy": layouts_ok / num_scenes,
        "answer_accuracy": answers_ok / max(1, answers_total),
        "answers": answers_total,
        "per_kind": {k: round(ok / n, 4) for k, (ok, n) in per_kind.items()},
        "seconds": round(time.time() - start, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="ask")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--swap-rb", action="store_true", help="feed BGR frames (expect failures)")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    ask = BACKENDS[args.backend](args.model, args.precision)
    summary = evaluate(ask, args.scenes, args.seed, args.swap_rb, verbose=not args.quiet)
    summary.update(backend=args.backend, precision=args.precision, swap_rb=args.swap_rb)
    print(json.dumps(summary), flush=True)
    good = min(summary["caption_accuracy"], summary["answer_accuracy"]) >= args.min_accuracy
    return 0 if good or args.swap_rb else 1


if __name__ == "__main__":
    raise SystemExit(main())
