"""`vlmd ask`: one question (optionally about an image) answered on this machine, streamed.

The answer streams to stdout as it is generated. With `--json` a final line follows
with the same final message an MQTT client receives (text, finish_reason, usage,
timings; with `--format`, value and confidence). `--format '{"type":"boolean"}'` decodes
the answer to a JSON-Schema subset (docs/protocol.md, `format`), as `format` on MQTT
does. Errors go to stderr (and, with --json, into that final line); the exit code
is 0 for an answer ("stop" or "length"), 1 when the engine refused or failed, 2 for a
bad model, image or option. The question and its options are checked by the same rules
(ranges, limits, messages) as a question on MQTT, with the daemon's default limits
(protocol.codec.validate_ask). `--data-path` chooses how a board model's graphs are fed,
as `vlmd bench`'s does (npu/board/data_path.py; a checkpoint has no data path to choose).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "answer one question (optionally about an image) with a local model and stream it"

MAX_IMAGE_BYTES = 64_000_000
MAX_IMAGE_PIXELS = 100_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", metavar="QUESTION", help="the question (quote it)")
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="model directory: Hugging Face InternVL2 checkpoint or board model (default: the demo model)")
    parser.add_argument("--image", metavar="FILE", action="append", default=[],
                        help="JPEG or PNG to ask about (repeat for several images)")
    parser.add_argument("--system", default=None, help="system prompt instead of the template's own")
    parser.add_argument("--max-tokens", type=int, default=256, metavar="N", help="answer length limit (default 256)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="0 = greedy (default: the package's sampling defaults, else greedy)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="nucleus sampling mass (1 = off; default: the package's)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample among the K best (0 = off; default: the package's)")
    parser.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                        help="1 = off (default: the package's)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (repeatable answers)")
    parser.add_argument("--backend", choices=("auto", "reference", "axengine"), default="auto",
                        help="reference = numpy graphs from a checkpoint; axengine = the NPU (default: by model)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="reference backend: bf16 = the board's dtypes, fp32 = transformers' numbers")
    parser.add_argument("--provider", default="auto", help="axengine provider: auto, axengine, axclrt")
    parser.add_argument("--data-path", choices=("auto", "zero-copy", "public"), default="auto",
                        help="board data path (auto: zero-copy if it proves itself at load, else public)")
    parser.add_argument("--kv-capacity", type=int, default=1023, metavar="N", help="reference backend: KV cache rows")
    parser.add_argument("--prefill-chunk", type=int, default=128, metavar="N",
                        help="reference backend: prefill rows per graph call")
    parser.add_argument("--history-groups", type=int, default=0, metavar="N",
                        help="reference backend: prefill groups with history (0 = classic build)")
    parser.add_argument("--format", metavar="SCHEMA", default=None,
                        help='typed answer: a JSON-Schema subset, e.g. \'{"type":"boolean"}\' or \'{"enum":["red","blue"]}\'')
    parser.add_argument("--resize", choices=("auto", "bicubic", "bilinear", "pil-bilinear"), default="auto",
                        help="frame resize: auto = as the checkpoint says (else bicubic, as InternVL was trained);"
                             " bilinear = the board runtimes' plain cv::resize")
    parser.add_argument("--json", action="store_true", help="end with the final message as one JSON line")


def run(args: argparse.Namespace) -> int:
    from npu.engine import EngineError, Engine, GenerationOptions, Prompt
    from npu.model import ModelError, load_model
    from protocol.codec import ProtocolError
    from protocol.frames import FrameError, decode_frame

    try:
        request = checked_request(args)
    except ProtocolError as exc:
        return _fail(args, exc.code, exc.message, 2)
    try:
        images = [decode_frame(Path(p).read_bytes(), MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS) for p in args.image]
        model = load_model(args.model, backend=args.backend, precision=args.precision, kv_capacity=args.kv_capacity,
                           prefill_chunk=args.prefill_chunk, history_groups=args.history_groups,
                           provider=args.provider, data_path=args.data_path,
                           resize=None if args.resize == "auto" else args.resize)
        given = {name: getattr(request, name) for name in ("temperature", "top_k", "top_p", "repetition_penalty")
                 if name in request.model_fields_set}  # the package's defaults stand in for the rest
        sampling = {**model.sampling_defaults, **given}
        options = GenerationOptions(max_tokens=request.max_tokens or args.max_tokens, seed=request.seed,
                                    format=request.format, **sampling)
        engine = Engine(model)
    except FrameError as exc:
        return _fail(args, exc.code, exc.message, 2)
    except (ModelError, ValueError, OSError) as exc:
        return _fail(args, "bad_request", str(exc), 2)
    prompt = Prompt(text=request.text, images=images, image_key=None, system=request.system)
    try:
        for event in engine.generate(prompt, options):
            if hasattr(event, "delta"):
                sys.stdout.write(event.delta)
                sys.stdout.flush()
            else:
                done = event
    except EngineError as exc:
        return _fail(args, exc.code, exc.message, 1)
    sys.stdout.write("\n")
    if args.json:
        print(json.dumps(_final(done.text, done.finish_reason, None, done.prompt_tokens,
                                done.completion_tokens, done.timings, done.extra), ensure_ascii=False))
    return 0 if done.finish_reason in ("stop", "length") else 1


def checked_request(args: argparse.Namespace):
    """The question and its options checked by the rules an MQTT question meets (same
    ranges, same messages), with the daemon's default limits; raises ProtocolError."""
    from daemon.config import RequestsConfig
    from protocol.codec import ProtocolError, validate_ask
    from protocol.payloads import AskLimits

    defaults = RequestsConfig()
    limits = AskLimits(max_text_chars=defaults.max_text_chars, max_tokens=defaults.max_tokens_limit)
    fields = {"text": args.question, "system": args.system, "max_tokens": args.max_tokens,
              "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
              "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    if args.format is not None:
        try:
            fields["format"] = json.loads(args.format)
        except ValueError as exc:
            raise ProtocolError("bad_request", f"format: --format is not JSON: {exc}") from None
    return validate_ask({name: value for name, value in fields.items() if value is not None}, limits)


def _final(text: str, finish_reason: str, error: dict | None, prompt_tokens: int, completion_tokens: int,
           timings: dict, extra: dict | None = None) -> dict:
    """The wire's final answer message (protocol.payloads.AnswerFinal), id "cli"."""
    from protocol.payloads import AnswerFinal

    message = AnswerFinal(id="cli", seq=0, text=text, finish_reason=finish_reason, error=error,
                          usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
                          timings=timings, **(extra or {}))
    return message.model_dump(mode="json")


def _fail(args: argparse.Namespace, code: str, message: str, exit_code: int) -> int:
    print(f"vlmd ask: {message}", file=sys.stderr)
    if args.json:
        reason = "rejected" if code in ("too_long", "bad_image", "image_too_large", "bad_request") else "failed"
        print(json.dumps(_final("", reason, {"code": code, "message": message}, 0, 0, {}), ensure_ascii=False))
    return exit_code
