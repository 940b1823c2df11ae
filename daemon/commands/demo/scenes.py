"""Synthetic scenes for the demo model: 1-3 coloured shapes on a plain or noisy background.

The demo model in `npu/assets/demo_model/` was trained on exactly these scenes, so
`vlmd demo` draws one, sends it through the daemon and can check the caption that comes
back. The training script (tools/train_demo_model.py) and the accuracy script
(tools/eval_demo_model.py) import this module too: one generator, one caption grammar.

Contract:
- `draw_scene(rng_or_seed, size=(W, H)) -> (PIL.Image RGB, Scene)`; the same seed always
  draws the same image and scene.
- `Scene.caption()` is deterministic: shapes in reading order of their positions
  (left, top, centre, bottom, right), joined by "and", lower case, no punctuation, e.g.
  "a red circle on the left and a blue square on the right".
- `Scene.questions()` lists every question this module knows with its one right answer;
  `Scene.questions_by_type()` groups them by QUESTION_TYPES.
- `draw_scene_with_mask(seed, size)` also returns which shape covers each pixel (the
  demo model's training uses it for a per-region auxiliary loss).

Each shape sits in its own position slot, so a caption never has to tell two shapes at
the same place apart. Colours are chosen so that swapping R and B (a BGR bug) turns red
into blue and blue into red: a caption test with such shapes sees the bug.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 30),
    "green": (35, 190, 45),
    "blue": (35, 65, 230),
    "yellow": (240, 215, 30),
    "white": (245, 245, 245),
}
# Reading order of the slots; the caption lists shapes in this order.
POSITIONS = ("left", "top", "centre", "bottom", "right")
PHRASES = {
    "left": "on the left",
    "top": "at the top",
    "centre": "in the centre",
    "bottom": "at the bottom",
    "right": "on the right",
}
# Slot centres as fractions of (width, height).
_CENTRES = {
    "left": (0.2, 0.5),
    "top": (0.5, 0.2),
    "centre": (0.5, 0.5),
    "bottom": (0.5, 0.8),
    "right": (0.8, 0.5),
}
NUMBERS = ("zero", "one", "two", "three")
# The kinds of question Scene.questions() asks, named by their first two words.
QUESTION_TYPES = ("how many", "is there", "what colour", "where is")
# Prompts that ask for the caption; the first is vlmd's default caption prompt.
CAPTION_PROMPTS = (
    "Describe the image in one sentence.",
    "Describe the image shortly.",
    "Please describe the image shortly.",
    "Describe the image.",
    "Describe this image.",
    "Describe the picture.",
    "What is in the image?",
    "What is in this image?",
    "What is in the picture?",
    "What do you see?",
    "What can you see?",
    "What does the image show?",
    "Tell me what you see.",
    "Caption this image.",
)
DEFAULT_SIZE = (320, 240)

Seed = Union[int, np.random.Generator]


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    position: str  # one of POSITIONS
    radius: float  # fraction of min(width, height)

    def phrase(self) -> str:
        return f"a {self.colour} {self.kind} {PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in POSITIONS order
    background: str  # "plain" or "noisy"

    def caption(self) -> str:
        return " and ".join(shape.phrase() for shape in self.shapes)

    def questions(self) -> list[tuple[str, str]]:
        """Every (question, answer) pair with one right answer, in a fixed order."""
        pairs = [("how many shapes are there?", NUMBERS[len(self.shapes)])]
        kinds = [shape.kind for shape in self.shapes]
        for kind in KINDS:
            pairs.append((f"is there a {kind}?", "yes" if kind in kinds else "no"))
        for shape in self.shapes:
            if kinds.count(shape.kind) == 1:  # "the circle" must name one shape
                pairs.append((f"what colour is the {shape.kind}?", shape.colour))
                pairs.append((f"where is the {shape.kind}?", PHRASES[shape.position]))
        return pairs

    def questions_by_type(self) -> dict[str, list[tuple[str, str]]]:
        """`questions()` grouped by QUESTION_TYPES (types the scene has no question of are left out)."""
        grouped: dict[str, list[tuple[str, str]]] = {}
        for question, answer in self.questions():
            grouped.setdefault(question_type(question), []).append((question, answer))
        return grouped


def question_type(question: str) -> str:
    """Which of QUESTION_TYPES a question of `Scene.questions()` is: its first two words."""
    return " ".join(question.split()[:2])


def without_kinds(caption: str) -> str:
    """The caption with every shape kind replaced by "shape": the colours, places and count
    that colour-order, resize and splice bugs break, whatever the shapes are."""
    return " ".join("shape" if word in KINDS else word for word in caption.split(" "))


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def random_scene(seed: Seed) -> Scene:
    """Pick 1-3 shapes in distinct slots, each with a random kind, colour and size."""
    rng = _rng(seed)
    count = int(rng.integers(1, 4))
    slots = sorted(rng.choice(len(POSITIONS), size=count, replace=False))
    shapes = tuple(
        Shape(
            kind=KINDS[int(rng.integers(len(KINDS)))],
            colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
            position=POSITIONS[slot],
            radius=float(rng.uniform(0.08, 0.13)),
        )
        for slot in slots
    )
    background = "noisy" if rng.random() < 0.5 else "plain"
    return Scene(shapes=shapes, background=background)


def draw_scene(seed: Seed, size: tuple[int, int] = DEFAULT_SIZE) -> tuple[Image.Image, Scene]:
    """Draw a random scene at `size` (width, height); returns the RGB image and its scene."""
    rng = _rng(seed)
    scene = random_scene(rng)
    return render(scene, rng, size), scene


def draw_scene_with_mask(seed: Seed, size: tuple[int, int] = DEFAULT_SIZE):
    """`draw_scene` plus a shape map: uint8 (H, W), 0 where the background shows and
    i + 1 where `scene.shapes[i]` was drawn. Same seed, same image as `draw_scene`."""
    rng = _rng(seed)
    scene = random_scene(rng)
    image, mask = _render(scene, rng, size, with_mask=True)
    return image, scene, mask


def render(scene: Scene, seed: Seed, size: tuple[int, int] = DEFAULT_SIZE) -> Image.Image:
    """Draw `scene`; `seed` drives background, jitter of place and colour."""
    return _render(scene, _rng(seed), size, with_mask=False)[0]


def _render(scene: Scene, rng: np.random.Generator, size: tuple[int, int], with_mask: bool):
    width, height = size
    image = Image.fromarray(_background(scene.background, rng, width, height))
    draw = ImageDraw.Draw(image)
    mask = Image.new("L", size, 0) if with_mask else None
    unit = min(width, height)
    for index, shape in enumerate(scene.shapes):
        cx, cy = _CENTRES[shape.position]
        # Jitter stays small enough that neighbouring slots never overlap.
        x = (cx + rng.uniform(-0.04, 0.04)) * width
        y = (cy + rng.uniform(-0.04, 0.04)) * height
        colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[shape.colour])
        _draw_shape(draw, shape.kind, x, y, shape.radius * unit, colour)
        if mask is not None:  # the same geometry, no extra draws from rng
            _draw_shape(ImageDraw.Draw(mask), shape.kind, x, y, shape.radius * unit, index + 1)
    return image, (np.asarray(mask) if mask is not None else None)


def _background(kind: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # Dark, low-saturation backgrounds: every palette colour (white included) stands out.
    base = rng.integers(0, 90) + rng.integers(-15, 16, size=3)
    pixels = np.empty((height, width, 3), dtype=np.float32)  # (H, W, 3)
    pixels[:] = base
    if kind == "noisy":
        pixels += rng.normal(0.0, rng.uniform(8.0, 30.0), size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, r: float, colour) -> None:
    if kind == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif kind == "square":
        side = r * 0.85  # same visual area class as the circle
        draw.rectangle([x - side, y - side, x + side, y + side], fill=colour)
    elif kind == "triangle":
        draw.polygon(_star_points(x, y, r, r, 3), fill=colour)
    elif kind == "star":
        draw.polygon(_star_points(x, y, r * 1.15, r * 0.45, 5), fill=colour)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


def _star_points(x: float, y: float, outer: float, inner: float, tips: int) -> list[tuple[float, float]]:
    """Polygon of `tips` points pointing up; inner == outer gives a regular polygon."""
    points = []
    steps = tips if inner == outer else 2 * tips
    for i in range(steps):
        radius = outer if (i % 2 == 0 or inner == outer) else inner
        angle = -math.pi / 2 + 2 * math.pi * i / steps
        points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    return points
