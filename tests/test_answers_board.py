"""Conversations and typed answers on the board's zero-copy data path (the strict axengine
stand-in, and AXERA's pyaxengine over the fake board libraries), where the KV cache is the layers' device buffers: parking, restoring, rewinding
and the typed answers' skipped graph calls must leave exactly the reference's tokens."""

from __future__ import annotations

from npu.engine import Engine, GenerationOptions, Prompt, TokenEvent
from npu.model import load_model
from protocol.formats import parse_format
from tests.test_zero_copy import axera_board_dir, demo_dirs, random_image, reference_model  # noqa: F401

COUNT = parse_format({"type": "integer", "minimum": 0, "maximum": 9})
BOOLEAN = parse_format({"type": "boolean"})


def talk(engine: Engine) -> list:
    """Two conversations interleaved (each switch parks one and restores the other), a
    cancelled turn (the cache rewound), typed turns, and a question on its own between."""
    asked = []

    def ask(text, conversation, images=(), options=GenerationOptions(max_tokens=32), stop=None):
        prompt = Prompt(text, images=list(images), image_key=f"cam:{len(asked)}" if images else None,
                        conversation=conversation)
        events = list(engine.generate(prompt, options, should_stop=stop))
        asked.append(([e.token_id for e in events if isinstance(e, TokenEvent)], events[-1].finish_reason,
                      events[-1].extra.get("value"), events[-1].timings.get("prefill_rows"),
                      events[-1].extra.get("dropped_turns")))

    ask("Describe the image shortly.", "a", [random_image(11)])
    ask("Describe the image shortly.", "b", [random_image(12)])
    ask("How many shapes are there?", "a", options=GenerationOptions(max_tokens=8, format=COUNT))
    calls = iter(range(1000))
    ask("Is there a circle?", "b", stop=lambda: next(calls) > 5)  # cancelled during its prefill
    ask("Is there a circle?", "b", options=GenerationOptions(max_tokens=8, format=BOOLEAN))
    ask("What colour is the square?", None, [random_image(13)])
    ask("Is there a star?", "a")
    return asked


def test_conversations_and_typed_answers_on_the_zero_copy_path_equal_the_reference(
        board_axengine, axera_board_dir, reference_model):
    board = load_model(board_axengine.dir(axera_board_dir), backend="axengine")
    assert board.data_path.name == "zero-copy"
    on_board, reference = talk(Engine(board)), talk(Engine(reference_model))
    assert on_board == reference
    assert [answer[1] for answer in on_board] == ["stop", "stop", "stop", "cancelled", "stop", "stop", "stop"]
    assert isinstance(on_board[2][2], int) and isinstance(on_board[4][2], bool)
    assert on_board[4][3] < 30  # b's typed turn after the cancelled one: only its own rows, after switches
    # the board build's cache holds 159 rows: a's third turn drops its first (the picture) and
    # prefills the rest again, on the device buffers as on the host
    assert on_board[6][4] == 1
