"""Conversations: earlier turns stay in the KV cache, so a later turn prefills only its rows.

A conversation is a client-chosen id with its turns (question as asked, images, the
answer's GENERATED token ids: answers are never re-tokenised, so the cached rows stay
exactly what the model produced) and the KV rows of all of it. Its first turn is an
ordinary prompt (so it shares the image's prefix snapshot with captions and questions
on the same frame); every later turn appends, after the last answer, the rows the chat
template puts between an answer and the next question (`ChatTemplate.render_conversation`,
InternVL's history form), the question and the assistant role.

While a conversation's rows are in the cache it is *live*; before anything else changes
the cache they are *parked*: copied into a snapshot held here. The snapshots and the
turns' image features are bounded (`ConversationLimits.max_bytes`): over it the least
recently used snapshots are dropped first (that conversation is then re-prefilled from
its ids and stored features when it speaks next), then whole conversations.
Conversations idle for `idle_s` are forgotten. When a turn would not leave
`min(max_tokens, answer_room)` rows for its answer within `max_tokens` (default: the
cache), the oldest turns are dropped and the rest re-prefilled; the final says so.
Too many conversations or turns are refused (`ConversationLimit`, naming the limit).
Each conversation belongs to the owner that opened it (an opaque string the caller
passes: who asks, nothing more is known of it here): another owner's turn or reset is
refused (`ConversationNotYours`), and one owner may hold at most `max_per_owner`
conversations, so one client cannot take every slot.

Bookkeeping only: the engine (npu/engine/core.py) restores, prefills and decodes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from npu.engine.kv_cache import KVCache, KVSnapshot
from npu.engine.prompt import EncodedPrompt, EngineError, Prompt, PromptTooLong, RequestError
from npu.text.template import Turn, encode_parts

# Stand-ins rendered in place of the texts, to cut a rendered conversation into parts.
_QUESTION = "\ue00bvlmd-question\ue00b"
_ANSWER = "\ue00cvlmd-answer\ue00c"
_MAX_FORGOTTEN = 256  # ids remembered as forgotten, so a late turn can be told why


class ConversationLimit(RequestError):
    """Too many conversations or turns: refused, naming the limit."""

    code = "limit"


class ConversationError(RequestError):
    code = "bad_request"


class ConversationNotYours(RequestError):
    """A turn or reset for a conversation another owner opened."""

    code = "conversation_not_yours"


@dataclass(frozen=True)
class ConversationLimits:
    max_conversations: int = 8
    max_per_owner: int = 4  # conversations one owner may hold at once
    max_turns: int = 16
    max_tokens: int | None = None  # rows one conversation may fill; None = the KV cache
    idle_s: float = 600.0
    max_bytes: int = 64 * 2**20  # parked KV snapshots + image features, all conversations
    answer_room: int = 128  # rows kept for an answer (at most max_tokens) before old turns go

    def __post_init__(self) -> None:
        for name in ("max_conversations", "max_per_owner", "max_turns", "max_bytes", "answer_room"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.idle_s <= 0 or (self.max_tokens is not None and self.max_tokens < 2):
            raise ValueError("idle_s must be > 0 and max_tokens >= 2")


@dataclass
class TurnRecord:
    question: str  # as the model was asked it (a format's hint included)
    num_images: int
    answer_ids: list[int]
    answer: str
    features: np.ndarray | None  # (num_images * image_tokens, hidden) the images' feature rows
    start: int = 0  # the turn's first row in the conversation
    image_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # absolute rows

    @property
    def nbytes(self) -> int:
        return 0 if self.features is None else self.features.nbytes


@dataclass
class Conversation:
    conversation_id: str
    system: str | None
    owner: str = ""  # who opened it (opaque)
    turns: list[TurnRecord] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # every row so far, answers as generated
    valid_rows: int = 0  # leading rows of `ids` the cache (live) or the snapshot holds
    snapshot: KVSnapshot | None = None
    num_turns: int = 0  # turns asked over its life, dropped ones included
    last_used: float = 0.0

    @property
    def nbytes(self) -> int:
        return (0 if self.snapshot is None else self.snapshot.nbytes) + sum(t.nbytes for t in self.turns)


@dataclass
class TurnPlan:
    """How the engine runs one turn: the whole conversation's ids and the rows to prefill."""

    conversation: Conversation
    encoded: EncodedPrompt | None  # None: a first turn, encoded and prefilled as any prompt
    question: str = ""
    num_images: int = 0
    start: int = 0  # first row to prefill (later turns): the conversation's rows before it are reused
    stored_features: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (rows, features) >= start
    kept: list[TurnRecord] = field(default_factory=list)  # earlier turns still in the conversation
    placement: list[tuple[int, np.ndarray]] | None = None  # their (start, image rows) when re-encoded
    turn_start: int = 0  # the row where this turn's block begins
    notes: list[str] = field(default_factory=list)
    dropped_turns: int = 0
    features: np.ndarray | None = None  # this turn's image feature rows, once encoded (set by the engine)

    limit_tokens: int | None = None  # ConversationLimits.max_tokens

    def row_limit(self, capacity: int) -> int:
        return min(capacity, self.limit_tokens or capacity)

    def check_fits(self, encoded: EncodedPrompt, capacity: int) -> int:
        """The rows the conversation may fill; PromptTooLong unless the turn's prompt and
        one answer token fit them."""
        limit = self.row_limit(capacity)
        if len(encoded.ids) + 1 > limit:
            raise PromptTooLong(f"the conversation's prompt is {len(encoded.ids)} tokens but it may fill only {limit}"
                                " rows (max_tokens, or the KV cache) and one must remain for the answer")
        return limit


class ConversationStore:
    """Every conversation of one engine, at most one of them live in the cache."""

    def __init__(self, limits: ConversationLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or ConversationLimits()
        self.clock = clock
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()  # least recently used first
        self._forgotten: OrderedDict[str, str] = OrderedDict()
        self.live: str | None = None
        self.num_evicted_snapshots = 0
        self.num_forgotten = 0

    # -- queries ------------------------------------------------------------------------------

    def __contains__(self, conversation_id: str) -> bool:
        return conversation_id in self._conversations

    def get(self, conversation_id: str) -> Conversation | None:
        return self._conversations.get(conversation_id)

    def stats(self) -> dict[str, int]:
        parked = [c for c in self._conversations.values() if c.snapshot is not None]
        return {"active": len(self._conversations), "parked": len(parked), "bytes": self.nbytes,
                "max_bytes": self.limits.max_bytes, "snapshots_evicted": self.num_evicted_snapshots,
                "forgotten": self.num_forgotten}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._conversations.values())

    # -- lifecycle ----------------------------------------------------------------------------

    def forget(self, conversation_id: str, reason: str = "reset", owner: str | None = None) -> bool:
        """Drop a conversation (a reset); True when it existed. With `owner` (a client's
        reset), ConversationNotYours when another owner opened it (nothing changed)."""
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            return False
        if owner is not None and owner != conversation.owner:
            raise ConversationNotYours(_not_yours(conversation_id))
        del self._conversations[conversation_id]
        if self.live == conversation_id:
            self.live = None
        if reason != "reset":
            self.num_forgotten += 1
            self._forgotten[conversation_id] = reason
            while len(self._forgotten) > _MAX_FORGOTTEN:
                self._forgotten.popitem(last=False)
        return True

    def expire(self) -> None:
        now = self.clock()
        for conversation_id, conversation in list(self._conversations.items()):
            if now - conversation.last_used > self.limits.idle_s:
                self.forget(conversation_id, f"it was idle for more than idle_s ({self.limits.idle_s:g} s)")

    def park(self, cache: KVCache) -> None:
        """Copy the live conversation's rows out of the cache before something else uses it."""
        conversation = self._conversations.get(self.live) if self.live is not None else None
        self.live = None
        if conversation is None or conversation.valid_rows == 0:
            return
        conversation.snapshot = cache.snapshot(min(conversation.valid_rows, cache.position))
        conversation.valid_rows = conversation.snapshot.length
        self._fit_bytes(keep=conversation.conversation_id)

    def place(self, cache: KVCache, plan: TurnPlan) -> int:
        """Make the cache hold the planned later turn's first `plan.start` rows (parking
        whatever else is live); returns the row its prefill starts at."""
        conversation_id = plan.conversation.conversation_id
        if plan.start > 0 and self.live == conversation_id:
            if cache.position != plan.start:  # a cancelled turn left rows after the conversation's
                cache.rewind(plan.start)
            return plan.start
        self.park(cache)  # also this conversation, when it is about to be prefilled again from row 0
        if plan.start == 0:
            cache.reset()
            return 0
        snapshot = plan.conversation.snapshot
        if snapshot is None or snapshot.length != plan.start:
            raise EngineError(f"conversation {conversation_id!r} lost its KV rows (a bug)")
        cache.restore(snapshot)
        self.live = conversation_id
        return plan.start

    def _fit_bytes(self, keep: str | None = None) -> None:
        """Drop the least recently used snapshots, then conversations, until within max_bytes."""
        for conversation in list(self._conversations.values()):
            if self.nbytes <= self.limits.max_bytes:
                return
            if conversation.snapshot is not None:
                conversation.snapshot = None
                conversation.valid_rows = 0
                self.num_evicted_snapshots += 1
        for conversation_id in list(self._conversations):
            if self.nbytes <= self.limits.max_bytes:
                return
            if conversation_id != keep:
                self.forget(conversation_id, f"the conversations' memory reached max_bytes ({self.limits.max_bytes})")

    # -- one turn -----------------------------------------------------------------------------

    def plan(self, prompt: Prompt, template: Any, image_tokens: int, capacity: int, max_tokens: int) -> TurnPlan:
        """Plan the turn `prompt` adds to conversation `prompt.conversation`; creates the
        conversation on its first turn. Raises ConversationLimit / ConversationError /
        PromptTooLong (nothing changed)."""
        self.expire()
        conversation_id = prompt.conversation
        conversation = self._conversations.get(conversation_id)
        notes = []
        owner = prompt.conversation_owner
        if conversation is not None and conversation.owner != owner:
            raise ConversationNotYours(_not_yours(conversation_id))
        if conversation is None:
            if len(self._conversations) >= self.limits.max_conversations:
                raise ConversationLimit(
                    f"there are already {len(self._conversations)} conversations, the limit (max_conversations): reset"
                    f" one, or wait until one has been idle for idle_s ({self.limits.idle_s:g} s)")
            held = sum(c.owner == owner for c in self._conversations.values())
            if held >= self.limits.max_per_owner:
                raise ConversationLimit(
                    f"this client already holds {held} conversations, the limit per client (max_per_client): reset"
                    f" one, or wait until one has been idle for idle_s ({self.limits.idle_s:g} s)")
            if conversation_id in self._forgotten:  # told once, when this turn is recorded
                notes.append(f"conversation {conversation_id!r} was forgotten because {self._forgotten[conversation_id]};"
                             " it starts again at turn 1")
            conversation = Conversation(conversation_id, prompt.system, owner)
        elif conversation.num_turns >= self.limits.max_turns:
            raise ConversationLimit(f"conversation {conversation_id!r} has had {conversation.num_turns} turns, the limit"
                                    " (max_turns): reset it to go on")
        elif prompt.system != conversation.system:
            raise ConversationError("system: a conversation keeps the system prompt of its first turn;"
                                    " send the same one (or none) or reset the conversation")
        question, num_images = prompt.text, len(prompt.images)
        plan = TurnPlan(conversation, None, question=question, num_images=num_images, notes=notes,
                        limit_tokens=self.limits.max_tokens)
        if not conversation.turns:
            return plan
        limit = plan.row_limit(capacity)
        room = min(max_tokens, self.limits.answer_room)
        parts = _turn_parts(template, conversation.turns[-1].num_images, num_images, image_tokens, conversation.system)
        new_ids, new_image_offsets = _later_turn(template, parts, question)
        kept, history, placement = list(conversation.turns), conversation.ids, None
        while kept and len(history) + len(new_ids) + room > limit:
            kept.pop(0)  # the oldest turn goes; the rest is encoded as a conversation of its own
            if kept:
                history, placement = _encode_history(template, kept, image_tokens, conversation.system)
        plan.dropped_turns = len(conversation.turns) - len(kept)
        reason = f"with them the prompt would not leave {room} of the {limit} rows for the answer"
        if not kept:  # only the new turn fits: it becomes the first turn of what is left
            plan.notes.append(f"all {plan.dropped_turns} earlier turn(s) were dropped: {reason}")
            return plan
        if plan.dropped_turns:
            plan.notes.append(f"the oldest {plan.dropped_turns} turn(s) were dropped and the rest prefilled again: {reason}")
        ids = list(history) + new_ids
        plan.encoded = EncodedPrompt(ids, len(ids), np.asarray(new_image_offsets, np.int64) + len(history))
        plan.check_fits(plan.encoded, capacity)
        plan.kept, plan.placement, plan.turn_start = kept, placement, len(history)
        if not plan.dropped_turns and conversation.valid_rows > 0:
            plan.start = conversation.valid_rows
        for turn, (_, rows) in zip(kept, placement or [(t.start, t.image_rows) for t in kept]):
            if turn.features is not None and len(rows) and rows.min() >= plan.start:
                plan.stored_features.append((rows, turn.features))
        return plan

    def finish(self, plan: TurnPlan, encoded: EncodedPrompt, answer_ids: Sequence[int], answer: str,
               cache_rows: int, completed: bool) -> dict[str, Any]:
        """Record the turn when it `completed` (stop or length); either way the cache now
        holds the conversation's first `cache_rows` rows (or, when the turn did not
        complete, those before the turn). Returns what the final adds: conversation,
        turn, dropped_turns and notes (when there are any)."""
        fields: dict[str, Any] = {"conversation": plan.conversation.conversation_id,
                                  "turn": self._record(plan, encoded, answer_ids, answer, cache_rows, completed)}
        if plan.dropped_turns:
            fields["dropped_turns"] = plan.dropped_turns
        if plan.notes:
            fields["notes"] = list(plan.notes)
        return fields

    def _record(self, plan: TurnPlan, encoded: EncodedPrompt, answer_ids: Sequence[int], answer: str,
                cache_rows: int, completed: bool) -> int:
        conversation = plan.conversation
        conversation_id = conversation.conversation_id
        conversation.last_used = self.clock()
        if not completed:  # nothing recorded; rows before the turn's start are still in the cache
            if plan.encoded is not None and plan.start > 0:
                self.live = conversation_id
            return conversation.num_turns + 1
        if plan.encoded is None:
            turns: list[TurnRecord] = []
        else:
            turns = plan.kept
            for turn, (start, rows) in zip(turns, plan.placement or []):
                turn.start, turn.image_rows = start, rows
        turns.append(TurnRecord(plan.question, plan.num_images, list(answer_ids), answer, plan.features,
                                plan.turn_start, np.asarray(encoded.context_rows, np.int64)))
        conversation.turns = turns
        self._forgotten.pop(conversation_id, None)
        conversation.ids = list(encoded.ids) + list(answer_ids)
        conversation.valid_rows = min(cache_rows, len(conversation.ids))
        conversation.snapshot = None  # the cache holds it now
        conversation.num_turns += 1
        self._conversations[conversation_id] = conversation
        self._conversations.move_to_end(conversation_id)
        self.live = conversation_id
        self._fit_bytes(keep=conversation_id)
        return conversation.num_turns


def _not_yours(conversation_id: str) -> str:
    return (f"conversation {conversation_id!r} was opened by another client (another reply path): only the client that"
            " opened it may continue or reset it; choose another conversation id")


def _turn_parts(template: Any, previous_images: int, num_images: int, image_tokens: int,
                system: str | None) -> tuple[str, str]:
    """(text between the last answer and the question, text after the question), as the
    template renders a conversation: a stand-in question and answer cut it into parts."""
    text = template.render_conversation([Turn(_QUESTION + "0", previous_images, _ANSWER), Turn(_QUESTION, num_images)],
                                        image_tokens, system)
    _, found, after_answer = text.partition(_ANSWER)
    before, found_question, after = after_answer.partition(_QUESTION)
    if not found or not found_question:
        raise ConversationError("this model's chat template cannot render a conversation's later turns")
    return before, after


def _later_turn(template: Any, parts: tuple[str, str], question: str) -> tuple[list[int], list[int]]:
    """The ids a later turn appends after the last answer, and where its image rows are."""
    encoded = encode_parts(template.tokenizer, parts[0], question, parts[1])
    ids, before = encoded.ids, encoded.ids[: encoded.num_prefix_ids]
    context_id = template.image_context_id
    offsets = [i for i, token in enumerate(before) if token == context_id] if context_id is not None else []
    return ids, offsets


def _encode_history(template: Any, turns: Sequence[TurnRecord], image_tokens: int,
                    system: str | None) -> tuple[list[int], list[tuple[int, np.ndarray]]]:
    """Ids of `turns` as a conversation of their own (the first as a first turn), with each
    turn's (start row, image rows)."""
    first = turns[0]
    prompt_ids = template.encode_prompt(first.question, first.num_images, image_tokens, system=system).ids
    context_id = template.image_context_id
    rows = [i for i, token in enumerate(prompt_ids) if token == context_id] if first.num_images else []
    ids = list(prompt_ids) + list(first.answer_ids)
    placed = [(0, np.asarray(rows, np.int64))]
    for previous, turn in zip(turns, turns[1:]):
        parts = _turn_parts(template, previous.num_images, turn.num_images, image_tokens, system)
        block, offsets = _later_turn(template, parts, turn.question)
        placed.append((len(ids), np.asarray(offsets, np.int64) + len(ids)))
        ids += block + list(turn.answer_ids)
    return ids, placed
