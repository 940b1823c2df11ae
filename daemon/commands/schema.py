"""`vlmd schema`: write the JSON Schema of every payload model, one file each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "write the JSON Schema of every MQTT payload (default: docs/schema/)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("docs/schema"), help="directory to write into")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if any file is missing or out of date"
    )


def render_schemas() -> dict[str, str]:
    """{file name: file text} for every payload model; the text is stable across runs."""
    from protocol.schemas import json_schemas

    return {
        f"{name}.json": json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
        for name, schema in json_schemas().items()
    }


def outdated(out: Path) -> list[str]:
    """File names under `out` that are missing or differ from what `vlmd schema` writes."""
    stale = []
    for name, text in render_schemas().items():
        path = out / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if args.check:
        stale = outdated(out)
        for name in stale:
            print(f"out of date: {out / name}", file=sys.stderr)
        if stale:
            print("run `vlmd schema` to regenerate", file=sys.stderr)
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render_schemas().items():
        (out / name).write_text(text, encoding="utf-8")
        print(out / name)
    return 0
