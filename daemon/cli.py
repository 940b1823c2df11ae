"""`vlmd` command line: one subcommand per module in daemon/commands/.

Each command module defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so
`vlmd --help` stays fast and a broken optional dependency only breaks its command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under daemon.commands (the order is the order of `vlmd --help`)
COMMANDS: dict[str, str] = {
    "serve": "serve",
    "demo": "demo",
    "ask": "ask",
    "check-config": "check_config",
    "schema": "schema",
    "model": "model",
    "check": "check",
    "bench": "bench",
}


def _load(module_name: str):
    return importlib.import_module(f"daemon.commands.{module_name}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmd", description="Vision-language service over MQTT for AXERA NPUs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in COMMANDS.items():
        try:
            module = _load(module_name)
        except ModuleNotFoundError as exc:
            if not exc.name or not exc.name.startswith("daemon.commands"):
                raise
            continue  # command not built yet
        if wanted is not None and name != wanted:
            sub.add_parser(name, help=module.HELP, add_help=False)
            continue
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
