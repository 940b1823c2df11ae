"""Numpy kernels for the reference graphs, float32 in and out.

Each kernel computes what its transformers counterpart computes in float32 (same
formula, same order of the reductions where it matters), so reference graphs match
transformers to float32 rounding. `out=` arguments let the graphs reuse buffers.
"""

from __future__ import annotations

import math
import os

import numpy as np

F32 = np.float32
# erfc(z) ~ (a1 t + a2 t^2 + ... + a5 t^5) exp(-z^2), t = 1 / (1 + p z): Abramowitz & Stegun
# 7.1.26, absolute error below 1.5e-7 for every z >= 0 (numpy has no erf). GELU built on it
# stays within 3.5e-7 of the float64 value, as close as torch's own float32 gelu (1.2e-6).
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
# Elementwise kernels run in blocks of about this many floats, so that their many passes
# stay in the core's cache instead of streaming a layer's activations through DRAM each
# time (GELU over InternViT's 257 x 4096 activations: 20 ms -> 4.5 ms per layer here).
BLOCK = 32768


def gelu(x: np.ndarray, out: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """Exact (erf) GELU of x (+ bias over the last axis), x * Phi(x) as transformers' "gelu";
    float32, into `out` (may be x).

    Computed as relu(x) - |x| Phi(-|x|) with Phi(-|x|) = erfc(|x| / sqrt2) / 2 from the
    fit above (no 1 - Phi cancellation), in blocks of about `BLOCK` elements with three
    block buffers and no other allocation. `bias` is added block by block, in cache. `x`
    and `out` are contiguous.
    """
    if out is None:
        out = np.empty(x.shape, F32)
    cols = x.shape[-1] if bias is not None else 1  # without a bias any block of elements will do
    rows_x, rows_out = x.reshape(-1, cols), out.reshape(-1, cols)
    step = max(1, BLOCK // cols)
    buffers = [np.empty((min(step, len(rows_x)), cols), F32) for _ in range(3)]  # 3 x (block rows, cols)
    for start in range(0, len(rows_x), step):
        xb, ob = rows_x[start:start + step], rows_out[start:start + step]
        half_abs, t, value = (b[:len(xb)] for b in buffers)
        if bias is not None:
            np.add(xb, bias, out=ob)
            xb = ob
        np.abs(xb, out=half_abs)
        half_abs *= F32(0.5)  # |x| / 2
        np.multiply(half_abs, F32(_AS_P * math.sqrt(2.0)), out=t)  # p z, z = |x| / sqrt2
        t += F32(1.0)
        np.reciprocal(t, out=t)
        np.multiply(t, F32(_AS_A[4]), out=value)
        for coeff in _AS_A[3::-1]:
            value += F32(coeff)
            value *= t  # sum a_i t^i = erfc(z) exp(z^2)
        np.multiply(half_abs, half_abs, out=t)
        t *= F32(-2.0)  # -z^2 = -x^2 / 2
        np.exp(t, out=t)
        value *= t  # erfc(z) = 2 Phi(-|x|)
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

    Runs in blocks of query rows (every head at once): scores, mask, softmax and the
    product with V finish for one block while its scores are still in cache, and with
    a threaded BLAS each block's GEMMs are small enough to run on the calling thread
    (see `serial_rows`). Every row goes through the same operations as in the whole-matrix
    formula, so every block size gives that formula to float32 rounding (the bound is derived
    in tests/test_reference_ops.py). Bit-identical across block sizes only where the BLAS
    kernel sums a product the same way whatever the matrix size: OpenBLAS's SkylakeX kernels
    do, its Haswell ones do not, so nothing may rely on it.
    """
    n, heads, d = q.shape
    m, kv_heads, _ = k.shape
    group = heads // kv_heads
    rows = group * n  # query rows per KV head: (group, n) flattened
    scale = d**-0.5
    qg = np.empty((kv_heads, group, n, d), F32)  # (kv_heads, group, n, d)
    source = q.reshape(n, kv_heads, group, d).transpose(1, 2, 0, 3)
    if math.frexp(scale)[0] == 0.5:  # a power of two (head_dim 64): scaling q first is exact
        np.multiply(source, F32(scale), out=qg)
    else:
        qg[...] = source
    qg = qg.reshape(kv_heads, rows, d)
    step = serial_rows(d * m)
    keys_t, values = k.transpose(1, 2, 0), v.transpose(1, 0, 2)  # (kv_heads, d, m), (kv_heads, m, d)
    if step < rows:  # several products: numpy would copy strided operands for each one
        keys_t, values = np.ascontiguousarray(keys_t), np.ascontiguousarray(values)
    context = np.empty((kv_heads, rows, d), F32)  # (kv_heads, group * n, d)
    score_buffer = np.empty((kv_heads, min(step, rows), m), F32)  # (kv_heads, block rows, m)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        scores = score_buffer[:, :stop - start]
        np.matmul(qg[:, start:stop], keys_t, out=scores)
        if math.frexp(scale)[0] != 0.5:
            scores *= F32(scale)
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
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def blas_is_serial() -> bool:
    """True when numpy's BLAS runs every GEMM on the calling thread: its thread count set
    to 1 in the environment (read by OpenBLAS when numpy loads), or a single CPU."""
    for name in _THREAD_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value == "1"
    return (os.cpu_count() or 1) == 1


def serial_rows(mnk_per_row: int) -> int:
    """Rows per GEMM that keep m * n * k within `SERIAL_GEMM_MNK` under a threaded BLAS,
    which then runs it on the calling thread; all rows when the BLAS is serial anyway.

    Attention issues many small GEMMs; a threaded BLAS wakes its pool for each, and on a
    busy machine waiting for a descheduled worker costs more than the GEMM (profiled: 50 %
    of a 2-thread vision encode went to that wait). Splitting costs ~1 ms of a 7 ms
    InternViT attention at one thread, hence the serial case.
    """
    if _BLAS_SERIAL:
        return 1 << 30
    return max(1, SERIAL_GEMM_MNK // max(1, mnk_per_row))


_BLAS_SERIAL = blas_is_serial()
