"""Shared fixtures. Area fixtures live in tests/fixtures_<area>.py, listed below."""

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_broker",
    "tests.fixtures_board",
    "tests.fixtures_tokenizer",
    "tests.fixtures_daemon",
]
