"""Follow-up prefixes: which stored KV snapshot a prompt may reuse, and from which cache
row its prefill then starts.

Prefill runs at any offset (npu.engine.prefill), so a follow-up normally resumes right
at its snapshot's end and prefills only its own rows. Replaying part of the prefix
(restoring the snapshot only up to an earlier chunk start and re-running the rest from
the snapshot's saved input rows) can only pay when the question runs past what the
prefill groups hold, so that resuming would leave rows for the one-by-one decode group:
then the measured graph times decide.

Automatic prefix reuse (`reusable_rows`): whatever asked, a prompt whose ids (images
included, compared by pixels) start with what the cache still holds from the previous
prompt and its answer (`CachedRows`) keeps those rows and prefills only the rest; a chat
client that sends the whole history each turn prefills only the new turn. `ParkedChats`
keeps the rows of the last few chats (prompts of messages) that another prompt pushed out
of the cache (a caption, a watch, a client's title request between two turns), so the
chat's next turn still finds them.

Decisions only: the engine restores the snapshot and runs the plan.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from npu.engine.kv_cache import KVCache, KVSnapshot, PrefixEntry, PrefixStore
from npu.shapes import GraphShapes
from npu.engine.prefill import plan_prefill, plan_seconds
from npu.engine.prompt import EncodedPrompt, Prompt

# How a follow-up on a stored prefix is prefilled: "auto" replays from an earlier chunk
# start only when resuming would leave rows for the decode group and the measured graph
# times say replaying is cheaper; "never" always resumes; "always" replays from the latest
# chunk start before the snapshot's end in that case.
REPLAY_POLICIES = ("auto", "never", "always")


def prefix_key(prompt: Prompt, template_name: str) -> Hashable | None:
    """What a prompt's prefix snapshot is stored under; None when it must not be reused."""
    if prompt.image_key is None or not prompt.images:
        return None
    return (prompt.image_key, len(prompt.images), prompt.system, template_name)


def find_follow_up(prefixes: PrefixStore, key: Hashable | None, encoded: EncodedPrompt) -> PrefixEntry | None:
    """The stored prefix `encoded` continues, or None (no key, no match, or image rows
    beyond the snapshot: then the stored rows cannot hold this prompt's image features)."""
    entry = prefixes.find(key, encoded.ids) if key is not None else None
    if entry is not None and entry.snapshot.length < encoded.context_rows.max(initial=-1) + 1:
        return None
    return entry


def follow_up_start(entry: PrefixEntry, end: int, shapes: GraphShapes, policy: str,
                    stack_seconds: dict[int, float]) -> int:
    """The cache row a follow-up's prefill (of rows ..end-1) starts from: the snapshot's
    end, unless resuming there leaves rows for the decode group (the question runs past
    the longest history) and replaying from an earlier chunk start (row 0 or a history
    length) is allowed by `policy` and, for "auto", cheaper by `stack_seconds`
    (unmeasured groups mean resume)."""
    resume = entry.snapshot.length
    if policy == "never" or entry.embeds is None or not shapes.chunk:
        return resume
    if all(group for group, _, _ in plan_prefill(resume, end, shapes.chunk, shapes.history_groups)):
        return resume  # every row already goes through a prefill group: nothing to gain
    starts = [h for h in (0, *shapes.history_groups) if h < resume]
    if not starts:
        return resume
    if policy == "always":
        return max(starts)
    costs = {start: plan_seconds(shapes, start, end, stack_seconds) for start in (resume, *starts)}
    if any(cost is None for cost in costs.values()):
        return resume
    return min(costs, key=lambda start: (costs[start], -start))


@dataclass(frozen=True)
class CachedRows:
    """What the KV cache's first rows hold after a prompt ran: its token ids (prompt, then the
    answer tokens written) and the prompt's images with their first row each (the pixels
    kept by reference: prompts are frozen and callers never write into their images)."""

    ids: np.ndarray  # (num_rows,) int64
    image_starts: tuple[int, ...]
    images: tuple[np.ndarray, ...]
    chat: bool = False  # a prompt of messages: its rows are parked when another prompt needs the cache


def cached_rows(ids: Sequence[int], num_rows: int, encoded: EncodedPrompt, images: Sequence[np.ndarray],
                image_tokens: int, chat: bool = False) -> CachedRows:
    starts = tuple(int(encoded.context_rows[k * image_tokens]) for k in range(len(images)))
    return CachedRows(np.asarray(ids[:num_rows], np.int64), starts, tuple(images), chat)


class ParkedChats:
    """The rows of up to `max_chats` chats copied out of the cache (least recently parked first)."""

    def __init__(self, max_chats: int = 2) -> None:
        self.max_chats = max_chats
        self._chats: list[tuple[CachedRows, KVSnapshot]] = []

    def park(self, live: CachedRows | None, cache: KVCache) -> None:
        """Copy a chat's rows out before another prompt changes the cache (others are not kept)."""
        if live is None or not live.chat or not len(live.ids) or cache.position < len(live.ids) or not self.max_chats:
            return
        # an earlier turn of the same chat (its rows a prefix of these) is superseded
        self._chats = [(chat, snapshot) for chat, snapshot in self._chats if not _extends(live, chat)]
        self._chats.append((live, cache.snapshot(len(live.ids))))
        del self._chats[:-self.max_chats]

    def best(self, encoded: EncodedPrompt, images: Sequence[np.ndarray], image_tokens: int) -> tuple[int, int | None]:
        """(rows the prompt can take from a parked chat, which one) ((0, None) when none)."""
        found = [(reusable_rows(rows, encoded, images, image_tokens), k) for k, (rows, _) in enumerate(self._chats)]
        return max(found, default=(0, None))

    def take(self, index: int, rows: int) -> KVSnapshot:
        """A parked chat's snapshot; it stays parked unless the prompt takes all of its rows (the cache then
        holds them, and more)."""
        chat, snapshot = self._chats[index]
        if rows >= len(chat.ids):
            del self._chats[index]
        return snapshot

    def clear(self) -> None:
        self._chats.clear()

    @property
    def nbytes(self) -> int:
        return sum(snapshot.nbytes for _, snapshot in self._chats)


def reusable_rows(cached: CachedRows | None, encoded: EncodedPrompt, images: Sequence[np.ndarray],
                  image_tokens: int) -> int:
    """How many leading cache rows a prompt may keep (automatic prefix reuse): the length of
    the longest common prefix of the cached ids and the prompt's ids, cut before the first
    image whose pixels differ, and leaving at least the prompt's last row to prefill (its
    hidden state picks the first answer token). 0 when nothing is cached."""
    if cached is None or not len(cached.ids):
        return 0
    ids = np.asarray(encoded.ids, np.int64)
    length = min(len(ids) - 1, len(cached.ids))
    if length <= 0:
        return 0
    differ = np.flatnonzero(ids[:length] != cached.ids[:length])
    common = int(differ[0]) if len(differ) else length
    new_starts = [int(encoded.context_rows[k * image_tokens]) for k in range(len(images))]
    for k, start in enumerate(cached.image_starts):
        if start >= common:
            break
        if k >= len(images) or new_starts[k] != start or not _same_pixels(cached.images[k], images[k]):
            return start
    return common


def _extends(longer: CachedRows, shorter: CachedRows) -> bool:
    n = len(shorter.ids)
    return (len(longer.ids) >= n and np.array_equal(longer.ids[:n], shorter.ids)
            and longer.image_starts[:len(shorter.image_starts)] == shorter.image_starts
            and all(_same_pixels(a, b) for a, b in zip(shorter.images, longer.images)))


def _same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b))


def first_image_at(context_rows: np.ndarray, image_tokens: int, start: int) -> int:
    """The first image with a context row at or after `start` (earlier ones are in the cache)."""
    if not image_tokens:
        return 0
    return int(np.searchsorted(context_rows[image_tokens - 1::image_tokens], start))
