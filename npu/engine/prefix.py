"""Follow-up prefixes: which stored KV snapshot a prompt may reuse, and from which cache
row its prefill then starts (resume at the snapshot's end, or replay from an earlier
chunk boundary when the measured graph times say that is cheaper).

Decisions only: the engine restores the snapshot and runs the plan.
"""

from __future__ import annotations

from collections.abc import Hashable

from npu.engine.kv_cache import PrefixEntry, PrefixStore
from npu.shapes import GraphShapes
from npu.engine.prefill import plan_seconds
from npu.engine.prompt import EncodedPrompt, Prompt

# How a follow-up on a stored prefix is prefilled: "auto" picks the cheaper of resuming
# at the snapshot's end and replaying from a chunk boundary (by measured graph times);
# "never" always resumes; "always" replays whenever a boundary lies before the end.
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
    """The cache row a follow-up's prefill (of rows ..end-1) starts from.

    Resuming at the snapshot's end runs the question rows one by one through the
    decode group when the snapshot does not end on a chunk boundary; replaying from
    an earlier boundary (row 0 or a history length) re-runs the prefix from its saved
    inputs through prefill groups instead. Each plan is priced with the measured
    seconds per layer-stack call of its groups; unmeasured groups mean resume.
    """
    resume = entry.snapshot.length
    if policy == "never" or entry.embeds is None or not shapes.chunk:
        return resume
    starts = [h for h in (0, *shapes.history_groups) if h < resume]
    if not starts:
        return resume
    if policy == "always":
        return max(starts)
    costs = {start: plan_seconds(shapes, start, end, stack_seconds) for start in (resume, *starts)}
    if any(cost is None for cost in costs.values()):
        return resume
    return min(costs, key=lambda start: (costs[start], -start))
