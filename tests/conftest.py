"""Shared fixtures. Area fixtures live in tests/fixtures_<area>.py, listed below."""

import os
import shutil
import tempfile

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_broker",
    "tests.fixtures_board",
    "tests.fixtures_published",
    "tests.fixtures_smolvlm",
    "tests.fixtures_tokenizer",
    "tests.fixtures_daemon",
    "tests.fixtures_tls",
]

_cache_dir: str | None = None
_state_dir: str | None = None


def pytest_configure(config):
    """Keep exported embedding caches out of ~/.cache and request journals out of
    ~/.local/state for the whole run (daemons started by tests, in-process or as
    subprocesses, inherit the environment)."""
    global _cache_dir, _state_dir
    if "VLMD_CACHE_DIR" not in os.environ:
        _cache_dir = tempfile.mkdtemp(prefix="vlmd-test-cache-")
        os.environ["VLMD_CACHE_DIR"] = _cache_dir
    _state_dir = tempfile.mkdtemp(prefix="vlmd-test-state-")
    os.environ["XDG_STATE_HOME"] = _state_dir
    os.environ.pop("RUNTIME_DIRECTORY", None)


def pytest_unconfigure(config):
    if _cache_dir is not None:
        shutil.rmtree(_cache_dir, ignore_errors=True)
        os.environ.pop("VLMD_CACHE_DIR", None)
    if _state_dir is not None:
        shutil.rmtree(_state_dir, ignore_errors=True)
        os.environ.pop("XDG_STATE_HOME", None)
