"""reference_ops.serial_matmul: np.matmul's result in row blocks (for a BLAS that threads big GEMMs)."""

from __future__ import annotations

import numpy as np
import pytest

from npu.reference import ops


@pytest.mark.parametrize("shape", [(16, 257, 64, 257), (2, 896, 64, 128), (3, 5, 4, 6), (1, 1, 64, 1000)])
def test_serial_matmul_equals_matmul(shape):
    batch, rows, inner, cols = shape
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal((batch, inner, rows), dtype=np.float32).transpose(0, 2, 1)  # strided, like attention
    b = rng.standard_normal((batch, cols, inner), dtype=np.float32).transpose(0, 2, 1)
    got = ops.serial_matmul(a, b)
    assert got.shape == (batch, rows, cols) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.matmul(a, b), rtol=1e-5, atol=1e-5)


def test_serial_matmul_blocks_rows_under_the_serial_gemm_size(monkeypatch):
    calls = []
    real = np.matmul

    def spy(x, y, out=None):
        calls.append(x.shape[1] * x.shape[2] * y.shape[2])
        return real(x, y, out=out)

    a = np.ones((2, 300, 64), np.float32)
    b = np.ones((2, 64, 300), np.float32)
    monkeypatch.setattr(ops.np, "matmul", spy)
    out = ops.serial_matmul(a, b)
    assert len(calls) > 1 and max(calls) <= ops._SERIAL_GEMM_MNK
    assert (out == 64).all()
