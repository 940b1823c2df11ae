"""Session-scoped tiny checkpoints (tests/model_factory.py), built once per test run.

Fixtures: `tiny_internvl_native`, `tiny_internvl_original` (same weights as native,
original InternVLChatModel names, sharded), `tiny_qwen2` (text-only). Each yields a
`tests.model_factory.TinyModel`; treat the directories as read-only.
"""

from __future__ import annotations

import pytest

from tests import model_factory


@pytest.fixture(scope="session")
def tiny_internvl_native(tmp_path_factory) -> model_factory.TinyModel:
    return model_factory.build_internvl_native(tmp_path_factory.mktemp("tiny_internvl_native"))


@pytest.fixture(scope="session")
def tiny_internvl_original(tmp_path_factory, tiny_internvl_native) -> model_factory.TinyModel:
    return model_factory.build_internvl_original(
        tmp_path_factory.mktemp("tiny_internvl_original"), model=tiny_internvl_native.torch_model
    )


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> model_factory.TinyModel:
    return model_factory.build_qwen2_text(tmp_path_factory.mktemp("tiny_qwen2"))
