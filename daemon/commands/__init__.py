"""One module per `vlmd` subcommand: each defines `add_arguments(parser)` and `run(args) -> int`."""
