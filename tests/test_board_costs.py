"""The board cost table (bench/board_costs.toml) and its prices (npu/engine/costs.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from npu.engine.costs import CALL_KINDS, BoardCosts, CostTableError

TABLE = Path(__file__).resolve().parents[1] / "bench" / "board_costs.toml"


@pytest.fixture(scope="module")
def costs() -> BoardCosts:
    return BoardCosts.load(TABLE)


def test_every_price_says_where_it_comes_from(costs):
    assert costs.board == "AX630C" and {"internvl2-1b-224", "internvl2_5-1b-364", "internvl3-1b-448"} <= set(costs.shapes)
    for row in costs.rows:
        assert row["ms"] >= 0 and (row["source"].strip() or row["derivation"].strip()), row
    for name in costs.shapes:
        build = costs.build(name)  # raises unless every call kind is priced exactly once
        assert build.chunk_rows == build.shape.prefill_chunk
        assert 0 < build.post_s < build.decode_stack_s + build.post_s


def test_stack_prices_follow_the_published_figures(costs):
    build = costs.build("internvl3-1b-448")
    shapes = SimpleNamespace(chunk=128, history_groups={h: g for g, h in enumerate(build.shape.history_lengths, 2)})
    prices = build.stack_prices(shapes)
    assert set(prices) == {0, 1, *range(2, 2 + len(build.shape.history_lengths))}
    # 9.78 tok/s less post; 128-row prefill less post; each history row adds its increment.
    assert prices[0] == pytest.approx(1 / 9.78 - build.post_s, rel=1e-4)
    assert prices[1] == pytest.approx(0.36242 - build.post_s)
    assert prices[9] - prices[1] == pytest.approx(1024 * build.history_row_s)
    with pytest.raises(CostTableError, match="256-row"):
        costs.build("internvl2_5-1b-364").stack_prices(SimpleNamespace(chunk=128, history_groups={}))


def write(tmp_path, rows: str) -> Path:
    path = tmp_path / "costs.toml"
    path.write_text('board = "X"\n[[build]]\nname = "b"\nmodel = "m"\nimage_size = 224\nimage_tokens = 64\n'
                    'template = "Hermes-2"\nkv_capacity = 63\nprefill_chunk = 16\nhistory_lengths = []\n'
                    'source = "s"\n' + rows)
    return path


def row(call: str, ms: float = 1.0, build: str = "b", rows: int | None = 16) -> str:
    extra = f"rows = {rows}\n" if rows is not None and call in ("prefill_ttft", "history_row") else ""
    return f'[[cost]]\nbuild = "{build}"\ncall = "{call}"\nms = {ms}\n{extra}source = "s"\nderivation = ""\n'


def test_a_table_that_cannot_price_a_build_is_refused(tmp_path):
    complete = "".join(row(kind) for kind in CALL_KINDS)
    assert BoardCosts.load(write(tmp_path, complete)).build("b").decode_stack_s == 0.0
    with pytest.raises(CostTableError, match="no price for post"):
        BoardCosts.load(write(tmp_path, "".join(row(k) for k in CALL_KINDS if k != "post"))).build("b")
    with pytest.raises(CostTableError, match="two rows price vision"):
        BoardCosts.load(write(tmp_path, complete + row("vision"))).build("b")
    with pytest.raises(CostTableError, match="unknown build"):
        BoardCosts.load(write(tmp_path, complete + row("vision", build="other")))
    with pytest.raises(CostTableError, match="unknown call"):
        BoardCosts.load(write(tmp_path, complete + row("warp")))
    with pytest.raises(CostTableError, match="another chunk size"):
        mixed = "".join(row(k, rows=32 if k == "history_row" else 16) for k in CALL_KINDS)
        BoardCosts.load(write(tmp_path, mixed)).build("b")
    with pytest.raises(CostTableError, match="no build 'c'"):
        BoardCosts.load(write(tmp_path, complete)).build("c")


def _llama_weights(hidden: int, layers: int, kv_dim: int, intermediate: int, vocab: int) -> tuple[int, int]:
    """(decoder layer weights, lm_head weights) of a Llama decoder."""
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate
    return layers * per_layer, vocab * hidden


def test_smolvlm_prices_follow_their_published_figures_and_derivations(costs):
    """AXERA's card (AX630C: 800 ms encode, 182 ms TTFT, 31 tok/s; AX650: 105, 57, 80); the 500M
    package scaled by weights (decode, bandwidth bound) and layer weights (prefill, compute bound)."""
    small = _llama_weights(576, 30, 192, 1536, 49280)  # SmolVLM-256M: SmolLM2-135M
    large = _llama_weights(960, 32, 320, 2560, 49280)  # SmolVLM-500M: SmolLM2-360M
    b256, b500 = costs.build("smolvlm-256m-512"), costs.build("smolvlm-500m-512")
    assert (b256.vision_s, b256.chunk_ttft_s) == (0.8, 0.182)
    assert b256.decode_stack_s + b256.post_s == pytest.approx(1 / 31, rel=1e-3)
    assert b256.post_s == pytest.approx((1 / 31) * small[1] / sum(small), rel=1e-3)
    decode_500 = (1 / 31) * sum(large) / sum(small)
    assert b500.decode_stack_s + b500.post_s == pytest.approx(decode_500, rel=1e-3)
    assert b500.post_s == pytest.approx(decode_500 * large[1] / sum(large), rel=1e-3)
    layers_256 = 0.182 - b256.post_s
    assert b500.chunk_ttft_s == pytest.approx(layers_256 * large[0] / small[0] + b500.post_s, rel=1e-3)
    ax650 = BoardCosts.load(TABLE.with_name("board_costs_ax650.toml"))
    assert ax650.board == "AX650N"
    b650 = ax650.build("smolvlm-256m-512")
    assert (b650.vision_s, b650.chunk_ttft_s) == (0.105, 0.057)
    assert b650.decode_stack_s + b650.post_s == pytest.approx(1 / 80)
    for row in ax650.rows:
        assert row["source"].strip() or row["derivation"].strip(), row
def test_the_ax650_table_prices_qwen3_vl_from_its_published_per_layer_times():
    """bench/board_costs_ax650.toml: AXERA's TIME-2B.md per-layer figures (28 layers)."""
    costs = BoardCosts.load(TABLE.with_name("board_costs_ax650.toml"))
    assert costs.board == "AX650N"
    for row in costs.rows:
        assert row["ms"] >= 0 and (row["source"].strip() or row["derivation"].strip()), row
    build = costs.build("qwen3-vl-2b-384-ax650")
    assert build.shape.family == "qwen3_vl" and build.shape.n_layers == 28 and build.shape.image_tokens == 144
    assert build.decode_stack_s == pytest.approx(28 * 3.2e-3)
    assert build.chunk_stack_s(0) == pytest.approx(28 * 5.8e-3)
    assert build.chunk_stack_s(512) == pytest.approx(28 * 7.3e-3, rel=1e-4)
