"""`vlmd model`: explain a model directory, or export a checkpoint's embeddings for the board."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "inspect a model directory (graphs, shapes, template, problems) or export board embeddings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = actions.add_parser(
        "inspect", help="print graphs, groups, shapes, dtypes, KV capacity, prefill chunk, image tokens,"
        " template, special ids and every missing or inconsistent piece; exit 1 if any")
    inspect.add_argument("path", metavar="DIR", nargs="?", default=None,
                         help="model directory (HF checkpoint, llm_build output, M5Stack package or an M5Stack"
                         " mode_*.json, or a directory with vlmd.toml); default: the demo model shipped with vlmd")
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    inspect.add_argument("--provider", default="auto", help="axengine provider: auto, axengine, axclrt")
    inspect.add_argument("--device-id", type=int, default=0, help="AXCL card index (PCIe provider only)")
    inspect.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                         help="reference graphs' precision when DIR is a Hugging Face checkpoint")
    inspect.add_argument("--data-path", choices=("auto", "zero-copy", "public"), default="auto",
                         help="board data path to check (auto: zero-copy if it proves itself, else public)")
    export = actions.add_parser(
        "export-embeddings", help="write model.embed_tokens.weight.bfloat16.bin (raw bf16 [vocab, hidden])")
    export.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="Hugging Face checkpoint directory")
    export.add_argument("out", metavar="OUT_FILE", help="output file, e.g. model.embed_tokens.weight.bfloat16.bin")


def run(args: argparse.Namespace) -> int:
    if args.action == "export-embeddings":
        return _export(args)
    return _inspect(args)


def _inspect(args: argparse.Namespace) -> int:
    from npu.inspect import format_report, inspect_model
    from npu.board.layout import LayoutError

    from npu.model import DEMO_MODEL_DIR, ModelError

    try:
        report = inspect_model(args.path or DEMO_MODEL_DIR, provider=args.provider, device_id=args.device_id,
                               precision=args.precision, data_path=args.data_path)
    except (LayoutError, ModelError) as exc:
        print(f"vlmd model inspect: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, default=str) if args.json else format_report(report))
    return 1 if report["problems"] else 0


def _export(args: argparse.Namespace) -> int:
    from npu.embeddings import export_embeddings

    try:
        result = export_embeddings(args.checkpoint, args.out)
    except (OSError, ValueError, KeyError) as exc:
        print(f"vlmd model export-embeddings: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}" + (f" ({result})" if result is not None else ""))
    return 0
