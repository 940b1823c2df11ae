"""`vlmd check-config [FILE]`: validate a config and show the effective one.

Exit status: 0 when valid (the effective config is printed as TOML on stdout, secrets
redacted), 78 (EX_CONFIG) when not (every problem on stderr, one per line, with its
file:line, environment variable or flag, and key path).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HELP = "validate a config file (and VLMD_ variables); print the effective config, secrets redacted"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", type=Path, metavar="FILE", help="TOML config file (default: none, defaults + environment)")
    parser.add_argument("--broker", help="as `vlmd serve --broker`: mqtt://host:port overrides mqtt.broker")
    parser.add_argument("--device-id", help="as `vlmd serve --device-id`")
    parser.add_argument("--model", help="as `vlmd serve --model`: model directory")
    parser.add_argument("--precision", help="as `vlmd serve --precision`: bf16 or fp32")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when the config is valid")


def run(args: argparse.Namespace) -> int:
    from daemon.config import EX_CONFIG, ConfigError, cli_overrides, ignored_env_names, load_config, redacted_dict
    from daemon.config.toml_text import dump_toml

    overrides = cli_overrides(broker=args.broker, device_id=args.device_id, model=args.model, precision=args.precision)
    try:
        config = load_config(args.config, os.environ, overrides)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
        count = len(exc.issues)
        print(f"{args.config or 'config'}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
        return EX_CONFIG
    for name in ignored_env_names(os.environ):
        print(f"note: {name} is not a config key; ignored", file=sys.stderr)
    if not args.quiet:
        source = args.config or "defaults"
        print(f"# effective vlmd config from {source} + VLMD_ environment + flags (secrets redacted)")
        print(dump_toml(redacted_dict(config)), end="")
    return 0
