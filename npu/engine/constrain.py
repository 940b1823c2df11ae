"""Constrained decoding: the next token chosen only among those a format admits.

The tokenizer's vocabulary is indexed once as sorted byte strings (`VocabularyIndex`);
walking it together with a format's language (npu.engine.format_language) gives, for an
answer prefix, every token that keeps it admissible and the prefix it leads to: a token
trie of the format, built lazily and cached per prefix (`CompiledFormat`). The stop
tokens are allowed exactly where the answer is complete.

Per request, `ConstrainedAnswer.choose(run_post, sampler, history)`:

- with one continuation only (a token, or the end) the choice is forced: the post graph
  is not run at all, and once only the end remains the engine stops without running the
  layers for the last token either, so a typed answer never costs more graph calls
  than the same answer decoded freely;
- otherwise the post graph runs once; the logits of the allowed tokens are gathered
  (no full-vocabulary mask) and the sampler chooses among them (greedy by default);
  on top-k post builds the allowed tokens among the k are used, and when none of them
  is allowed the answer goes on along the format's shortest completion, with a note;
- the token budget (max_tokens, cut to the cache) is kept: a token is allowed only when
  the answer can still be finished in the tokens left (by the greedy spelling of a
  known completion), so the answer always parses.

`confidence()` is the probability, under the model's logits renormalised over the
allowed tokens at each step, of the chosen answer's value: per step, the mass of the
tokens that can still lead to that value (so "Yes" and "yes" are one answer), multiplied
over the steps. Forced steps count 1. Knows nothing of graphs beyond the post outputs.
"""

from __future__ import annotations

import json
import threading
import weakref
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from npu.engine.format_language import Language, compile_language
from npu.engine.prompt import NumericError, RequestError
from npu.engine.yes_no import question_language

END = None  # the "next prefix" of a stop token
MAX_CACHED_PREFIXES = 20_000  # per compiled format: transitions and distances kept
MAX_COMPILED_FORMATS = 32
# One index per tokenizer and process: indexing ~150k tokens takes a second or two.
_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INDEXES_LOCK = threading.Lock()


class FormatError(RequestError):
    """A format the engine cannot decode (validated formats reach here only by a bug)."""

    code = "bad_request"


class FormatTooLong(RequestError):
    """The shortest answer of the format does not fit the tokens left for the answer."""

    code = "too_long"


class VocabularyIndex:
    """Every ordinary token's bytes, sorted, with the ids spelling them (one array aligned
    with the sorted bytes; the rare second id of the same bytes beside it): ~9 MB for
    Qwen2's 151k tokens, where a dict of lists would take three times that."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int]) -> None:
        pieces: dict[bytes, list[int]] = {}
        special = set(tokenizer.added_tokens)
        byte_level = getattr(tokenizer, "is_byte_level", False)
        for token_id in range(tokenizer.vocab_size):
            if token_id in special:
                continue
            piece = tokenizer.token_bytes(token_id) if byte_level else tokenizer.decode([token_id]).encode("utf-8")
            if piece:
                pieces.setdefault(piece, []).append(token_id)
        self.keys = sorted(pieces)
        self._first_ids = np.array([pieces[key][0] for key in self.keys], np.int64)  # (num_keys,)
        self._more_ids = {key: ids[1:] for key, ids in pieces.items() if len(ids) > 1}
        self.max_len = max((len(k) for k in self.keys), default=0)
        self.stop_ids = sorted(stop_ids)

    def ids(self, position: int) -> list[int]:
        """The ids spelling `keys[position]`."""
        return [int(self._first_ids[position]), *self._more_ids.get(self.keys[position], ())]

    def __contains__(self, piece: bytes) -> bool:
        position = bisect_left(self.keys, piece)
        return position < len(self.keys) and self.keys[position] == piece

    def walk(self, language: Language, prefix: bytes) -> list[tuple[int, bytes]]:
        """(token id, prefix + token bytes) for every token keeping `prefix` viable."""
        found: list[tuple[int, bytes]] = []
        keys = self.keys
        stack = [(0, len(keys), b"")]
        while stack:
            low, high, piece = stack.pop()
            if piece and low < high and keys[low] == piece:
                found += [(token_id, prefix + piece) for token_id in self.ids(low)]
                low += 1
            for byte in sorted(language.next_bytes(prefix + piece)):
                candidate = piece + bytes([byte])
                if not language.viable(prefix + candidate):
                    continue
                start = bisect_left(keys, candidate, low, high)
                end = bisect_left(keys, piece + bytes([byte + 1]), start, high) if byte < 255 else high
                if start < end:
                    stack.append((start, end, candidate))
        return found

    def greedy_tokens(self, text: bytes) -> int | None:
        """How many tokens the longest-match spelling of `text` takes (None: unspellable)."""
        count, position = 0, 0
        while position < len(text):
            for length in range(min(self.max_len, len(text) - position), 0, -1):
                if text[position:position + length] in self:
                    position += length
                    count += 1
                    break
            else:
                return None
        return count


def vocabulary_index(tokenizer: Any, stop_ids: Sequence[int]) -> VocabularyIndex:
    """The tokenizer's index, built on first use and shared by every engine of the process."""
    with _INDEXES_LOCK:
        by_stops = _INDEXES.setdefault(tokenizer, {})
        key = tuple(sorted(stop_ids))
        if key not in by_stops:
            by_stops[key] = VocabularyIndex(tokenizer, key)
        return by_stops[key]


class CompiledFormat:
    """A format's language over one vocabulary, with its transitions cached per prefix."""

    def __init__(self, language: Language, index: VocabularyIndex) -> None:
        self.language = language
        self.index = index
        self._transitions: OrderedDict[bytes, tuple[np.ndarray, list[bytes | None]]] = OrderedDict()
        self._distances: dict[bytes, int | None] = {}

    def transitions(self, prefix: bytes) -> tuple[np.ndarray, list[bytes | None]]:
        """(token ids, the prefix each leads to; END for a stop token)."""
        cached = self._transitions.get(prefix)
        if cached is None:
            pairs = self.index.walk(self.language, prefix)
            if self.language.complete(prefix):
                pairs += [(stop_id, END) for stop_id in self.index.stop_ids]
            ids = np.array([token_id for token_id, _ in pairs], np.int64)  # (n,)
            cached = (ids, [next_prefix for _, next_prefix in pairs])
            if len(self._transitions) >= MAX_CACHED_PREFIXES:
                self._transitions.popitem(last=False)
            self._transitions[prefix] = cached
        return cached

    def distance(self, prefix: bytes) -> int | None:
        """Tokens that surely finish `prefix` (greedy spelling of its shortest completion)."""
        if prefix not in self._distances:
            if len(self._distances) >= MAX_CACHED_PREFIXES:
                self._distances.clear()
            tail = self.language.shortest_completion(prefix)
            self._distances[prefix] = None if tail is None else self.index.greedy_tokens(tail)
        return self._distances[prefix]


class FormatCache:
    """Compiled formats of one tokenizer (least recently used dropped); the vocabulary is
    indexed on the first typed request."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self._index: VocabularyIndex | None = None
        self._compiled: OrderedDict[tuple[str, str], CompiledFormat] = OrderedDict()

    def compile(self, schema: dict[str, Any], question: str) -> CompiledFormat:
        language_code = question_language(question) if _has_boolean_words(schema) else ""
        key = (json.dumps(schema, sort_keys=True), language_code)
        compiled = self._compiled.get(key)
        if compiled is None:
            try:
                language = compile_language(schema, question)
            except (ValueError, KeyError, TypeError) as exc:
                raise FormatError(f"format: {exc}") from None
            if self._index is None:
                self._index = vocabulary_index(self.tokenizer, self.stop_ids)
            compiled = CompiledFormat(language, self._index)
            if len(self._compiled) >= MAX_COMPILED_FORMATS:
                self._compiled.popitem(last=False)
            self._compiled[key] = compiled
        self._compiled.move_to_end(key)
        return compiled


class ConstrainedAnswer:
    """One typed answer being decoded: its prefix, budget, and what the model scored."""

    def __init__(self, compiled: CompiledFormat, budget: int, scores: PostScores) -> None:
        self.compiled = compiled
        self.language = compiled.language
        self.scores = scores
        self.prefix = b""
        self.remaining = budget
        self.witness = self.language.shortest_completion(b"")  # a completion that fits the budget
        need = compiled.distance(b"")
        if self.witness is None or need is None:
            raise FormatError("format: this tokenizer cannot spell any answer of the format")
        if need > budget:
            raise FormatTooLong(f"the shortest answer of this format takes {need} tokens but only {budget} are left"
                                " for the answer (raise max_tokens, or shorten the prompt)")
        self.notes: list[str] = []
        self.num_forced = 0
        self._steps: list[tuple[bytes, list[bytes | None], np.ndarray]] = []
        self._unscored = False  # a top-k build without scores: no confidence
        # allowed() for the state it was last computed in: `done` and `choose` both ask for
        # it each token, and each asks the trie and the completion distances of every token
        self._allowed_for: tuple[bytes, int, bytes] | None = None
        self._allowed: tuple[np.ndarray, list[bytes | None]] = (np.zeros(0, np.int64), [])

    # -- the choice --------------------------------------------------------------------------

    def allowed(self) -> tuple[np.ndarray, list[bytes | None]]:
        """The tokens allowed now: admissible and finishable within the budget."""
        state = (self.prefix, self.remaining, self.witness)
        if state != self._allowed_for:
            ids, nexts = self.compiled.transitions(self.prefix)
            keep = [i for i, nxt in enumerate(nexts) if nxt is END or self._reach(nxt) <= self.remaining - 1]
            self._allowed = (ids, nexts) if len(keep) == len(nexts) else (ids[keep], [nexts[i] for i in keep])
            self._allowed_for = state
        return self._allowed

    def _reach(self, next_prefix: bytes) -> float:
        return self._completion(next_prefix)[0]

    def _completion(self, next_prefix: bytes) -> tuple[float, bytes | None]:
        """(tokens that surely finish the answer after `next_prefix`, a completion that takes
        no more): the shortest completion, or the rest of the current witness when the token
        lies on it and its spelling is shorter."""
        distance = self.compiled.distance(next_prefix)
        best = (float("inf"), None) if distance is None else (distance, None)
        written = next_prefix[len(self.prefix):]
        if self.witness.startswith(written):
            rest = self.witness[len(written):]
            via_witness = self.compiled.index.greedy_tokens(rest)
            if via_witness is not None and via_witness < best[0]:
                best = (via_witness, rest)
        return best

    @property
    def done(self) -> bool:
        """Only a stop token may follow: the answer is complete, nothing is left to choose."""
        return all(nxt is END for nxt in self.allowed()[1])

    def choose(self, run_post: Callable[[], list[np.ndarray]], sampler: Any, history: Sequence[int]) -> int:
        """The next token id (a stop id when the answer ends); runs the post graph only
        when there is a choice to make."""
        ids, nexts = self.allowed()
        if len(set(nexts)) == 1:  # one token, or only the end (several stop ids)
            self.num_forced += 1
            return self._advance(int(ids[0]), nexts[0])
        values, candidates = self.scores.allowed_scores(run_post(), ids)
        if candidates is None:  # a top-k build that offered none of the allowed tokens
            index = self._fallback(nexts)
            self.notes.append(f"answer token {len(self._steps) + self.num_forced + 1}: none of the post graph's top-k"
                              " tokens was allowed by the format; the answer went on along its shortest completion")
            self._steps.append((self.prefix, nexts, np.zeros(len(nexts))))  # no mass seen: confidence 0
            return self._advance(int(ids[index]), nexts[index])
        if values is None:  # ids without scores: greedy, first allowed in rank order
            self._unscored = True
            chosen = int(candidates[0])
        else:
            if not np.isfinite(values).all():  # one bad logit among the allowed makes the choice meaningless
                raise NumericError("the model produced a non-finite logit among the format's allowed tokens:"
                                   " a numeric overflow in the graphs")
            chosen = int(sampler.sample_candidates(values, ids[candidates], history))
            self._steps.append((self.prefix, [nexts[i] for i in candidates], _softmax(values)))
        index = next(i for i in candidates if int(ids[i]) == chosen)
        return self._advance(chosen, nexts[index])

    def _fallback(self, nexts: list[bytes | None]) -> int:
        """The allowed continuation along the witness (the shortest completion)."""
        for index, nxt in enumerate(nexts):
            if nxt is not END and self.witness.startswith(nxt[len(self.prefix):]):
                return index
        return next(i for i, nxt in enumerate(nexts) if nxt is END) if END in nexts else 0

    def _advance(self, token_id: int, next_prefix: bytes | None) -> int:
        if next_prefix is not END:
            _, rest = self._completion(next_prefix)
            self.witness = self.language.shortest_completion(next_prefix) if rest is None else rest
            self.prefix = next_prefix
            self.remaining -= 1
        return token_id

    # -- the result -------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.language.complete(self.prefix)

    def value(self) -> Any:
        return self.language.value(self.prefix)

    def final_fields(self, finish: str, timings: dict[str, Any]) -> dict[str, Any]:
        """What the final adds: value and confidence when the answer ended (`stop`), notes."""
        timings["format_forced_tokens"] = self.num_forced
        fields: dict[str, Any] = {"notes": list(self.notes)} if self.notes else {}
        if finish == "stop" and self.complete:
            fields.update(value=self.value(), confidence=self.confidence())
        return fields

    def confidence(self) -> float | None:
        """The chosen value's probability among the allowed answers (see the module doc)."""
        if self._unscored:
            return None
        same = self.language.same_value(self.prefix)
        confidence = 1.0
        for before, nexts, probs in self._steps:
            on_path = [nxt is END and before in same or nxt is not END and any(a.startswith(nxt) for a in same)
                       for nxt in nexts]
            confidence *= float(probs[np.array(on_path, bool)].sum())
        return round(confidence, 6)


class PostScores:
    """Reads the allowed tokens' scores out of a post graph's outputs (logits or top-k)."""

    def __init__(self, logits_index: int | None, topk_ids_index: int | None, topk_values_index: int | None) -> None:
        self.logits_index = logits_index
        self.topk_ids_index = topk_ids_index
        self.topk_values_index = topk_values_index

    def allowed_scores(self, outputs: list[np.ndarray], ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(float32 scores, indices into `ids` they belong to). Indices None: a top-k build
        that offered no allowed token; scores None: a top-k build without scores (the
        indices are then in the graph's rank order)."""
        if self.topk_ids_index is None:
            logits = outputs[self.logits_index].reshape(-1)  # (vocab,)
            return logits[ids].astype(np.float32), np.arange(len(ids))  # only the allowed few are cast
        offered = outputs[self.topk_ids_index].reshape(-1).astype(np.int64)  # (k,)
        position = {int(token_id): i for i, token_id in enumerate(ids)}
        ranked = [(rank, position[int(t)]) for rank, t in enumerate(offered) if int(t) in position]
        if not ranked:
            return None, None
        candidates = np.array([i for _, i in ranked])
        if self.topk_values_index is None:
            return None, candidates
        scores = outputs[self.topk_values_index].reshape(-1)
        return scores[[rank for rank, _ in ranked]].astype(np.float32), candidates


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values.astype(np.float64) - values.max())  # (n,)
    return shifted / shifted.sum()


def _has_boolean_words(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "boolean"
