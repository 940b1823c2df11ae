"""`vlmd serve`: run the daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import sys

HELP = "run the vision-language service over MQTT (starts an embedded broker when none is configured)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (VLMD_* environment variables apply too)")
    parser.add_argument("--model", metavar="DIR", help="model directory (default: the demo model shipped with vlmd)")
    parser.add_argument("--broker", metavar="URL", help="mqtt://host:port or mqtts://host:port (default: embedded broker)")
    parser.add_argument("--device-id", metavar="ID", help="this board's id in topics and client id (default: <host name>-<MAC suffix>, unique per board)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="reference backend precision")
    parser.add_argument("--backend", choices=("auto", "reference", "axengine"), help="model runtime backend")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="least severe level logged")


def overrides_from(args: argparse.Namespace) -> dict:
    """CLI flags as a config overrides dict (only the flags that were given)."""
    from daemon.config import cli_overrides

    overrides = cli_overrides(
        broker=args.broker, device_id=args.device_id, model=args.model, precision=args.precision,
        log_level=args.log_level,
    )
    if args.backend is not None:
        overrides.setdefault("model", {})["backend"] = args.backend
    return overrides


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 clean stop, 78 (EX_CONFIG) config or model errors a restart cannot fix,
    1 runtime failures (daemon/lifecycle.py says which is which; it logs the cause)."""
    from daemon.config import EX_CONFIG, ConfigError, load_config
    from daemon.logs import configure_logging
    from daemon.lifecycle import main
    from protocol.topics import TopicError

    try:
        config = load_config(args.config, overrides=overrides_from(args))
    except ConfigError as exc:
        print("vlmd serve: invalid configuration:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EX_CONFIG
    configure_logging(config.logging.level, config.logging.format)
    try:
        # SIGHUP re-reads the same file, environment and flags
        return main(config, reload_config=lambda: load_config(args.config, overrides=overrides_from(args)))
    except TopicError as exc:  # a camera source topic or root the topic table cannot use
        print(f"vlmd serve: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
