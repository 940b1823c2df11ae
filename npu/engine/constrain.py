"""Constrained decoding: the next token chosen only among those a format admits.

The grammar of a format (npu.engine.grammars) is compiled by llguidance over the
tokenizer's vocabulary (`Vocabulary`, one per tokenizer and process); per answer token
llguidance computes one token mask (a bit per vocabulary id) from the matcher's state, a
cost that depends on the grammar's state, not on how long the answer already is. The
stop tokens are allowed exactly where the answer is complete.

Per request, `ConstrainedAnswer.choose(run_post, sampler, history)`:

- with one continuation only (a token, or the end) the choice is forced: the post graph
  is not run at all, and once only the end remains the engine stops without running the
  layers for the last token either, so a typed answer never costs more graph calls
  than the same answer decoded freely;
- otherwise the post graph runs once; the logits of the allowed tokens are gathered
  (no full-vocabulary copy) and the sampler chooses among them (greedy by default); on
  top-k post builds the allowed tokens among the k are used, and when none of them is
  allowed the answer goes on along its witness (below), with a note;
- the token budget (max_tokens, cut to the cache) is kept with a *witness*: a token
  sequence that finishes the answer from the current state, found by `finish` (the end
  when allowed, else a token that closes a string, array or object, else the longest
  allowed token). A format whose witness from the start does not fit the budget is
  refused (FormatTooLong). For the flat subset the model chooses freely while the
  tokens left exceed the witness by WITNESS_MARGIN or more; closer to the end a chosen
  token is kept only when a witness after it still fits, else the witness is followed,
  so the answer is complete within the budget. A witness is found again only near the
  end, at most twice per token. A general schema's answer is not guarded (its witness
  can be long): one that runs out of tokens ends `length`, as free text does and as
  OpenAI's API does; its witness serves the up-front check and the top-k fallback.

Limits (`LIMITS`): llguidance's fuel caps the work of a compile and of each mask; a
format over them, or without a witness within MAX_WITNESS_TOKENS, is refused up front
with FormatError naming llguidance's reason (e.g. an unsupported keyword).

`confidence()` is the probability, under the model's logits renormalised over the
allowed tokens at each step, of the chosen answer's value: for the flat subset, per step,
the mass of the tokens that can still lead to that value (so "Yes" and "yes" are one
answer), multiplied over the steps (the MAX_CONFIDENCE_CANDIDATES likeliest tokens of a
step are kept for it); for a general schema, whose steps may allow most of the
vocabulary, the probability of the chosen spelling (a lower bound of its value's). Forced
steps count 1. Knows nothing of graphs beyond the post outputs.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import llguidance
import numpy as np

from npu.engine.grammars import AnswerGrammar, answer_grammar
from npu.engine.prompt import NumericError, RequestError
from npu.engine.token_masks import FormatError, Masker, Vocabulary, string_state, vocabulary
from npu.engine.yes_no import question_language

MAX_COMPILED_FORMATS = 32
MAX_WITNESS_TOKENS = 2048  # a format no answer of which the finisher writes within this is refused
WITNESS_MARGIN = 8  # tokens of slack kept for the model's free choices before the witness is followed
MAX_CONFIDENCE_CANDIDATES = 256  # per step: the likeliest allowed tokens kept for confidence()
# llguidance's work caps: a compile and each token mask (its defaults, the lexer states lowered
# to bound memory on a board: ~1-2 kB a state).
LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=50_000, max_grammar_size=200_000)


class FormatTooLong(RequestError):
    """The shortest answer found for the format does not fit the tokens left for the answer."""

    code = "too_long"


class CompiledFormat:
    """A format's grammar compiled over one vocabulary, with its witness from the start."""

    def __init__(self, grammar: AnswerGrammar, vocab: Vocabulary, what: str) -> None:
        self.grammar = grammar
        self.vocab = vocab
        limits = llguidance.LLParserLimits(**LIMITS)
        self.start = llguidance.LLMatcher(vocab.llg, grammar.grammar, log_level=0, limits=limits)
        if self.start.is_error():
            raise FormatError(f"{what}: {_reason(self.start.get_error())}")
        masker = Masker(vocab)
        self.witness = masker.finish(self.start, MAX_WITNESS_TOKENS)  # also the sample masks
        if self.witness is None:
            raise FormatError(f"{what}: no answer of this format could be written within {MAX_WITNESS_TOKENS} tokens")


class FormatCache:
    """Compiled formats of one tokenizer (least recently used dropped); the vocabulary is
    read on the first typed request."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self._compiled: OrderedDict[tuple[str, str], CompiledFormat] = OrderedDict()

    def compile(self, schema: dict[str, Any] | None, question: str = "",
                json_schema: dict[str, Any] | None = None) -> CompiledFormat:
        """A normalised format (protocol/formats.py) asked with `question`, or any JSON Schema."""
        what = "json_schema" if json_schema is not None else "format"
        source = json_schema if json_schema is not None else schema
        language_code = question_language(question) if json_schema is None and _has_boolean_words(schema) else ""
        key = (what + json.dumps(source, sort_keys=True), language_code)
        compiled = self._compiled.get(key)
        if compiled is None:
            try:
                grammar = answer_grammar(schema, question, json_schema)
            except (ValueError, KeyError, TypeError) as exc:
                raise FormatError(f"{what}: {exc}") from None
            compiled = CompiledFormat(grammar, vocabulary(self.tokenizer, self.stop_ids), what)
            if len(self._compiled) >= MAX_COMPILED_FORMATS:
                self._compiled.popitem(last=False)
            self._compiled[key] = compiled
        self._compiled.move_to_end(key)
        return compiled


class ConstrainedAnswer:
    """One typed answer being decoded: its matcher, budget, witness and what the model scored."""

    def __init__(self, compiled: CompiledFormat, budget: int, scores: PostScores) -> None:
        self.compiled = compiled
        self.grammar = compiled.grammar
        self.vocab = compiled.vocab
        self.scores = scores
        need = len(compiled.witness)
        if need > budget:
            raise FormatTooLong(f"the shortest answer of this format takes {need} tokens but only {budget} are left"
                                " for the answer (raise max_tokens, or shorten the prompt)")
        self.matcher = compiled.start.deep_copy()
        self.masker = Masker(self.vocab)
        self.remaining = budget
        self.witness: list[int] | None = list(compiled.witness)  # None: the model left it (found again when needed)
        self._witness_len = need  # its length when last known
        self._next_witness: list[int] | None = None
        # The budget is guarded for the flat subset (a freely chosen token adds little to its
        # finish); a general schema's answer is left free and may end `length`.
        self._guard_budget = compiled.grammar.kind != "json"
        self.text = bytearray()
        self._string_state = (False, False)  # (inside a JSON string, after a backslash): for finish()
        self.notes: list[str] = []
        self.num_forced = 0
        self.num_tokens = 0
        self._steps: list[tuple[int, np.ndarray, np.ndarray]] = []  # (answer bytes before, candidate ids, probs)
        self._unscored = False  # a top-k build without scores: no confidence
        self._log_path = 0.0  # a general schema's confidence: log of its chosen spelling's probability
        self._allowed: np.ndarray | None = None  # the current state's allowed ids, computed once per token

    # -- the choice --------------------------------------------------------------------------

    def allowed(self) -> np.ndarray:
        """The ids the format allows now (one mask per answer state)."""
        if self._allowed is None:
            self._allowed = self.masker.allowed(self.matcher)
        return self._allowed

    @property
    def done(self) -> bool:
        """Only a stop token may follow: the answer is complete, nothing is left to choose."""
        ids = self.allowed()
        return 0 < len(ids) <= len(self.vocab.stop_ids) and bool(self.vocab.is_stop[ids].all())

    def choose(self, run_post: Callable[[], list[np.ndarray]], sampler: Any, history: Sequence[int]) -> int:
        """The next token id (a stop id when the answer ends); runs the post graph only
        when there is a choice to make."""
        ids = self.allowed()
        if len(ids) == 0:  # cannot happen with a witness: the matcher would be in error
            raise FormatError("format: the answer reached a state where nothing is allowed")
        if self.done or len(ids) == 1:
            self.num_forced += 1
            return self._advance(int(ids[0]))
        values, candidates = self.scores.allowed_scores(run_post(), ids)
        if candidates is None:  # a top-k build that offered none of the allowed tokens
            self.notes.append(f"answer token {self.num_tokens + 1}: none of the post graph's top-k tokens was allowed"
                              " by the format; the answer went on along its shortest known completion")
            self._steps.append((len(self.text), ids[:0], np.zeros(0)))  # no mass seen: confidence 0
            self._log_path = -np.inf
            return self._advance(self._witness_token())
        if values is None:  # ids without scores: greedy, first allowed in rank order
            self._unscored = True
            return self._advance(self._within_budget(int(ids[candidates[0]])))
        if not np.isfinite(values).all():  # one bad logit among the allowed makes the choice meaningless
            raise NumericError("the model produced a non-finite logit among the format's allowed tokens:"
                               " a numeric overflow in the graphs")
        offered = ids if self.scores.topk_ids_index is None else ids[candidates]  # the scored ids
        chosen = self._within_budget(int(sampler.sample_candidates(values, offered, history)))
        if self.grammar.kind == "json":  # the chosen spelling's probability: one number per step
            at = np.flatnonzero(offered == chosen)
            self._log_path += _log_prob(values, int(at[0]) if len(at) else -1)
        else:
            probs = _softmax(values)
            keep = _likeliest(probs, MAX_CONFIDENCE_CANDIDATES)
            self._steps.append((len(self.text), offered[keep], probs[keep]))
        return self._advance(chosen)

    def _within_budget(self, chosen: int) -> int:
        """`chosen`, unless the end is near and no answer could be finished after it in the
        tokens left: then the witness's next token. Far from the end nothing is checked,
        nor for a general schema (its answer may end `length`, as free text does)."""
        if not self._guard_budget or self.vocab.is_stop[chosen] \
                or self.remaining - 1 >= self._witness_len + WITNESS_MARGIN:
            return chosen
        if self.witness and self.witness[0] == chosen:
            return chosen
        trial = self.matcher.deep_copy()
        in_string = string_state(self.vocab.pieces[chosen], self._string_state)[0]
        after = self.masker.finish(trial, self.remaining - 1, in_string) if trial.consume_token(chosen) else None
        if after is not None and len(after) <= self.remaining - 1:
            self._next_witness = after
            return chosen
        self.num_forced += 1
        return self._witness_token()

    def _find_witness(self) -> None:
        self.witness = self.masker.finish(self.matcher, self.remaining, self._string_state[0])
        if self.witness is None:  # nothing finishes in the tokens left: go on freely, it ends `length`
            self._guard_budget = False
        else:
            self._witness_len = len(self.witness)

    def _witness_token(self) -> int:
        if self.witness is None:
            self._find_witness()
        if not self.witness:  # complete, or nothing found: end here when allowed, else any allowed token
            ids = self.allowed()
            stops = ids[self.vocab.is_stop[ids]]
            return int(stops[0] if len(stops) else ids[0])
        return self.witness[0]

    def _advance(self, token_id: int) -> int:
        if self.vocab.is_stop[token_id]:
            return token_id
        if not self.matcher.consume_token(token_id):
            raise FormatError(f"format: token {token_id} was refused: {self.matcher.get_error()}")
        if self._next_witness is not None:  # found when the choice was checked against the budget
            self.witness, self._next_witness = self._next_witness, None
            self._witness_len = len(self.witness)
        elif self.witness is not None:
            self.witness = self.witness[1:] if self.witness and self.witness[0] == token_id else None
        self.text += self.vocab.pieces[token_id]
        self._string_state = string_state(self.vocab.pieces[token_id], self._string_state)
        self.remaining -= 1
        self.num_tokens += 1
        self._allowed = None
        return token_id

    # -- the result -------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()

    def value(self) -> Any:
        return self.grammar.value(self.text.decode("utf-8"))

    def final_fields(self, finish: str, timings: dict[str, Any]) -> dict[str, Any]:
        """What the final adds: value and confidence when the answer ended (`stop`), notes."""
        timings["format_forced_tokens"] = self.num_forced
        timings["format_masks"] = self.masker.num_masks
        fields: dict[str, Any] = {"notes": list(self.notes)} if self.notes else {}
        if finish == "stop" and self.complete:
            fields.update(value=self.value(), confidence=self.confidence())
        return fields

    def confidence(self) -> float | None:
        """The chosen value's probability among the allowed answers (see the module doc)."""
        if self._unscored:
            return None
        if self.grammar.kind == "json":
            return round(float(np.exp(self._log_path)), 6)
        same = [answer.encode("utf-8") for answer in self.grammar.same_value(self.text.decode("utf-8"))]
        confidence = 1.0
        for written, candidates, probs in self._steps:
            before = bytes(self.text[:written])
            on_path = [before in same if self.vocab.is_stop[c] else
                       any(a.startswith(before + self.vocab.pieces[c]) for a in same) for c in candidates]
            confidence *= float(probs[np.array(on_path, bool)].sum()) if on_path else 0.0
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
        indices are then in the graph's rank order). `ids` ascending."""
        if self.topk_ids_index is None:
            logits = outputs[self.logits_index].reshape(-1)  # (vocab,)
            return logits[ids].astype(np.float32), np.arange(len(ids))  # only the allowed are cast
        offered = outputs[self.topk_ids_index].reshape(-1).astype(np.int64)  # (k,)
        where = np.searchsorted(ids, offered)  # (k,)
        where[where >= len(ids)] = 0
        hit = ids[where] == offered  # (k,) in rank order
        if not hit.any():
            return None, None
        candidates = where[hit]
        if self.topk_values_index is None:
            return None, candidates
        scores = outputs[self.topk_values_index].reshape(-1)
        return scores[np.flatnonzero(hit)].astype(np.float32), candidates


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values.astype(np.float64) - values.max())  # (n,)
    return shifted / shifted.sum()


def _log_prob(values: np.ndarray, at: int) -> float:
    """log softmax(values)[at] (-inf for -1: a choice outside the scored candidates)."""
    if at < 0:
        return -np.inf
    top = float(values.max())
    return float(values[at]) - top - float(np.log(np.exp(values - top, dtype=np.float64).sum()))


def _likeliest(probs: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest probabilities (all when fewer), in no particular order: O(n)."""
    if len(probs) <= count:
        return np.arange(len(probs))
    return np.argpartition(probs, len(probs) - count)[len(probs) - count:]


def _has_boolean_words(schema: dict[str, Any] | None) -> bool:
    return schema is not None and schema.get("type") == "boolean"


def _reason(error: str) -> str:
    """llguidance's error, on one line."""
    return " ".join(error.split())
