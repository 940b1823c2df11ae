"""Numpy kernels for the reference graphs, float32 in and out.

Each kernel computes what its transformers counterpart computes in float32 (same
formula, same order of the reductions where it matters), so reference graphs match
transformers to float32 rounding. `out=` arguments let the graphs reuse buffers.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
_SQRT2 = math.sqrt(2.0)
# erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z/2): a Chebyshev fit (Numerical Recipes'
# erfcc) with relative error below 1.2e-7 in exact arithmetic (numpy has no erf; exact
# GELU needs one good to float32 precision). Coefficients of P, lowest power first.
_ERFC_COEFFS = (
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
    0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
)
# Elementwise kernels run in blocks of this many floats, so that their dozens of passes
# stay in the core's cache instead of streaming a layer's activations through DRAM each
# time (GELU over InternViT's 257 x 4096 activations: 20 ms -> 6 ms per layer here).
BLOCK = 32768


def gelu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact (erf) GELU, x * Phi(x), as transformers' "gelu"; float32, into `out` (may be x).

    Computed as relu(x) - |x| * Phi(-|x|), with Phi(-|x|) = erfc(|x| / sqrt2) / 2 from the
    fit above: no cancellation on either side, absolute error within 2.5e-7 of the float64
    value; blocks of `BLOCK` elements, no allocation beyond four block buffers.
    """
    if out is None:
        out = np.empty(x.shape, F32)
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    size = min(BLOCK, flat_x.size)
    buffers = [np.empty(size, F32) for _ in range(4)]  # 4 x (block,)
    for start in range(0, flat_x.size, BLOCK):
        xb, ob = flat_x[start:start + BLOCK], flat_out[start:start + BLOCK]
        half_abs, z, t, value = (b[:xb.size] for b in buffers)
        np.abs(xb, out=half_abs)
        half_abs *= F32(0.5)  # |x| / 2
        np.multiply(half_abs, F32(_SQRT2), out=z)  # |x| / sqrt2
        np.multiply(z, F32(0.5), out=t)
        t += F32(1.0)
        np.reciprocal(t, out=t)
        np.multiply(t, F32(_ERFC_COEFFS[-1]), out=value)
        value += F32(_ERFC_COEFFS[-2])
        for coeff in _ERFC_COEFFS[-3::-1]:
            value *= t
            value += F32(coeff)
        np.multiply(z, z, out=z)
        value -= z
        np.exp(value, out=value)
        value *= t  # erfc(|x| / sqrt2) = 2 Phi(-|x|)
        value *= half_abs  # |x| Phi(-|x|)
        np.maximum(xb, F32(0.0), out=ob)  # xb may be ob: |x| was taken above
        ob -= value
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, in place in `gate` (rows of `BLOCK` elements at a time)."""
    rows, cols = gate.shape
    step = max(1, BLOCK // cols)
    sig_buffer = np.empty((min(step, rows), cols), F32)  # (block rows, cols)
    for start in range(0, rows, step):
        g, u = gate[start:start + step], up[start:start + step]
        sig = sig_buffer[:len(g)]
        np.negative(g, out=sig)
        np.exp(sig, out=sig)
        sig += F32(1.0)
        np.divide(g, sig, out=g)
        g *= u
    return gate


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """Qwen2RMSNorm over the last axis into `out` (may be x)."""
    variance = np.mean(np.square(x), axis=-1, keepdims=True)  # (n, 1)
    variance += eps
    inv_std = np.reciprocal(np.sqrt(variance, out=variance), out=variance)
    np.multiply(x, inv_std, out=out)
    out *= weight
    return out


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float, out: np.ndarray) -> np.ndarray:
    """torch LayerNorm over the last axis (biased variance) into `out` (may be x)."""
    mean = np.mean(x, axis=-1, keepdims=True)  # (n, 1)
    np.subtract(x, mean, out=out)
    variance = np.mean(np.square(out), axis=-1, keepdims=True)  # (n, 1)
    variance += eps
    inv_std = np.reciprocal(np.sqrt(variance, out=variance), out=variance)
    out *= inv_std
    out *= weight
    if bias is not None:
        out += bias
    return out


def norm(kind: str, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float, out: np.ndarray):
    """InternViT's configurable norm: "layer_norm" or "rms_norm"."""
    if kind == "layer_norm":
        return layer_norm(x, weight, bias, eps, out)
    return rms_norm(x, weight, eps, out)


def softmax_(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place."""
    scores -= np.max(scores, axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= np.sum(scores, axis=-1, keepdims=True)
    return scores


def rope_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """1 / theta^(2i/d) in float32, as transformers' default RoPE computes it."""
    exponent = np.arange(0, head_dim, 2, dtype=F32) / F32(head_dim)  # (half,)
    return (F32(1.0) / np.power(F32(theta), exponent)).astype(F32)


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of positions x inv_freq, each (n, half) float32."""
    angles = positions.astype(F32)[:, None] * inv_freq[None, :]  # (n, half)
    return np.cos(angles), np.sin(angles)


def apply_rope_(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE in place; x (n, heads, head_dim), cos/sin (n, head_dim/2)."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]  # (n, 1, half)
    rotated_1 = x1 * c - x2 * s
    x2 *= c
    x2 += x1 * s
    x1[...] = rotated_1
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Grouped-query softmax attention; q (n, heads, d), k/v (m, kv_heads, d), mask (n, m) additive.

    Returns (n, heads * d). Query head h reads KV head h // (heads / kv_heads), as
    transformers' repeat_kv does. Scores and softmax in float32.

    Runs in blocks of query rows (every head at once): scores, scale, mask, softmax and
    the product with V finish for one block while its scores are still in cache, and
    each block's GEMMs are small enough for the BLAS to run them on the calling thread
    (see `serial_rows`). Every row is computed as the whole-matrix formula computes it,
    so the result does not depend on the blocking.
    """
    n, heads, d = q.shape
    m, kv_heads, _ = k.shape
    group = heads // kv_heads
    rows = group * n  # query rows per KV head: (group, n) flattened
    qg = np.ascontiguousarray(q.reshape(n, kv_heads, group, d).transpose(1, 2, 0, 3)).reshape(kv_heads, rows, d)
    keys_t = np.ascontiguousarray(k.transpose(1, 2, 0))  # (kv_heads, d, m)
    values = np.ascontiguousarray(v.transpose(1, 0, 2))  # (kv_heads, m, d)
    step = serial_rows(d * m)
    context = np.empty((kv_heads, rows, d), F32)  # (kv_heads, group * n, d)
    score_buffer = np.empty((kv_heads, min(step, rows), m), F32)  # (kv_heads, block rows, m)
    scale = F32(d**-0.5)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        scores = score_buffer[:, :stop - start]
        np.matmul(qg[:, start:stop], keys_t, out=scores)
        scores *= scale
        if mask is not None:
            scores += _mask_rows(mask, start, stop)
        softmax_(scores)
        np.matmul(scores, values, out=context[:, start:stop])
    context = context.reshape(kv_heads, group, n, d).transpose(2, 0, 1, 3)  # (n, kv_heads, group, d)
    return context.reshape(n, heads * d)


def _mask_rows(mask: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The mask rows of flattened (group, n) query rows start..stop-1: (stop - start, m)."""
    n = mask.shape[0]
    if start // n == (stop - 1) // n:
        return mask[start % n:(stop - 1) % n + 1]  # one head of the group: a slice
    return mask[np.arange(start, stop) % n]


# OpenBLAS runs a GEMM on one thread when m * n * k <= 65536 * GEMM_MULTITHREAD_THRESHOLD (4).
SERIAL_GEMM_MNK = 65536 * 4


def serial_rows(mnk_per_row: int) -> int:
    """Rows per GEMM that keep m * n * k within `SERIAL_GEMM_MNK`: the BLAS then runs it on
    the calling thread.

    Attention issues many small GEMMs; a threaded BLAS wakes its pool for each, and on a
    busy machine waiting for a descheduled worker costs more than the GEMM (profiled: 50 %
    of a 2-thread vision encode went to that wait).
    """
    return max(1, SERIAL_GEMM_MNK // max(1, mnk_per_row))
