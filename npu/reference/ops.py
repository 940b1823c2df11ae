"""Numpy kernels for the reference graphs, float32 in and out.

Each kernel computes what its transformers counterpart computes in float32 (same
formula, same order of the reductions where it matters), so reference graphs match
transformers to float32 rounding. `out=` arguments let the graphs reuse buffers.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
_SQRT_HALF = 1.0 / math.sqrt(2.0)
# erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z/2): a Chebyshev fit with relative error
# below 1.2e-7 everywhere (numpy has no erf; exact GELU needs one good to float32 precision).
_ERFC_COEFFS = (
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
    0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
)


def erfc(x: np.ndarray) -> np.ndarray:
    """Complementary error function in float32 (fresh array), relative error about 1e-6."""
    z = np.abs(x).astype(F32)  # (…) |x|
    t = z * F32(0.5)
    t += F32(1.0)
    np.reciprocal(t, out=t)
    value = np.full_like(t, _ERFC_COEFFS[-1])
    for coeff in _ERFC_COEFFS[-2::-1]:
        value *= t
        value += F32(coeff)
    z *= z
    value -= z
    np.exp(value, out=value)
    value *= t
    negative = x < 0
    np.subtract(F32(2.0), value, out=value, where=negative)
    return value


def gelu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact (erf) GELU, x * Phi(x), as transformers' "gelu"; float32, into `out` (may be x)."""
    value = erfc(x * F32(-_SQRT_HALF))  # Phi(x) = erfc(-x / sqrt2) / 2
    value *= F32(0.5)
    if out is None:
        out = np.empty(x.shape, F32)
    np.multiply(x, value, out=out)
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, in place in `gate`."""
    sig = np.negative(gate)
    np.exp(sig, out=sig)
    sig += 1.0
    np.divide(gate, sig, out=gate)
    gate *= up
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
    """
    n, heads, d = q.shape
    m, kv_heads, _ = k.shape
    group = heads // kv_heads
    qg = q.reshape(n, kv_heads, group, d).transpose(1, 2, 0, 3).reshape(kv_heads, group * n, d)
    scores = serial_matmul(qg, k.transpose(1, 2, 0))  # (kv_heads, group * n, m)
    scores *= F32(d**-0.5)
    if mask is not None:
        scores.reshape(kv_heads, group, n, m)[...] += mask
    softmax_(scores)
    context = serial_matmul(scores, v.transpose(1, 0, 2))  # (kv_heads, group * n, d)
    context = context.reshape(kv_heads, group, n, d).transpose(2, 0, 1, 3)  # (n, kv_heads, group, d)
    return context.reshape(n, heads * d)


# OpenBLAS runs a GEMM on one thread when m * n * k <= 65536 * GEMM_MULTITHREAD_THRESHOLD (4).
_SERIAL_GEMM_MNK = 65536 * 4


def serial_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched a @ b, (batch, r, k) @ (batch, k, c) -> (batch, r, c), in row blocks small
    enough for the BLAS to run each GEMM on the calling thread.

    Attention issues many small GEMMs (one per head); a threaded BLAS wakes its pool
    for each, and on a busy machine waiting for a descheduled worker costs more than
    the GEMM (profiled: 50 % of a 2-thread vision encode went to that wait). Results
    are those of np.matmul: only the partition of the rows changes.
    """
    batch, rows, inner = a.shape
    cols = b.shape[-1]
    block = max(1, _SERIAL_GEMM_MNK // max(1, inner * cols))
    if block >= rows:
        return np.matmul(a, b)
    # Strided operands (attention's transposed views) would be copied by every call.
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    out = np.empty((batch, rows, cols), np.result_type(a, b))  # (batch, rows, cols)
    for start in range(0, rows, block):
        np.matmul(a[:, start:start + block], b, out=out[:, start:start + block])
    return out
