"""KVCache and PrefixStore: position bookkeeping, the decode mask, snapshots (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu.engine.kv_cache import CacheFullError, KVCache, KVSnapshot, PrefixStore
from npu.session import BF16, MASK_BLOCKED

N_LAYERS, KV_DIM = 3, 4


def make_cache(capacity: int = 16, dtype=np.float32) -> KVCache:
    return KVCache(N_LAYERS, capacity, KV_DIM, dtype, dtype)


def rows(n: int, seed: float) -> np.ndarray:
    """[1, n, kv_dim] rows whose values identify (seed, row, column)."""
    grid = np.arange(n * KV_DIM, dtype=np.float32).reshape(1, n, KV_DIM)  # (1, n, kv_dim)
    return grid + np.float32(seed * 100)


def fill(cache: KVCache, n: int, seed: float) -> None:
    for layer in range(cache.n_layers):
        cache.write(layer, rows(n, seed + layer), rows(n, -seed - layer), n)
    cache.advance(n)


def assert_mask_matches_position(cache: KVCache) -> None:
    mask = cache.decode_mask[0, 0]
    open_slots = np.flatnonzero(mask == 0)
    assert list(open_slots) == [*range(cache.position), cache.capacity]
    assert np.all(mask[cache.position:cache.capacity] == MASK_BLOCKED)


def test_allocation_shapes_and_decode_views():
    cache = make_cache(capacity=10, dtype=BF16)
    assert cache.keys.shape == (N_LAYERS, 1, 10, KV_DIM) and cache.keys.dtype == BF16
    k, v = cache.layer(1)
    assert k.shape == (1, 10, KV_DIM) and np.shares_memory(k, cache.keys) and np.shares_memory(v, cache.values)
    assert cache.decode_mask.shape == (1, 1, 11)
    assert_mask_matches_position(cache)


def test_write_lands_at_position_and_advance_opens_slots():
    cache = make_cache()
    fill(cache, 3, seed=1)
    fill(cache, 1, seed=2)
    assert cache.position == 4
    np.testing.assert_array_equal(cache.keys[0, 0, :3], rows(3, 1)[0])
    np.testing.assert_array_equal(cache.keys[2, 0, 3], rows(1, 4)[0, 0])
    np.testing.assert_array_equal(cache.values[1, 0, 3], rows(1, -3)[0, 0])
    assert_mask_matches_position(cache)


def test_write_takes_only_the_valid_rows_of_a_padded_chunk():
    cache = make_cache()
    chunk = rows(8, 5)  # a padded chunk, 3 rows valid
    cache.write(0, chunk, chunk, 3)
    assert np.all(cache.keys[0, 0, 3:] == 0)


def test_overflow_raises_instead_of_clamping():
    cache = make_cache(capacity=4)
    fill(cache, 4, seed=0)
    assert not cache.fits(1) and cache.fits(0)
    with pytest.raises(CacheFullError):
        cache.write(0, rows(1, 0), rows(1, 0), 1)
    with pytest.raises(CacheFullError):
        cache.advance(1)
    assert cache.position == 4


def test_history_views_are_leading_rows_without_copy():
    cache = make_cache()
    fill(cache, 5, seed=3)
    k, v = cache.history(1, 4)
    assert k.shape == (1, 4, KV_DIM) and k.flags.c_contiguous and np.shares_memory(k, cache.keys)
    with pytest.raises(CacheFullError):
        cache.history(1, 6)


def test_snapshot_restore_round_trip_after_other_writes():
    cache = make_cache()
    fill(cache, 6, seed=1)
    snap = cache.snapshot(4)
    before = cache.keys[:, 0, :4].copy()
    cache.reset()
    fill(cache, 9, seed=7)
    cache.restore(snap)
    assert cache.position == 4
    np.testing.assert_array_equal(cache.keys[:, 0, :4], before)
    assert_mask_matches_position(cache)


def test_restore_of_the_first_rows_only():
    cache = make_cache()
    fill(cache, 6, seed=1)
    snap = cache.snapshot(5)
    cache.reset()
    fill(cache, 9, seed=7)
    cache.restore(snap, 3)
    assert cache.position == 3
    np.testing.assert_array_equal(cache.keys[:, 0, :3], snap.keys[:, :3])
    assert_mask_matches_position(cache)
    cache.restore(snap, 0)
    assert cache.position == 0
    assert_mask_matches_position(cache)
    with pytest.raises(ValueError, match="cannot restore 6 rows"):
        cache.restore(snap, 6)


def test_prefix_store_keeps_the_prefix_input_rows():
    cache = make_cache()
    fill(cache, 4, seed=2)
    store = PrefixStore(2)
    rows = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)  # (length, hidden)
    store.put("k", [1, 2, 3, 4], cache.snapshot(4), rows)
    assert store.find("k", [1, 2, 3, 4, 5]).embeds is rows
    with pytest.raises(ValueError, match="embedding rows"):
        store.put("k", [1, 2, 3, 4], cache.snapshot(4), rows[:3])


def test_restore_rejects_a_snapshot_of_another_shape():
    cache = make_cache()
    bad = KVSnapshot(2, np.zeros((N_LAYERS, 2, KV_DIM + 1), np.float32), np.zeros((N_LAYERS, 2, KV_DIM + 1), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        cache.restore(bad)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("fill"), st.integers(0, 7)),
        st.tuples(st.just("reset"), st.just(0)),
        st.tuples(st.just("snapshot"), st.integers(0, 20)),
        st.tuples(st.just("restore"), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 20), ops=operations)
def test_position_and_mask_invariants_hold_for_any_sequence(capacity, ops):
    """Never beyond capacity, the mask always mirrors the position, a restored snapshot
    brings back exactly its rows."""
    cache = make_cache(capacity)
    shadow = np.zeros((N_LAYERS, capacity, KV_DIM), np.float32)  # (n_layers, capacity, kv_dim) expected keys
    saved: tuple[KVSnapshot, np.ndarray] | None = None
    for step, (op, n) in enumerate(ops):
        if op == "fill":
            if cache.fits(n):
                start = cache.position
                fill(cache, n, seed=step)
                for layer in range(N_LAYERS):
                    shadow[layer, start:start + n] = rows(n, step + layer)[0]
            else:
                with pytest.raises(CacheFullError):
                    cache.advance(n)
        elif op == "reset":
            cache.reset()
        elif op == "snapshot" and n <= cache.position:
            saved = (cache.snapshot(n), shadow[:, :n].copy())
        elif op == "restore" and saved is not None:
            cache.restore(saved[0])
            shadow[:, :saved[0].length] = saved[1]
        assert 0 <= cache.position <= capacity
        assert_mask_matches_position(cache)
        np.testing.assert_array_equal(cache.keys[:, 0, :cache.position], shadow[:, :cache.position])


def test_prefix_store_matches_proper_prefixes_only():
    store = PrefixStore(2)
    snap = make_cache().snapshot(0)
    store.put("a", [], snap)
    cache = make_cache()
    fill(cache, 3, seed=0)
    store.put("b", [1, 2, 3], cache.snapshot(3))
    assert store.find("b", [1, 2, 3, 4]).snapshot.length == 3
    assert store.find("b", [1, 2, 3]) is None  # nothing left to prefill
    assert store.find("b", [1, 2, 4, 5]) is None
    assert store.find("zzz", [1, 2, 3, 4]) is None


def test_prefix_store_evicts_least_recently_used():
    store = PrefixStore(2)
    cache = make_cache()
    fill(cache, 2, seed=0)
    snap = cache.snapshot(2)
    store.put("a", [1, 2], snap)
    store.put("b", [1, 2], snap)
    assert store.find("a", [1, 2, 3]) is not None  # "a" is now the most recent
    store.put("c", [1, 2], snap)
    assert len(store) == 2
    assert store.find("b", [1, 2, 3]) is None
    assert store.find("a", [1, 2, 3]) is not None and store.find("c", [1, 2, 3]) is not None
    with pytest.raises(ValueError):
        store.put("d", [1], snap)


def test_rewind_forgets_the_rows_after_a_length_and_blocks_their_slots():
    cache = make_cache()
    fill(cache, 5, seed=1)
    kept = np.stack([k[0, :3] for k in cache.keys])
    cache.rewind(3)
    assert cache.position == 3
    assert_mask_matches_position(cache)
    np.testing.assert_array_equal(np.stack([k[0, :3] for k in cache.keys]), kept)
    fill(cache, 2, seed=7)  # writing goes on at the rewound position
    np.testing.assert_array_equal(cache.keys[0][0, 3:5], rows(2, 7)[0])
    with pytest.raises(CacheFullError):
        cache.rewind(6)


def storage(n_layers: int = N_LAYERS, capacity: int = 16, dtype=np.float32):
    """Per-layer K/V arrays as a backend hands them in (separate blocks, like per-graph device buffers)."""
    return ([np.zeros((1, capacity, KV_DIM), dtype) for _ in range(n_layers)],
            [np.zeros((1, capacity, KV_DIM), dtype) for _ in range(n_layers)])


def test_storage_from_the_backend_is_the_cache():
    keys, values = storage()
    cache = KVCache(N_LAYERS, 16, KV_DIM, np.float32, np.float32, storage=(keys, values))
    fill(cache, 3, seed=1)
    np.testing.assert_array_equal(keys[2][0, :3], rows(3, 3)[0])  # written straight into the given arrays
    assert cache.layer(1)[0] is keys[1] and np.shares_memory(cache.history(0, 2)[1], values[0])
    snap = cache.snapshot()
    fill(cache, 2, seed=5)
    cache.restore(snap)
    assert cache.position == 3 and np.all(values[0][0, :3] == rows(3, -1)[0])
    assert cache.nbytes == 2 * N_LAYERS * 16 * KV_DIM * 4 + cache.decode_mask.nbytes


def test_resets_count_every_reset_and_restore():
    cache = make_cache()
    first = cache.resets
    fill(cache, 2, seed=1)
    snap = cache.snapshot()
    cache.reset()
    cache.restore(snap)
    assert cache.resets == first + 2


@pytest.mark.parametrize("bad", ["layers", "shape", "dtype", "strided"])
def test_storage_that_does_not_fit_is_refused(bad):
    keys, values = storage()
    if bad == "layers":
        keys = keys[:-1]
    elif bad == "shape":
        keys[0] = np.zeros((1, 15, KV_DIM), np.float32)
    elif bad == "dtype":
        values[1] = np.zeros((1, 16, KV_DIM), np.float16)
    else:
        keys[2] = np.zeros((1, 16, 2 * KV_DIM), np.float32)[:, :, ::2]
    with pytest.raises(ValueError, match="KV storage"):
        KVCache(N_LAYERS, 16, KV_DIM, np.float32, np.float32, storage=(keys, values))
