"""Shared fixtures. Area fixtures live in tests/fixtures_<area>.py, listed below."""

import os
import shutil
import tempfile

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_broker",
    "tests.fixtures_board",
    "tests.fixtures_published",
    "tests.fixtures_tokenizer",
    "tests.fixtures_daemon",
    "tests.fixtures_tls",
]

_cache_dir: str | None = None


def pytest_configure(config):
    """Keep exported embedding caches out of the user's ~/.cache for the whole run."""
    global _cache_dir
    if "VLMD_CACHE_DIR" not in os.environ:
        _cache_dir = tempfile.mkdtemp(prefix="vlmd-test-cache-")
        os.environ["VLMD_CACHE_DIR"] = _cache_dir


def pytest_unconfigure(config):
    if _cache_dir is not None:
        shutil.rmtree(_cache_dir, ignore_errors=True)
        os.environ.pop("VLMD_CACHE_DIR", None)
