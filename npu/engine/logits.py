"""Reading a post graph's logits without casting them: bf16 argmax and top-k order keys.

numpy computes slowly on bf16 (ml_dtypes), so both read the int16 bit patterns in place.
"""

from __future__ import annotations

import numpy as np

from npu.session import BF16


def argmax_logits(logits: np.ndarray) -> int:
    """Index of the largest logit (first on ties), reading bf16 logits in place.

    numpy's argmax on bf16 is slow; the int16 bit patterns order non-negative bf16
    values like the values, and negative ones in reverse, which a single argmax (or
    argmin when every value is negative) exploits.
    """
    if logits.dtype != BF16:
        return int(np.argmax(logits))
    bits = logits.view(np.int16)
    best = int(np.argmax(bits))
    return best if bits[best] >= 0 else int(np.argmin(bits))


def bf16_order_keys(logits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """int16 keys that order like the bf16 `logits` (NaN above +inf, -0 below +0).

    A non-negative bf16's bits already order like its value; a negative one's lower 15
    bits are flipped so that a larger magnitude gives a smaller key.
    """
    bits = logits.view(np.int16)
    out = np.empty(bits.shape, np.int16) if out is None else out
    np.right_shift(bits, 15, out=out)  # -1 where negative, else 0
    np.bitwise_and(out, 0x7FFF, out=out)
    np.bitwise_xor(out, bits, out=out)
    return out
