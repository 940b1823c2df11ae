"""Conversations in the engine: later turns prefill only their own rows and answer exactly
as a full prefill of the whole conversation would; switching conversations restores the
right rows; old turns are dropped on overflow; every limit refuses naming itself."""

from __future__ import annotations

import numpy as np
import pytest

from npu.engine import Engine, GenerationOptions, Prompt, PromptTooLong
from npu.engine.conversation import ConversationError, ConversationLimit, ConversationLimits, ConversationNotYours
from tests.test_engine import image, make_model, run, tokenizer_and_template  # noqa: F401

QUESTIONS = ("What is in the picture?", "What colour is it?", "Where is it?", "Is it big?")


def converse(engine, conversation="c1", turns=3, max_tokens=4, ignore_stop=True, between=None):
    """Ask QUESTIONS[:turns] in one conversation (the picture in the first turn only)."""
    results = []
    for number, question in enumerate(QUESTIONS[:turns]):
        if between is not None and number:
            between(engine)
        images = [image(5)] if number == 0 else []
        prompt = Prompt(question, images=images, image_key="cam:1" if images else None, conversation=conversation)
        results.append(run(engine, prompt, max_tokens=max_tokens, ignore_stop=ignore_stop))
    return results


def unrelated(engine):
    run(engine, Prompt("Something else entirely."), max_tokens=2)


@pytest.mark.parametrize("ignore_stop", [True, False])
def test_later_turns_prefill_only_their_rows_and_match_a_full_prefill(make_model, ignore_stop):
    model = make_model()
    warm = converse(Engine(model), ignore_stop=ignore_stop)
    # Cold: the snapshot is dropped between turns (no memory for it), so each later turn
    # prefills the whole conversation again, from its ids and stored image features.
    cold_model = make_model()
    cold_engine = Engine(cold_model, conversation_limits=ConversationLimits(max_bytes=1))
    cold = converse(cold_engine, ignore_stop=ignore_stop, between=unrelated)
    assert [tokens for tokens, _ in warm] == [tokens for tokens, _ in cold]
    assert model.vision.calls == cold_model.vision.calls == 1  # stored features, no second vision run
    for number, ((_, done), (_, cold_done)) in enumerate(zip(warm, cold)):
        assert done.extra["conversation"] == "c1" and done.extra["turn"] == number + 1
        assert done.prompt_tokens == cold_done.prompt_tokens  # the whole history counts
        if number:
            previous = warm[number - 1][1]
            cached = previous.prompt_tokens + previous.completion_tokens - (previous.finish_reason == "length")
            assert done.timings["history_rows"] == cached and done.timings["images_encoded"] == 0
            assert done.timings["prefill_rows"] == done.prompt_tokens - cached  # only its own rows
            assert cold_done.timings["prefill_rows"] == cold_done.prompt_tokens  # everything again
    assert cold_engine.conversations.stats()["snapshots_evicted"] == 2
    np.testing.assert_allclose(np.stack(model.post.seen), np.stack(_without_unrelated(cold_model, cold)),
                               rtol=1e-4, atol=1e-4)


def _without_unrelated(cold_model, cold):
    """The cold run's logits with those of the unrelated prompts (2 calls each) left out."""
    seen, rows, position = cold_model.post.seen, [], 0
    for number, (tokens, done) in enumerate(cold):
        if number:
            position += 2
        calls = len(tokens) + (done.finish_reason == "stop")
        rows += seen[position:position + calls]
        position += calls
    return rows


def test_the_conversation_rows_are_the_template_history_with_answers_as_generated(make_model):
    engine = Engine(make_model())
    (first, _), (second, _) = converse(engine, turns=2, ignore_stop=False, max_tokens=3)
    template, tokenizer = engine.model.template, engine.model.tokenizer
    expected = template.encode_prompt(QUESTIONS[0], 1, engine.shapes.image_tokens).ids + first
    expected += tokenizer.encode("<|im_end|><|im_start|>user\n") + tokenizer.encode(QUESTIONS[1], parse_special=False)
    expected += tokenizer.encode("<|im_end|><|im_start|>assistant\n") + second
    assert engine.conversations.get("c1").ids == expected


def test_switching_conversations_restores_the_right_prefix(make_model):
    alone = converse(Engine(make_model()), "c1", turns=3)
    engine = Engine(make_model())
    mixed = []
    for number in range(3):
        mixed.append(converse_turn(engine, "c1", number))
        converse_turn(engine, "c2", number, picture=9)
        if number == 1:
            unrelated(engine)
    assert [tokens for tokens, _ in mixed] == [tokens for tokens, _ in alone]
    stats = engine.conversations.stats()
    assert stats["active"] == 2 and stats["parked"] == 1 and stats["bytes"] > 0 and stats["snapshots_evicted"] == 0
    assert mixed[2][1].timings["prefill_rows"] == alone[2][1].timings["prefill_rows"]


def converse_turn(engine, conversation, number, picture=5):
    images = [image(picture)] if number == 0 else []
    prompt = Prompt(QUESTIONS[number], images=images, image_key=f"cam:{picture}" if images else None,
                    conversation=conversation)
    return run(engine, prompt, max_tokens=4, ignore_stop=True)


def test_the_oldest_turns_are_dropped_when_the_cache_would_overflow(make_model):
    engine = Engine(make_model(capacity=120), conversation_limits=ConversationLimits(answer_room=8))
    long_question = "Tell me everything about the colours and the shapes you can see there. "
    dropped = None
    for number in range(8):
        images = [image(5)] if number == 0 else []
        prompt = Prompt(long_question + str(number), images=images, image_key="cam:1" if images else None,
                        conversation="c1")
        _, done = run(engine, prompt, max_tokens=8, ignore_stop=True)
        assert done.prompt_tokens + 8 <= 120 and done.extra["turn"] == number + 1
        if done.extra.get("dropped_turns"):
            dropped = done
            break
    assert dropped is not None, "the conversation never overflowed"
    assert any("oldest" in note and "dropped" in note for note in dropped.extra["notes"])
    assert dropped.timings["prefill_rows"] == dropped.prompt_tokens  # the rest prefilled again
    conversation = engine.conversations.get("c1")
    assert conversation.num_turns == dropped.extra["turn"]
    assert len(conversation.turns) == conversation.num_turns - dropped.extra["dropped_turns"]
    assert conversation.ids[:len(engine.model.tokenizer.encode("<|im_start|>system\n"))] == \
        engine.model.tokenizer.encode("<|im_start|>system\n")  # the kept turns start with the system turn again


def test_limits_refuse_naming_the_limit(make_model):
    clock = [0.0]
    limits = ConversationLimits(max_conversations=2, max_turns=2, idle_s=60)
    engine = Engine(make_model(), conversation_limits=limits, clock=lambda: clock[0])
    converse(engine, "a", turns=2)
    converse(engine, "b", turns=1)
    with pytest.raises(ConversationLimit, match="max_conversations"):
        converse(engine, "c", turns=1)
    with pytest.raises(ConversationLimit, match="max_turns"):
        run(engine, Prompt("Again?", conversation="a"), max_tokens=2)
    with pytest.raises(ConversationError, match="system: a conversation keeps the system prompt"):
        run(engine, Prompt("Again?", conversation="b", system="You are terse."), max_tokens=2)
    assert engine.forget_conversation("a") and not engine.forget_conversation("a")
    converse(engine, "c", turns=1)  # room again after the reset
    clock[0] = 61.0  # b and c have been idle for longer than idle_s
    _, done = run(engine, Prompt("Hello again.", conversation="b"), max_tokens=2)
    assert done.extra["turn"] == 1 and any("idle_s" in note for note in done.extra["notes"])
    assert engine.conversations.stats()["forgotten"] == 2


def test_a_conversation_token_limit_below_the_cache_drops_turns_or_refuses(make_model):
    engine = Engine(make_model(), conversation_limits=ConversationLimits(max_tokens=100, answer_room=4))
    with pytest.raises(PromptTooLong, match="may fill only 100 rows"):
        run(engine, Prompt("x " * 80, conversation="c1"), max_tokens=2)
    _, first = run(engine, Prompt("First question here.", conversation="c1"), max_tokens=4, ignore_stop=True)
    _, second = run(engine, Prompt("y " * 45, conversation="c1"), max_tokens=4, ignore_stop=True)
    assert second.prompt_tokens + 4 <= 100 < first.prompt_tokens + 4 + second.prompt_tokens
    assert second.extra["dropped_turns"] == 1 and second.extra["turn"] == 2
    assert any("all 1 earlier turn(s) were dropped" in note for note in second.extra["notes"])


def test_a_cancelled_turn_is_not_recorded(make_model):
    reference = converse(Engine(make_model()), turns=2)
    engine = Engine(make_model())
    converse(engine, turns=1)
    calls = iter(range(1000))
    prompt = Prompt("An interrupted question.", conversation="c1")
    events = list(engine.generate(prompt, GenerationOptions(max_tokens=8), should_stop=lambda: next(calls) > 3))
    assert events[-1].finish_reason == "cancelled" and events[-1].extra["turn"] == 2
    assert engine.conversations.get("c1").num_turns == 1
    tokens, done = run(engine, Prompt(QUESTIONS[1], conversation="c1"), max_tokens=4, ignore_stop=True)
    assert tokens == reference[1][0] and done.extra["turn"] == 2
    assert done.timings["history_rows"] == reference[1][1].timings["history_rows"]


def test_a_typed_turn_in_a_conversation_keeps_the_rows_consistent(make_model):
    """A typed answer ends without running the layers for its last token; the next turn
    prefills that row, and answers as a full prefill would."""
    from protocol.formats import parse_format

    boolean = parse_format({"type": "boolean"})

    def talk(engine, between=None):
        results = [run(engine, Prompt(QUESTIONS[0], images=[image(5)], image_key="cam:1", conversation="c1"),
                       max_tokens=4, ignore_stop=True)]
        if between:
            between(engine)
        results.append(run(engine, Prompt("Is it red?", conversation="c1"), max_tokens=8, format=boolean))
        if between:
            between(engine)
        results.append(run(engine, Prompt(QUESTIONS[2], conversation="c1"), max_tokens=4, ignore_stop=True))
        return results

    warm = talk(Engine(make_model()))
    cold = talk(Engine(make_model(), conversation_limits=ConversationLimits(max_bytes=1)), between=unrelated)
    assert [tokens for tokens, _ in warm] == [tokens for tokens, _ in cold]
    typed, last = warm[1][1], warm[2][1]
    assert isinstance(typed.extra["value"], bool) and typed.extra["turn"] == 2
    cached = typed.prompt_tokens + typed.completion_tokens - 1  # the answer's last token never went through the layers
    assert last.timings["history_rows"] == cached and last.timings["prefill_rows"] == last.prompt_tokens - cached


def test_a_later_turn_may_bring_an_image_of_its_own(make_model):
    def talk(engine, between=None):
        out = [run(engine, Prompt(QUESTIONS[0], images=[image(5)], image_key="cam:1", conversation="c1"),
                   max_tokens=3, ignore_stop=True)]
        for number, images in ((1, [image(8)]), (2, [])):
            if between:
                between(engine)
            out.append(run(engine, Prompt(QUESTIONS[number], images=images, conversation="c1"), max_tokens=3,
                           ignore_stop=True))
        return out

    model, cold_model = make_model(), make_model()
    warm = talk(Engine(model))
    cold = talk(Engine(cold_model, conversation_limits=ConversationLimits(max_bytes=1)), between=unrelated)
    assert [tokens for tokens, _ in warm] == [tokens for tokens, _ in cold]
    assert warm[1][1].timings["images_encoded"] == 1 and warm[2][1].timings["images_encoded"] == 0
    assert model.vision.calls == cold_model.vision.calls == 2  # each image once; stored features after that
    assert warm[1][1].prompt_tokens - warm[0][1].prompt_tokens > engine_image_tokens(model)


def engine_image_tokens(model) -> int:
    return Engine(model).shapes.image_tokens


def test_a_conversation_answers_only_the_owner_that_opened_it(make_model):
    """#21.3: another owner's turn or reset is refused (nothing changes), and one owner
    cannot take every slot."""
    limits = ConversationLimits(max_conversations=4, max_per_owner=2)
    engine = Engine(make_model(), conversation_limits=limits)
    first = Prompt(QUESTIONS[0], images=[image(5)], image_key="cam:1", conversation="c1", conversation_owner="clients/A")
    run(engine, first, max_tokens=2)
    with pytest.raises(ConversationNotYours, match="another client"):
        run(engine, Prompt("What colour is it?", conversation="c1", conversation_owner="clients/B"), max_tokens=2)
    with pytest.raises(ConversationNotYours):
        engine.forget_conversation("c1", owner="clients/B")
    _, done = run(engine, Prompt("What colour is it?", conversation="c1", conversation_owner="clients/A"), max_tokens=2)
    assert done.extra["turn"] == 2, "B's attempts changed nothing"
    run(engine, Prompt("Hi.", conversation="c2", conversation_owner="clients/A"), max_tokens=2)
    with pytest.raises(ConversationLimit, match="max_per_client"):
        run(engine, Prompt("Hi.", conversation="c3", conversation_owner="clients/A"), max_tokens=2)
    run(engine, Prompt("Hi.", conversation="c3", conversation_owner="clients/B"), max_tokens=2)  # B still has room
    assert engine.forget_conversation("c1", owner="clients/A")
