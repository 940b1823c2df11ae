"""Top-1 agreement of the bf16 reference graphs with fp32, teacher-forced over many steps.

The fp32 engine samples a varied answer (temperature 1, seeded; greedy answers of a
random-weight model repeat one token) while its post graph records the fp32 argmax at
every step. The bf16 engine is then forced along exactly the same tokens (its post
graph output is wrapped so the forced token wins the engine's greedy choice) and
records the bf16 argmax. Agreement = the fraction of steps where the two argmaxes are
equal: how often the board's dtypes would pick fp32's greedy token on the same context.

    python bench/bf16_agreement.py [--model HF_DIR] [--steps 300] [--no-image]

Without --model it builds bench/common.py's tiny random checkpoint (`Dims.tiny()`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py: the tiny checkpoint)
import numpy as np  # noqa: E402

from npu.engine import Engine, GenerationOptions, Prompt, TokenEvent  # noqa: E402
from npu.model import load_model  # noqa: E402

QUESTION = "Describe this picture in as much detail as you can."


class ArgmaxRecorder:
    """Wraps a post session: records each step's argmax; with `forced`, makes forced[i] win step i."""

    def __init__(self, post, forced: list[int] | None = None):
        self.post, self.name, self.num_groups = post, post.name, post.num_groups
        self.forced = forced
        self.argmax: list[int] = []

    def inputs(self, group=0):
        return self.post.inputs(group)

    def outputs(self, group=0):
        return self.post.outputs(group)

    def run(self, feed, group=0):
        outputs = self.post.run(feed, group)
        logits = outputs[0]
        self.argmax.append(int(np.argmax(logits.reshape(-1).astype(np.float32))))
        if self.forced is None:
            return outputs
        steered = logits.copy()  # (1, 1, vocab) never write into the session's buffer
        steered.reshape(-1)[self.forced[len(self.argmax) - 1]] = 1.0e4
        return [steered, *outputs[1:]]


def run_engine(model_dir: Path, precision: str, prompt: Prompt, steps: int, capacity: int,
               forced: list[int] | None) -> tuple[list[int], list[int]]:
    model = load_model(model_dir, backend="reference", precision=precision, kv_capacity=capacity)
    model.post = recorder = ArgmaxRecorder(model.post, forced)
    options = (GenerationOptions(max_tokens=steps, ignore_stop=True) if forced is not None else
               GenerationOptions(max_tokens=steps, ignore_stop=True, temperature=1.0, seed=0))
    tokens = [e.token_id for e in Engine(model).generate(prompt, options) if isinstance(e, TokenEvent)]
    return tokens, recorder.argmax


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="Hugging Face checkpoint (default: tiny random)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-image", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or common.build_tiny_checkpoint(Path(scratch) / "tiny")
        rng = np.random.default_rng(0)
        images = [] if args.no_image else [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)]
        prompt = Prompt(QUESTION, images=images)
        capacity = 1023
        sampled, fp32_argmax = run_engine(model_dir, "fp32", prompt, args.steps, capacity, None)
        forced, bf16_argmax = run_engine(model_dir, "bf16", prompt, len(sampled), capacity, sampled)
        assert forced == sampled, "teacher forcing failed"
    n = min(len(fp32_argmax), len(bf16_argmax))
    agree = np.mean(np.asarray(fp32_argmax[:n]) == np.asarray(bf16_argmax[:n]))
    result = {"steps": n, "top1_agreement": round(float(agree), 4), "distinct_context_tokens": len(set(sampled)),
              "distinct_fp32_argmax": len(set(fp32_argmax[:n])), "image": not args.no_image}
    print(f"bf16 vs fp32 top-1 agreement: {agree:.1%} over {n} teacher-forced steps"
          f" ({result['distinct_fp32_argmax']} distinct fp32 argmax tokens)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
