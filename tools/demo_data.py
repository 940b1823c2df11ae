"""Training data for the demo model (tools/train_demo_model.py): drawn scenes, the
conversations asked about them, their token ids and the auxiliary labels.

- `Mix` says what a step asks about each scene: conversations of 1-3 turns (the image in
  the first turn only, as vlmd sends a conversation), each turn a caption, a question
  (sometimes with a format hint) or an out-of-world prompt; plus a few conversations
  without an image.
- `encode_conversation` renders turns with the checkpoint's chat template pieces, as
  `ChatTemplate.render_conversation` does, and tokenises them in pieces so the answer spans
  and the question's kind word are known by position.
- `make_batch` draws the scenes and returns a `Batch` of padded tensors; `BatchStream`
  builds batches on a thread ahead of the training loop, in the same order, so the run
  stays seeded.
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from daemon.commands.demo import questions as scene_questions, scenes
from npu.text.template import Turn
from out_of_world import out_of_world_prompt

IMAGE_SIZE = 224
NUM_IMAGE_TOKENS = 64  # (224 / 14)^2 patches * 0.5^2 pixel shuffle
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Source frame sizes the training draws (the engine resizes any frame to 224x224).
FRAME_SIZES = ((224, 224), (320, 240), (256, 192), (288, 288), (240, 320))
# What the auxiliary head reads off each image token, and the Shape attribute it comes from.
AUX_FIELDS = {"kind": scenes.KINDS, "colour": tuple(scenes.COLOURS), "place": scenes.POSITIONS}
AUX_ATTRS = ("kind", "colour", "position")
AUX_MIN_COVER = 0.2  # a shape labels an image token when it covers this much of its cell
AUX_SIZES = tuple(1 + len(values) for values in AUX_FIELDS.values())
QUESTION_FACT_SIZES = (2, 1 + len(scenes.COLOURS), 1 + len(scenes.POSITIONS))
NO_FACTS = [-100, -100, -100]


@dataclass(frozen=True)
class Mix:
    """What one step asks about each scene."""

    first_turns: tuple[str, ...] = ("caption", "question", "question")  # one conversation each
    turn_weights: tuple[float, ...] = (0.45, 0.35, 0.2)  # 1, 2, 3 turns
    later_caption: float = 0.1  # a later turn asks for the caption ...
    out_of_world: float = 0.12  # ... or something out of world (also a first question's share)
    typed: float = 0.3  # share of questions with a format hint
    text_only: int = 2  # conversations without an image, per step (every prompt gets the reply)
    several_images: int = 1  # conversations about 2-3 of the step's images at once (the same)
    caption_weight: float = 1.0  # the caption tokens' share of the answer loss, the other answers' being 1


# ---- what is asked ---------------------------------------------------------------------

def _turn(scene: scenes.Scene | None, rng: random.Random, wanted: str, mix: Mix) -> scene_questions.Asked:
    if wanted == "caption" and scene is not None:
        return scene_questions.draw_caption(scene, rng)
    if scene is None:  # without an image every prompt gets the reply, the demo's own questions too
        return _reply(out_of_world_prompt(rng, "train") if rng.random() < 0.5 else _any_question(rng))
    if wanted == "out of world":
        text = out_of_world_prompt(rng, "train")
        if rng.random() < 0.1:  # a format hint does not make it a question about shapes
            text = scene_questions.with_hint(text, rng.choice(("boolean", "number")))
        return _reply(text)
    return scene_questions.draw_question(scene, rng, typed=mix.typed)


def _reply(text: str) -> scene_questions.Asked:
    return scene_questions.Asked(text, scene_questions.OUT_OF_WORLD_REPLY, "out of world", "", "plain")


def _any_question(rng: random.Random) -> str:
    """A caption prompt or a question about some scene (its text only)."""
    scene = scenes.random_scene(rng.randrange(2**31))
    if rng.random() < 0.3:
        return scene_questions.draw_caption(scene, rng).text
    return scene_questions.draw_question(scene, rng).text


def conversations(scene: scenes.Scene | None, rng: random.Random, mix: Mix) -> list[list[scene_questions.Asked]]:
    """The conversations one step has about `scene` (None: one without an image)."""
    starts = mix.first_turns if scene is not None else ("out of world",)
    talks = []
    for first in starts:
        if first == "question" and rng.random() < mix.out_of_world:
            first = "out of world"
        turns = [_turn(scene, rng, first, mix)]
        count = rng.choices(range(1, len(mix.turn_weights) + 1), weights=mix.turn_weights)[0]
        for _ in range(count - 1):
            pick = rng.random()
            later = ("caption" if pick < mix.later_caption else
                     "out of world" if pick < mix.later_caption + mix.out_of_world else "question")
            turns.append(_turn(scene, rng, later, mix))
        talks.append(turns)
    return talks


# ---- token ids -------------------------------------------------------------------------

@dataclass
class Encoded:
    ids: list[int]
    answers: list[tuple[int, int, str]]  # (first, end) ids of each answer + its separator; its type
    kind_words: list[tuple[int, str, int]]  # (position, kind, turn) of each question's shape kind word
    num_prefix_ids: int  # ids before the first question (system, user role, image)


def encode_conversation(template, turns: list[Turn], image_tokens: int = NUM_IMAGE_TOKENS,
                        types: list[str] | None = None) -> Encoded:
    """Ids of `ChatTemplate.render_conversation(turns)`; with every answer given (training)
    the last one is followed by its separator, the stop token the model must learn. Encoded
    in pieces (user text as plain text, as the engine encodes questions) so that answers
    and kind words are known by position."""
    spec, tok = template.spec, template.tokenizer
    sep_id = tok.encode(spec.sep.strip())
    kind_ids = {tok.token_id("\u0120" + kind): kind for kind in scenes.KINDS}
    ids = tok.encode(spec.system_template.format(system=template.system_message) + spec.sep)
    answers, kind_words, num_prefix = [], [], 0
    for turn, (question, num_images, answer) in enumerate(turns):
        ids += tok.encode(spec.user_role + template.image_blocks(num_images, image_tokens))
        num_prefix = num_prefix or len(ids)
        question_ids = tok.encode(question, parse_special=False)
        kinds = [(i, kind_ids[t]) for i, t in enumerate(question_ids) if t in kind_ids]
        if kinds:
            kind_words.append((len(ids) + kinds[-1][0], kinds[-1][1], turn))
        ids += question_ids + tok.encode(spec.sep + spec.assistant_role)
        if answer is None:
            break
        answer_ids = tok.encode(answer, parse_special=False) + sep_id
        answers.append((len(ids), len(ids) + len(answer_ids), (types or ["?"] * len(turns))[turn]))
        ids += answer_ids
    return Encoded(ids, answers, kind_words, num_prefix)


def question_facts(scene: scenes.Scene, kind: str) -> list[int]:
    """What the image says about a shape kind: present (0/1), its colour and place
    (1-based; 0 when absent; -100 when several shapes share the kind)."""
    same = [shape for shape in scene.shapes if shape.kind == kind]
    if len(same) == 1:
        return [1, 1 + list(scenes.COLOURS).index(same[0].colour), 1 + scenes.POSITIONS.index(same[0].position)]
    return [int(bool(same)), -100 if same else 0, -100 if same else 0]


# ---- images ----------------------------------------------------------------------------

def cell_labels(scene: scenes.Scene, mask: np.ndarray) -> np.ndarray:
    """Per image token (8x8 grid over the 224x224 input, row-major as InternVL's pixel
    shuffle orders them): the kind, colour and place (slot) of the shape covering it,
    as int64 (3, 64). 0 = background; -100 (ignored) where a shape covers the cell only
    slightly."""
    small = np.asarray(Image.fromarray(mask).resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST))
    grid, cell = int(NUM_IMAGE_TOKENS ** 0.5), IMAGE_SIZE // int(NUM_IMAGE_TOKENS ** 0.5)
    cells = small.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(NUM_IMAGE_TOKENS, cell * cell)
    labels = np.zeros((len(AUX_FIELDS), NUM_IMAGE_TOKENS), np.int64)  # (fields, 64)
    for index, shape in enumerate(scene.shapes):
        cover = (cells == index + 1).mean(axis=1)  # (64,)
        labels[:, cover > 0] = -100
        for field, values in enumerate(AUX_FIELDS.values()):
            labels[field, cover >= AUX_MIN_COVER] = 1 + values.index(getattr(shape, AUX_ATTRS[field]))
    return labels


def pixel_values(images: list[Image.Image]):
    """RGB frames -> normalised float [B,3,224,224], as the vision graph normalises uint8 input."""
    arrays = [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for im in images]
    batch = np.stack(arrays).astype(np.float32) / 255.0  # (B, 224, 224, 3)
    batch = (batch - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())  # (B, 3, 224, 224)


# ---- batches ---------------------------------------------------------------------------

@dataclass
class Batch:
    pixels: object  # float [B, 3, 224, 224]
    cells: object  # long [B, 3, 64]: aux labels (kind, colour, place) per image token
    image_index: object  # long [N]: the one image a sequence shows, -1 for none or several
    row_images: list  # per sequence: the images it shows, in prompt order
    num_prefix: int  # ids every sequence with an image shares (system, user role, image)
    input_ids: object  # long [N, T]
    attention: object  # long [N, T]
    labels: object  # long [N, T]: -100 except the answers and their separators
    weights: object  # float [N, T]: each label's share of the answer loss
    segments: object  # long [N, T]: which answer a label belongs to, -1 elsewhere
    segment_types: list  # per answer: "caption", a question type or "out of world"; ":later" after turn 1
    segment_forms: list  # per answer: its phrasing and hint ("Is there a {colour} {kind}? / boolean")
    fact_rows: object  # long [F]: sequence of each question that names a shape kind
    fact_at: object  # long [F]: where its kind word sits
    facts: object  # long [F, 3]: about that kind: present?, colour, place (0 none, -100 unknown)


def make_batch(np_rng, py_rng, template, mix: Mix, images: int, text: bool = True) -> Batch:
    """`images` freshly drawn scenes and, when `text`, the conversations `mix` asks about them."""
    frames, cells, drawn = [], [], []
    for _ in range(images):
        size = FRAME_SIZES[py_rng.randrange(len(FRAME_SIZES))]
        image, scene, mask = scenes.draw_scene_with_mask(np_rng, size=size)
        frames.append(image)
        cells.append(cell_labels(scene, mask))
        drawn.append(scene)
    talks = []  # (images shown, scene or None, turns)
    if text:
        talks = [([i], scene, turns) for i, scene in enumerate(drawn) for turns in conversations(scene, py_rng, mix)]
        talks += [([], None, turns) for _ in range(mix.text_only) for turns in conversations(None, py_rng, mix)]
        for _ in range(mix.several_images if images > 1 else 0):
            shown = py_rng.sample(range(images), py_rng.randint(2, min(3, images)))
            talks += [(shown, None, turns) for turns in conversations(None, py_rng, mix)]
    encoded, forms = [], []
    for shown, scene, turns in talks:
        types = [t.type if k == 0 else t.type + ":later" for k, t in enumerate(turns)]
        ask = [Turn(t.text, len(shown) if k == 0 else 0, t.answer) for k, t in enumerate(turns)]
        encoded.append(encode_conversation(template, ask, types=types))
        forms += [f"{t.form or t.type} / {t.hint}" for t in turns]
    batch = _tensors(pixel_values(frames), np.stack(cells), talks, encoded, mix.caption_weight)
    batch.segment_forms = forms
    return batch


def _tensors(pixels, cells, talks, encoded: list[Encoded], caption_weight: float) -> Batch:
    count, length = len(encoded), max((len(e.ids) for e in encoded), default=0)
    input_ids = torch.zeros((count, length), dtype=torch.long)  # (N, T) pad 0, never attended
    labels = torch.full((count, length), -100, dtype=torch.long)  # (N, T)
    weights = torch.zeros((count, length))  # (N, T)
    segments = torch.full((count, length), -1, dtype=torch.long)  # (N, T)
    attention = torch.zeros((count, length), dtype=torch.long)  # (N, T)
    captions = [end - first for e in encoded for first, end, kind in e.answers if kind.startswith("caption")]
    others = sum(1 for e in encoded for _, _, kind in e.answers if not kind.startswith("caption"))
    segment_types, fact_rows, fact_at, facts = [], [], [], []
    for row, e in enumerate(encoded):
        input_ids[row, : len(e.ids)] = torch.tensor(e.ids)
        attention[row, : len(e.ids)] = 1
        for first, end, kind in e.answers:
            labels[row, first:end] = torch.tensor(e.ids[first:end])
            # The mean over caption tokens plus the mean over other answers: a one-word answer
            # teaches as much binding as a caption.
            weights[row, first:end] = (caption_weight / sum(captions) if kind.startswith("caption")
                                       else 1 / (others * (end - first)))
            segments[row, first:end] = len(segment_types)
            segment_types.append(kind)
        _, scene, turns = talks[row]
        for at, kind, turn in e.kind_words:
            if turns[turn].type in scenes.QUESTION_TYPES:
                fact_rows.append(row)
                fact_at.append(at)
                facts.append(question_facts(scene, kind))
    one_image = [len(shown) == 1 for shown, _, _ in talks]
    with_image = [e.num_prefix_ids for one, e in zip(one_image, encoded) if one]
    image_index = [shown[0] if one else -1 for (shown, _, _), one in zip(talks, one_image)]
    return Batch(pixels=pixels, cells=torch.from_numpy(cells), image_index=torch.tensor(image_index, dtype=torch.long),
                 row_images=[shown for shown, _, _ in talks], num_prefix=min(with_image, default=0),
                 input_ids=input_ids, attention=attention, labels=labels, weights=weights, segments=segments,
                 segment_types=segment_types, segment_forms=[], fact_rows=torch.tensor(fact_rows, dtype=torch.long),
                 fact_at=torch.tensor(fact_at, dtype=torch.long),
                 facts=torch.tensor(facts, dtype=torch.long).reshape(-1, 3))


class BatchStream:
    """Batches built on a thread ahead of the training loop (drawing scenes and tokenising
    is Python work the second core otherwise idles through); the same seed gives the same
    batches in the same order. `schedule` is [(images, text)] per step."""

    def __init__(self, seed: int, template, mix: Mix, schedule: list[tuple[int, bool]], ahead: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        args = (np.random.default_rng(seed), random.Random(seed), template, mix, schedule)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
        self._thread.start()

    def _run(self, np_rng, py_rng, template, mix, schedule) -> None:
        try:
            for images, text in schedule:
                self._queue.put(make_batch(np_rng, py_rng, template, mix, images, text))
        except BaseException as exc:  # handed to the loop, which raises it
            self._queue.put(exc)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item
