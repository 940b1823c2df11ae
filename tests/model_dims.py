"""The tiny test models' dimensions and a test image maker, without torch.

tests/model_factory.py builds the checkpoints (and needs torch); tests that only need
these numbers or an image import them from here, so they run without the dev extra.
"""

from __future__ import annotations

import numpy as np

from tests.tokenizer_files import INTERNVL2_ADDED_TOKENS

IMAGE_SIZE = 224
PATCH = 14
DOWNSAMPLE = 0.5
N_IMAGE_TOKENS = int((IMAGE_SIZE // PATCH) ** 2 * DOWNSAMPLE**2)  # 64
IMAGE_TOKEN_ID = INTERNVL2_ADDED_TOKENS["<IMG_CONTEXT>"]
TEMPLATE = "Hermes-2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_image(seed: int = 0, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> np.ndarray:
    """A deterministic uint8 RGB image [height, width, 3] with some structure (gradients + noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)
