"""npu/reference/ops.py kernels: blocked attention, GELU and SiLU against their plain formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from npu.reference import ops

F32 = np.float32


def plain_attention(q, k, v, mask):
    """The whole-matrix formula (transformers' eager attention with repeat_kv), float32."""
    n, heads, d = q.shape
    group = heads // k.shape[1]
    keys, values = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # (m, heads, d)
    scores = np.einsum("nhd,mhd->hnm", q, keys) * F32(d**-0.5)
    if mask is not None:
        scores = scores + mask
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.einsum("hnm,mhd->nhd", scores, values).reshape(n, heads * d)


@pytest.mark.parametrize("serial_blas", [False, True], ids=["threaded-blas", "serial-blas"])
@pytest.mark.parametrize("n, heads, kv_heads, m", [(257, 16, 16, 257), (128, 14, 2, 128), (1, 14, 2, 1000),
                                                   (5, 4, 2, 9), (40, 14, 2, 168)])
def test_attention_equals_the_plain_formula_and_keeps_gemms_serial(monkeypatch, serial_blas, n, heads, kv_heads, m):
    monkeypatch.setattr(ops, "_BLAS_SERIAL", serial_blas)
    rng = np.random.default_rng(n + m)
    q = rng.standard_normal((n, heads, 64), dtype=F32)
    k, v = (rng.standard_normal((m, kv_heads, 64), dtype=F32) for _ in range(2))
    mask = None
    if m >= n:  # causal over the last n keys, as a prefill chunk after m - n history rows
        mask = np.where(np.arange(m)[None, :] > np.arange(n)[:, None] + (m - n), F32(-65536.0), F32(0.0))
    sizes, real = [], np.matmul

    def spy(x, y, out=None):
        sizes.append(x.shape[-2] * x.shape[-1] * y.shape[-1])
        return real(x, y, out=out)

    with monkeypatch.context() as patch:
        patch.setattr(ops.np, "matmul", spy)
        got = ops.attention(q, k, v, mask)
    assert got.shape == (n, heads * 64) and got.dtype == F32
    np.testing.assert_allclose(got, plain_attention(q, k, v, mask), rtol=2e-5, atol=2e-6)
    if serial_blas:  # one QK and one PV product over all rows: nothing to gain from splitting
        assert len(sizes) == 2
    else:
        assert sizes and max(sizes) <= ops.SERIAL_GEMM_MNK


def test_blas_threads_are_read_from_the_environment(monkeypatch):
    for name in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ops.blas_is_serial()
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")  # OpenBLAS's own variable wins
    assert not ops.blas_is_serial()


UNIT_ROUNDOFF = 2.0**-24  # float32


def gamma(n: int) -> float:
    """Higham's bound on the relative error of an n-term float32 sum in any order."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def attention_and_rounding_bound(q, k, v, mask):
    """The attention formula in float64, and per element the bound a float32 evaluation in any
    summation order stays within (first order in the unit roundoff u):

    scores s = q.k * scale: |ds| <= gamma(d) * sum_t |q_t k_t| * scale (scale a power of two);
    softmax: a score error ds moves each weight p by at most 2 max|ds| relatively, and exp, the
    m-term sum and the division add gamma(m) + 3u; context c = sum_j p_j v_j:
    |dc| <= (gamma(m) + relative weight error) * sum_j p_j |v_j|.
    """
    n, heads, d = q.shape
    group = heads // k.shape[1]
    q64, k64, v64 = (np.repeat(x, group if x is not q else 1, axis=1).astype(np.float64) for x in (q, k, v))
    scale = d**-0.5
    scores = np.einsum("nhd,mhd->hnm", q64, k64) * scale  # (heads, n, m)
    score_error = gamma(d) * np.einsum("nhd,mhd->hnm", np.abs(q64), np.abs(k64)) * scale
    if mask is not None:
        scores = scores + mask
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    context = np.einsum("hnm,mhd->nhd", weights, v64)  # (n, heads, d)
    visible = weights > 0
    worst_score_error = np.where(visible, score_error, 0).max(axis=-1)  # (heads, n)
    m = k.shape[0]
    relative = gamma(m) + 3 * UNIT_ROUNDOFF + 2 * worst_score_error  # (heads, n)
    bound = np.einsum("hnm,mhd->nhd", weights, np.abs(v64)) * relative.T[:, :, None]
    return context.reshape(n, heads * d), bound.reshape(n, heads * d)


def test_attention_is_the_formula_to_float32_rounding_whatever_the_block_size(monkeypatch):
    """What the reference backend promises about its blocking: every block size gives the
    attention formula within the float32 rounding bound derived above. Bit-identical results
    across block sizes are not promised: they hold only where the BLAS kernel accumulates a
    product the same way whatever its size (OpenBLAS's SkylakeX kernels do, its Haswell and
    Katmai kernels do not: 66 % of elements differed by up to 5.7e-7 on those)."""
    monkeypatch.setattr(ops, "_BLAS_SERIAL", True)
    rng = np.random.default_rng(3)
    q = rng.standard_normal((100, 14, 64), dtype=F32)
    k, v = (rng.standard_normal((300, 2, 64), dtype=F32) for _ in range(2))
    mask = np.where(rng.random((100, 300)) < 0.3, F32(-65536.0), F32(0.0))
    exact, bound = attention_and_rounding_bound(q, k, v, mask)
    whole = ops.attention(q, k, v, mask)
    monkeypatch.setattr(ops, "serial_rows", lambda mnk: 7)  # blocks that straddle heads of a group
    blocked = ops.attention(q, k, v, mask)
    for got in (whole, blocked):
        excess = np.abs(got - exact) - bound
        assert excess.max() <= 0, f"beyond the float32 rounding bound by {excess.max():.3g}"
    # The bound is tight enough to see a blocking mistake: one mask row out of place is far outside it.
    shifted = ops.attention(q, k, v, np.roll(mask, 1, axis=0))
    assert (np.abs(shifted - exact) > bound).any()


def exact_gelu(x: np.ndarray) -> np.ndarray:
    return np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64)])


def test_gelu_is_exact_gelu_to_float32_precision_in_place_or_not():
    x = np.concatenate([np.linspace(-12, 12, 20001, dtype=F32),
                        np.random.default_rng(0).standard_normal(ops.BLOCK + 123).astype(F32) * 3]).reshape(-1, 4)
    got = ops.gelu(x)
    np.testing.assert_allclose(got, exact_gelu(x.reshape(-1)).reshape(x.shape), rtol=0, atol=3.5e-7)
    inplace = x.copy()
    ops.gelu(inplace, out=inplace)
    np.testing.assert_array_equal(inplace, got)
    bias = np.array([0.5, -1.0, 0.0, 2.0], F32)  # added per column, block by block
    np.testing.assert_array_equal(ops.gelu(x, bias=bias), ops.gelu(x + bias))


def test_silu_mul_blocks_rows_of_strided_halves():
    rng = np.random.default_rng(1)
    gate_up = rng.standard_normal((70, 2 * 1000), dtype=F32) * 4  # 70 rows x 1000: several row blocks
    gate, up = gate_up[:, :1000].copy(), gate_up[:, 1000:].copy()
    expected = gate / (1 + np.exp(-gate)) * up
    got = ops.silu_mul(gate_up[:, :1000], gate_up[:, 1000:])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(gate_up[:, :1000], expected)  # in place
