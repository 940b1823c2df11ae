"""Shared fixtures. Area fixtures live in tests/fixtures_<area>.py, listed below."""

pytest_plugins = [
    "tests.fixtures_broker",
]
