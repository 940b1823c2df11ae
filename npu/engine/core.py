"""The engine: one prompt in, a stream of token events out, on one preallocated KV cache.

`Engine(model)` reads every shape from the model's sessions (hidden size, KV capacity,
kv_dim, prefill chunk, history groups, vision input and output, post output kind) and
allocates all run state once: the KV cache and its decode mask, the prompt-embedding
rows, every graph input buffer, the prefill masks and the feed dicts. A request
allocates only what its size requires (its token ids, a sampler, a prefix snapshot);
a decode step allocates no arrays of its own and copies only the new K/V rows and the
next token's embedding row (greedy reads the logits in place).

`generate(prompt, options, should_stop)` runs, top to bottom:

1. tokenise the rendered chat prompt; refuse it (PromptTooLong) unless the prompt and
   one answer token fit the cache; check the `<IMG_CONTEXT>` count (ImageError);
2. restore a KV prefix snapshot when the image, system prompt and template match an
   earlier request (no vision run), else reset the cache, look the embeddings up and
   splice each image's vision features over its context rows; a follow-up resumes at
   the snapshot's end, or, when its question runs past what the prefill groups hold and
   its graph prices (given, or measured) say that is cheaper, restores only up to an
   earlier chunk start and replays the rest of the prefix from the snapshot's saved
   input rows (`prefix_replay`); a later turn of a conversation keeps (or restores)
   the conversation's rows and prefills only its own (npu.engine.conversation);
3. prefill (see `plan_prefill`): group 1 for a chunk at row 0, for a chunk at any later
   row the group with the smallest history that holds the cached rows (the rest of its
   history masked), the decode group one token at a time for rows no history holds;
4. decode: layers -> post -> sampling (or, with a format, the choice among the tokens it
   allows: npu.engine.constrain), until a stop token, the token budget (max_tokens,
   cut to what the cache holds: finish "length") or `should_stop()` (checked before
   every graph call: finish "cancelled");
5. yield a `TokenEvent` per answer token (UTF-8-safe text deltas; stop tokens are not
   emitted) and one `DoneEvent` with the text, usage and timings.

What differs between model families (how an image is fed to the vision graph and what
its outputs become, the position ids, what the host adds between layers) is asked of
the model's family (`model.family`, npu/families/): the engine holds, per prompt row,
its input planes (plane 0 the layer-0 input; plane p >= 1 added to the output of layer
`added_layers[p-1]` while the row is prefilled) and its rotary positions, and keeps a
token's rotary position apart from its KV row (the cache position) throughout.

The engine does not know MQTT, config files, image decoding, threads or requests: it
runs one prompt at a time and must not be shared between threads. It executes; the
decisions live beside it: `npu.engine.prompt` (tokenising, the request errors), `npu.engine.prefill`
(the plan and its price), `npu.engine.prefix` (which snapshot a follow-up reuses, and from
which row it prefills) and `npu.engine.logits` (bf16 logits read in place). Their public
names used by callers are re-exported by the package (npu/engine/__init__.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from npu.engine.constrain import ConstrainedAnswer, FormatCache, PostScores
from npu.engine.conversation import ConversationLimits, ConversationStore, TurnPlan
from npu.engine.events import DoneEvent, Event, GenerationOptions, TokenEvent
from npu.engine.kv_cache import KVCache, PrefixEntry, PrefixStore
from npu.engine.logits import argmax_logits, bf16_order_keys
from npu.engine.prefill import chunk_mask, open_history, plan_prefill
from npu.engine.prefix import (
    REPLAY_POLICIES,
    CachedRows,
    ParkedChats,
    cached_rows,
    find_follow_up,
    first_image_at,
    follow_up_start,
    prefix_key,
    reusable_rows,
)
from npu.engine.prompt import (
    EncodedPrompt,
    EngineError,
    ImageError,
    NumericError,
    Prompt,
    RequestError,
    UnsupportedOptions,
    check_fits,
    encode_prompt,
    with_format_hint,
)
from npu.engine.rows import PromptRows
from npu.engine.sampling import Sampler, top_k_indices
from npu.engine.stack import Cancelled as _Cancelled
from npu.engine.stack import SessionStack
from npu.engine.stops import StopStrings
from npu.families import family_of
from npu.image import ImagePreprocess
from npu.session import BF16, SessionError
from npu.shapes import GraphShapes, read_shapes
from npu.text.detokenizer import IncrementalDetokenizer


class Engine:
    """Runs prompts on a model's sessions with one KV cache allocated here, once."""

    def __init__(self, model: Any, max_prefixes: int = 4, prefix_replay: str = "auto",
                 prices: Mapping[int, float] | None = None, conversation_limits: ConversationLimits | None = None,
                 clock: Callable[[], float] = time.monotonic, reuse_cached_rows: bool = True) -> None:
        if prefix_replay not in REPLAY_POLICIES:
            raise ValueError(f"prefix_replay must be one of {REPLAY_POLICIES}, got {prefix_replay!r}")
        self.model = model
        self.prefix_replay = prefix_replay
        # Seconds per call of the whole layer stack, by shape group: what a follow-up's
        # prefill plan is priced with. `prices` (a board's published times, see
        # npu.engine.costs) are kept as given; without them, a moving average of what
        # this engine measured.
        self.stack_seconds: dict[int, float] = dict(prices or {})
        self._measure_prices = prices is None
        self.family = family_of(model)
        self.shapes: GraphShapes = read_shapes(model)
        s = self.shapes
        # A board data path may keep the KV cache in the graphs' own buffers and run the
        # layer stack on them (npu/board/zero_copy.py); anything else: host cache, sessions' run.
        data_path = getattr(model, "data_path", None)
        storage = data_path.kv_storage() if data_path is not None else None
        self.cache = KVCache(s.n_layers, s.capacity, s.kv_dim, s.kv_dtype, s.mask_dtype, storage=storage)
        self.prefixes = PrefixStore(max_prefixes)
        self.conversations = ConversationStore(conversation_limits, clock)
        self.formats = FormatCache(model.tokenizer, sorted(model.template.stop_ids))
        self._cached: CachedRows | None = None  # what the cache's rows hold, for automatic prefix reuse
        self.reuse_cached_rows = reuse_cached_rows  # False: every prompt pays its rows (benchmarks of a cold prompt)
        self.parked_chats = ParkedChats(2 if reuse_cached_rows else 0)  # chats' rows another prompt pushed out
        self._post_scores = PostScores(s.logits_index, s.topk_ids_index, s.topk_values_index)
        self._host_copies = 0  # bytes copied outside the cache
        self._layers = list(model.layers)
        stack = data_path.layer_stack(self.cache, s) if data_path is not None else None
        self._stack = stack or SessionStack(self._layers, self.cache, s.output_order)
        self._allocate()

    @property
    def bytes_copied(self) -> int:
        """Bytes the host has copied since construction: cache rows, embeddings, casts."""
        return self._host_copies + self.cache.bytes_written

    # ------------------------------------------------------------------ build

    def _allocate(self) -> None:
        s = self.shapes
        self._rows = PromptRows(self.family, s)  # input planes and rotary positions per cache row
        self._embeds = self._rows.embeds  # (capacity, hidden) prompt rows, a view
        self._token_input = np.zeros((1, 1, s.hidden), s.act_dtype)  # (1, 1, hidden)
        self._token_id = np.zeros(1, np.int64)  # (1,)
        self._position = np.zeros((1, 1), np.uint32)  # (1, 1)
        self._decode_feeds = [
            {"K_cache": k, "V_cache": v, "indices": self._position, "input": self._token_input,
             "mask": self.cache.decode_mask}
            for k, v in (self.cache.layer(i) for i in range(s.n_layers))
        ]
        self._prefill_feeds: dict[int, list[dict[str, np.ndarray]]] = {}
        self._history_masks: dict[int, tuple[np.ndarray, int]] = {}  # group -> (its mask, history length)
        if s.chunk:
            self._chunk_input = np.zeros((1, s.chunk, s.hidden), s.act_dtype)  # (1, chunk, hidden)
            self._chunk_indices = np.zeros((s.index_rows, s.chunk), np.uint32)  # (index_rows, chunk)
            self._prefill_feeds[1] = self._chunk_feeds(0)
            for history_len, group in s.history_groups.items():
                self._prefill_feeds[group] = self._chunk_feeds(history_len)
                self._history_masks[group] = (self._prefill_feeds[group][0]["mask"], history_len)
        self._post_input = np.zeros((1, 1, s.hidden), s.post_dtype)  # (1, 1, hidden)
        if s.vision_size is not None:
            self._pixels = self.family.input_buffer(s)  # the vision graph's input, as the family feeds it
        self._logits = np.zeros(s.vocab, np.float32) if s.vocab else None  # (vocab,) for the sampler
        self._order_keys = np.zeros(s.vocab, np.int16) if s.vocab else None  # (vocab,) bf16 top-k keys

    def _chunk_feeds(self, history_len: int) -> list[dict[str, np.ndarray]]:
        """Per-layer feeds of the prefill group whose history holds `history_len` cache rows."""
        s, mask = self.shapes, chunk_mask(self.shapes, history_len)
        # Group 1's K/V inputs are placeholders the graph ignores; their shape is the graph's.
        placeholder = np.zeros(s.first_chunk_kv_shape, s.kv_dtype)
        feeds = []
        for k, v in (self.cache.layer(i) for i in range(s.n_layers)):
            # History = the cache's leading rows: contiguous views, fed without a copy.
            history = (k[:, :history_len], v[:, :history_len]) if history_len else (placeholder, placeholder)
            feeds.append({"K_cache": history[0], "V_cache": history[1], "indices": self._chunk_indices,
                          "input": self._chunk_input, "mask": mask})
        return feeds

    # ------------------------------------------------------------------ generation

    def model_summary(self) -> dict[str, str | int | None]:
        """The loaded model's facts (npu.model.Model.summary): for the daemon's start log and stats."""
        return self.model.summary()

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """Tokens the prompt occupies in the cache, image tokens included."""
        return len(self._encode(prompt).ids)

    def _encode(self, prompt: Prompt) -> EncodedPrompt:
        return encode_prompt(self.model, self.shapes.image_tokens, prompt)

    def generate(self, prompt: Prompt, options: GenerationOptions | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Yield TokenEvents then one DoneEvent. Raises EngineError subclasses: a
        RequestError (PromptTooLong, ImageError, UnsupportedOptions) before any graph
        call, NumericError or EngineError when the graphs fail (`prompt_tokens` set)."""
        options = options or GenerationOptions()
        should_stop = should_stop or _never
        started = time.perf_counter()
        question = prompt.text if not prompt.messages else prompt.messages[-1].text
        if prompt.messages and prompt.conversation is not None:
            raise RequestError("conversation: a prompt of messages carries its whole history; it takes no conversation")
        if options.format is not None:  # the model is told the form too (npu.engine.formats)
            prompt = with_format_hint(prompt, options.format)
        self._check_options(options)
        plan = None if prompt.conversation is None else self.conversations.plan(
            prompt, self.model.template, self.shapes.image_tokens, self.shapes.capacity, options.max_tokens)
        encoded = plan.encoded if plan is not None and plan.encoded is not None else self._encode(prompt)
        rows = self.shapes.capacity if plan is None else plan.check_fits(encoded, self.shapes.capacity)
        check_fits(encoded, rows)
        num_prompt = len(encoded.ids)
        budget = min(options.max_tokens, rows - num_prompt)
        typed = None
        if options.format is not None or options.json_schema is not None:
            compiled = self.formats.compile(options.format, question, options.json_schema)
            typed = ConstrainedAnswer(compiled, budget, self._post_scores)
        sampler = Sampler(options.sampling_params())
        stops = StopStrings(options.stop)
        history = list(encoded.ids)  # what the repetition penalty sees: prompt and answer
        detok = IncrementalDetokenizer(self.model.tokenizer)
        stop_ids = frozenset() if options.ignore_stop else self.model.template.stop_ids
        timings: dict[str, Any] = {"image_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "prefix_reused": False,
                                   "images_encoded": 0}  # ttft_ms, decode_tokens_per_s once measurable
        pieces: list[str] = []
        answer_ids: list[int] = []
        finish = "length"
        cached, self._cached = self._cached, None  # known again only once this prompt's rows are written
        try:
            hidden = self._prefill(prompt, encoded, should_stop, timings, plan, cached)
            token = self._next_token(hidden, sampler, options, history, typed)
            first_token_at = time.perf_counter()
            timings["ttft_ms"] = _ms(first_token_at - started)
            while True:
                if token in stop_ids:
                    finish = "stop"
                    break
                delta, stopped = stops.push(detok.push(token))
                answer_ids.append(token)
                if stopped:  # the stop string's token is not counted
                    answer_ids.pop()
                    pieces.append(delta)
                    if delta:
                        yield TokenEvent(token, delta, len(pieces) - 1)
                    finish = "stop"
                    break
                pieces.append(delta)
                yield TokenEvent(token, delta, len(pieces) - 1)
                if typed is not None and typed.done:  # only the end may follow: no graph call for it
                    finish = "stop"
                    break
                if len(pieces) >= budget:
                    break
                history.append(token)
                self._token_id[0] = token
                self.model.embeddings.lookup(self._token_id, self._token_input[0])
                self._host_copies += self._token_input.nbytes
                hidden = self._decode_step(should_stop)
                token = self._next_token(hidden, sampler, options, history, typed)
        except _Cancelled:
            finish = "cancelled"
        except SessionError as exc:
            raise self._failed(EngineError(f"a graph failed: {exc}"), num_prompt) from exc
        except EngineError as exc:
            self._failed(exc, num_prompt)
            raise
        if "ttft_ms" in timings:
            decode_s = time.perf_counter() - first_token_at
            timings["decode_ms"] = _ms(decode_s)
            steps = max(len(pieces) - 1, 0)
            if steps and decode_s > 0:
                timings["decode_tokens_per_s"] = round(steps / decode_s, 2)
        # What the detokenizer still holds is the start of a character the answer stopped
        # inside (max_tokens, a stop token, a cancel): dropped, so `text` is exactly the deltas.
        detok.flush()
        held = stops.flush() if finish != "stop" else ""
        if held:  # a tail that could have begun a stop string: it did not, so it is sent
            pieces.append(held)
            yield TokenEvent(answer_ids[-1], held, len(pieces) - 1)
        text = "".join(pieces)
        extra = {} if typed is None else typed.final_fields(finish, timings)
        if plan is None:  # a conversation's rows are its store's to track
            self._cached = cached_rows(list(encoded.ids) + answer_ids, self.cache.position, encoded, prompt.images,
                                       self.shapes.image_tokens, chat=bool(prompt.messages))
        if plan is not None:
            turn = self.conversations.finish(plan, encoded, answer_ids, text, self.cache.position,
                                             finish in ("stop", "length"))
            notes = turn.pop("notes", []) + extra.pop("notes", [])
            extra.update(turn, **({"notes": notes} if notes else {}))
        yield DoneEvent(text, finish, num_prompt, len(answer_ids), timings, extra)

    def forget_conversation(self, conversation_id: str, owner: str | None = None) -> bool:
        """Drop a conversation and its KV snapshot (a reset); True when it existed.
        With `owner`: ConversationNotYours when another owner opened it."""
        return self.conversations.forget(conversation_id, owner=owner)

    def conversation_stats(self) -> dict[str, int]:
        return self.conversations.stats()

    def _check_options(self, options: GenerationOptions) -> None:
        """Refuse, before any graph call, what this model's graphs cannot do."""
        s = self.shapes
        if s.topk_ids_index is not None and s.topk_values_index is None and not options.is_plain_greedy:
            raise UnsupportedOptions("this model's post graph returns token ids without scores: only greedy decoding"
                                     " works (temperature 0, repetition_penalty 1)")

    def _failed(self, error: EngineError, num_prompt: int) -> EngineError:
        """`error` with the usage so far; NaN rows may sit in stored prefixes: drop them."""
        error.prompt_tokens = num_prompt
        if isinstance(error, NumericError):
            self.prefixes.clear()
            self.parked_chats.clear()
            if self.conversations.live is not None:  # its rows may hold them too
                self.conversations.forget(self.conversations.live, "its KV rows held non-finite values")
        return error

    # ------------------------------------------------------------------ prefill

    def _prefill(self, prompt: Prompt, encoded: EncodedPrompt, should_stop: Callable[[], bool],
                 timings: dict[str, Any], plan: TurnPlan | None = None, cached: CachedRows | None = None) -> np.ndarray:
        """Fill the cache with the prompt; return the last row's hidden state [1, 1, hidden].
        A later conversation turn prefills only the rows after the conversation's cached ones;
        any other prompt keeps the rows it shares with what the cache holds (`cached`) when
        that is more than a stored prefix snapshot gives."""
        ids, end = encoded.ids, len(encoded.ids)
        if plan is not None and plan.encoded is not None:
            key, entry = None, None
            self.parked_chats.park(cached, self.cache)
            start = self.conversations.place(self.cache, plan)
            timings["history_rows"] = start
        else:
            key = prefix_key(prompt, self.model.template.name)
            entry = find_follow_up(self.prefixes, key, encoded)
            reuse = plan is None and self.reuse_cached_rows
            kept = reusable_rows(cached, encoded, prompt.images, self.shapes.image_tokens) if reuse else 0
            parked, index = self.parked_chats.best(encoded, prompt.images, self.shapes.image_tokens) if reuse else (0, None)
            if max(kept, parked) > (entry.snapshot.length if entry is not None else 0):
                key, entry = None, None  # the cache's own rows (or a parked chat's) go further than the snapshot
                self.conversations.park(self.cache)
                if parked > kept:
                    snapshot = self.parked_chats.take(index, parked)
                    self.parked_chats.park(cached, self.cache)
                    self.cache.restore(snapshot, parked)
                else:
                    if cached is not None and kept < len(cached.ids):  # the rows it cuts may be another chat's
                        self.parked_chats.park(cached, self.cache)
                    self.cache.rewind(kept)
                start = max(kept, parked)
            else:
                self.parked_chats.park(cached, self.cache)
                start = self._place_prefix(entry, end)
        timings["prefix_reused"] = entry is not None or start > 0
        timings["cached_rows"] = start
        self._rows.set_positions(encoded.ids, self.model.template.image_context_id)
        self._fill_embeds(ids, start, entry)
        for rows, features in plan.stored_features if plan is not None else ():
            self._rows.put(rows, features)  # earlier turns' images (all planes), prefilled again
        first_image = first_image_at(encoded.context_rows, self.shapes.image_tokens, start)
        if entry is None and len(prompt.images) > first_image:
            image_started = time.perf_counter()
            self._encode_images(prompt.images, encoded.context_rows, should_stop, first_image)
            timings["image_ms"] = _ms(time.perf_counter() - image_started)
            timings["images_encoded"] = len(prompt.images) - first_image
        if plan is not None and prompt.images:  # kept so the turn can be prefilled again later
            source = entry.embeds if entry is not None else self._rows.planes
            plan.features = source[encoded.context_rows].copy()  # (num_images * image_tokens, planes, hidden)
        prefill_started = time.perf_counter()
        hidden = self._run_plan(start, end, should_stop)
        timings["prefill_ms"] = _ms(time.perf_counter() - prefill_started)
        timings["prefill_rows"] = end - start
        n_prefix = encoded.num_prefix_ids
        if key is not None and entry is None and 0 < n_prefix < end:  # first ask on these images
            self.prefixes.put(key, ids[:n_prefix], self.cache.snapshot(n_prefix),
                              self._rows.planes[:n_prefix].copy())
        return hidden

    def _run_plan(self, start: int, end: int, should_stop: Callable[[], bool]) -> np.ndarray:
        """Cache rows start..end-1 from `_embeds` through the planned groups -> the last
        row's hidden state [1, 1, hidden]."""
        s, hidden = self.shapes, None
        for group, row, size in plan_prefill(start, end, s.chunk, s.history_groups):
            if group == 0:
                np.copyto(self._token_input[0, 0], self._embeds[row])
                self._host_copies += self._token_input.nbytes
                hidden = self._decode_step(should_stop, row)
            else:
                hidden = self._chunk_step(group, row, size, should_stop)
        return hidden

    def _place_prefix(self, entry: PrefixEntry | None, end: int) -> int:
        """Restore the follow-up's snapshot (up to where its prefill starts) or empty the
        cache; return the first cache row the prefill fills."""
        self.conversations.park(self.cache)  # a live conversation's rows are copied out first
        if entry is None:
            self.cache.reset()
        else:
            start = follow_up_start(entry, end, self.shapes, self.prefix_replay, self.stack_seconds)
            self.cache.restore(entry.snapshot, start)
        return self.cache.position

    def _fill_embeds(self, ids: list[int], start: int, entry: PrefixEntry | None) -> None:
        """Input rows start..len(ids)-1: a replayed prefix's rows come from the snapshot's
        saved inputs (image features included), every later row from the embedding table."""
        end, lookup_from = len(ids), start
        if entry is not None and start < entry.snapshot.length:
            lookup_from = entry.snapshot.length
            self._rows.put(slice(start, lookup_from), entry.embeds[start:lookup_from])
        self._rows.text_rows(lookup_from, end)
        self.model.embeddings.lookup(np.asarray(ids[lookup_from:], np.int64), self._embeds[lookup_from:end])
        self._host_copies += self._embeds[start:end].nbytes

    def _encode_images(self, images: Sequence[np.ndarray], rows: np.ndarray,
                       should_stop: Callable[[], bool], first: int = 0) -> None:
        """Vision features of images[first:] over their context rows (every plane the family feeds)."""
        s, vision, family = self.shapes, self.model.vision, self.family
        preprocess = getattr(self.model, "preprocess", None) or ImagePreprocess()
        for k, image in enumerate(images):
            if k < first:
                continue
            try:
                pixels = family.prepare_image(preprocess, image, self._pixels, s)
            except ValueError as exc:
                raise ImageError(f"image {k}: {exc}") from None
            if should_stop():
                raise _Cancelled
            try:
                outputs = vision.run({s.vision_input_name: pixels}, 0)
            except SessionError as exc:
                raise EngineError(f"the vision graph failed: {exc}") from exc
            copied = self._rows.put_image(rows[k * s.image_tokens:(k + 1) * s.image_tokens], outputs)
            self._host_copies += copied * self._embeds.itemsize

    # ------------------------------------------------------------------ graph calls

    def _run_layers(self, group: int, feeds: list[dict[str, np.ndarray]], num_rows: int,
                    should_stop: Callable[[], bool], row: int | None = None) -> np.ndarray:
        """Every layer on the group's input buffer (the stack writes the new K/V rows); advance once.
        `row`: the first prompt row of a prefill step, whose added planes (if any) the stack adds."""
        started = time.perf_counter()
        added = self._rows.added(row, num_rows) if row is not None else None
        hidden = self._stack.run(group, feeds, num_rows, should_stop, added)  # (1, 1, hidden): the last real row
        self.cache.advance(num_rows)
        if self._measure_prices:
            elapsed = time.perf_counter() - started
            previous = self.stack_seconds.get(group)
            self.stack_seconds[group] = elapsed if previous is None else 0.75 * previous + 0.25 * elapsed
        return hidden

    def _decode_step(self, should_stop: Callable[[], bool], row: int | None = None) -> np.ndarray:
        """The token in `_token_input` -> its hidden state [1, 1, hidden]. Its K/V row is the
        cache position; its rotary position is that row's in `_rows.rope` (the two differ after an
        image whose positions advance by less than its rows). `row`: a prompt row, not an answer token."""
        self._position[0, 0] = self._rows.rope[0, self.cache.position]
        return self._run_layers(0, self._decode_feeds, 1, should_stop, row)

    def _chunk_step(self, group: int, row: int, size: int, should_stop: Callable[[], bool]) -> np.ndarray:
        """Prompt rows row..row+size-1 through a prefill group -> the last row's hidden state."""
        s = self.shapes
        self._chunk_input[0, :size] = self._embeds[row:row + size]
        self._chunk_input[0, size:] = 0  # padding rows: their K/V rows are never attended
        self._host_copies += self._chunk_input.nbytes
        np.copyto(self._chunk_indices, self._rows.rope[:, row:row + s.chunk])  # padding rows: positions after
        if group in self._history_masks:  # history columns past the cached rows stay blocked
            open_history(*self._history_masks[group], cached_rows=row)
        return self._run_layers(group, self._prefill_feeds[group], size, should_stop, row)

    def _run_post(self, hidden: np.ndarray) -> list[np.ndarray]:
        s = self.shapes
        if hidden.dtype != s.post_dtype:
            np.copyto(self._post_input, hidden)
            self._host_copies += self._post_input.nbytes
            hidden = self._post_input
        return self.model.post.run({s.post_input_name: hidden}, 0)

    def _next_token(self, hidden: np.ndarray, sampler: Sampler, options: GenerationOptions,
                    history: Sequence[int], typed: ConstrainedAnswer | None = None) -> int:
        if typed is not None:  # the post graph runs only when the format leaves a choice
            return typed.choose(lambda: self._run_post(hidden), sampler, history)
        s = self.shapes
        outputs = self._run_post(hidden)
        if s.topk_ids_index is not None:
            ids = outputs[s.topk_ids_index].reshape(-1)
            if s.topk_values_index is None:  # greedy only (_check_options); no score to check
                return int(ids[0])
            values = outputs[s.topk_values_index].reshape(-1).astype(np.float32)
            return sampler.sample_candidates(values, ids, history)
        logits = outputs[s.logits_index].reshape(-1)  # (vocab,)
        if options.is_plain_greedy:
            token = argmax_logits(logits)  # in place: no copy of the logits
            # argmax prefers NaN and +inf: checking the chosen logit catches a bf16 overflow, O(1) per token
            if not math.isfinite(logits[token]):
                raise NumericError(f"the model produced a non-finite logit ({float(logits[token])}) for token {token}:"
                                   " a numeric overflow in the graphs")
            return token
        if logits.dtype == np.float32:
            return sampler.sample(logits, history)  # the sampler never writes into its input
        if logits.dtype == BF16 and 0 < options.top_k < logits.size and options.repetition_penalty == 1.0:
            # Top-k straight from the bf16 logits: only the k candidates are cast to float32.
            ids = top_k_indices(bf16_order_keys(logits, out=self._order_keys), options.top_k)  # (k,) ascending
            values = logits[ids].astype(np.float32)  # (k,)
            self._host_copies += values.nbytes
            return sampler.sample_candidates(values, ids, history)
        np.copyto(self._logits, logits)  # bf16 -> float32: numpy computes slowly on bf16
        self._host_copies += self._logits.nbytes
        return sampler.sample(self._logits, history)


def _never() -> bool:
    return False


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
