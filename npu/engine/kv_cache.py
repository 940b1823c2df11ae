"""The decoder's KV cache: one preallocated block that owns its position.

`KVCache` holds every layer's K and V rows in the layer graphs' dtype, laid out so
that `keys[i]` is exactly the `[1, capacity, kv_dim]` array the decode group takes:
decode feeds views, never copies. By default it allocates one host block; a board data
path may hand it `storage` instead, one (K, V) pair of `[1, capacity, kv_dim]` arrays per
layer that are views of the layers' own device buffers (npu/board/zero_copy.py), so the
cache *is* what the NPU reads. Either way only `write`, `restore`, `reset` and `rewind`
change it, and `resets` counts resets (a restore and a rewind are one), so whoever
mirrors it knows when its rows or the decode mask were replaced wholesale. It also owns
the decode mask, because the mask is a function of the position: slot j < capacity is
open iff row j is filled, and the last slot (the token itself) is always open. Advancing opens the new slots; nothing
is rebuilt per token.

Protocol (only the engine calls these): write the rows of the token(s) at the current
position for every layer with `write`, then `advance(n)` once. `fits(n)` answers
whether n more rows fit. `snapshot(length)` copies the first `length` rows of every
layer; `restore` puts them (or their first rows) back and sets the position to their end;
`rewind(length)` forgets the rows after the first `length` (a cancelled conversation turn).

`PrefixStore` keeps a few snapshots (least recently used evicted) keyed by whatever
the engine decides (image, system prompt, template), each with the token ids it
covers, so follow-up questions on the same image skip the vision run and prefill.

This module knows nothing of graphs, sessions or tokenizers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from npu.session import MASK_BLOCKED


class CacheFullError(RuntimeError):
    """More rows were written or advanced than the cache holds (an engine bug)."""


@dataclass(frozen=True)
class KVSnapshot:
    """The first `length` rows of every layer, copied out of a `KVCache`."""

    length: int
    keys: np.ndarray  # (n_layers, length, kv_dim)
    values: np.ndarray  # (n_layers, length, kv_dim)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class KVCache:
    """Preallocated K/V rows for `n_layers` layers, `capacity` positions, `kv_dim` wide."""

    def __init__(self, n_layers: int, capacity: int, kv_dim: int, dtype, mask_dtype,
                 storage: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None) -> None:
        if n_layers < 1 or capacity < 1 or kv_dim < 1:
            raise ValueError(f"KV cache dimensions must be positive: {n_layers=} {capacity=} {kv_dim=}")
        self.n_layers = n_layers
        self.capacity = capacity
        self.kv_dim = kv_dim
        if storage is None:
            # The leading 1 makes keys[i] the decode graph's [1, capacity, kv_dim] input as is.
            self.keys = np.zeros((n_layers, 1, capacity, kv_dim), dtype)  # (n_layers, 1, capacity, kv_dim)
            self.values = np.zeros((n_layers, 1, capacity, kv_dim), dtype)  # (n_layers, 1, capacity, kv_dim)
        else:
            self.keys, self.values = _checked_storage(storage, n_layers, (1, capacity, kv_dim), np.dtype(dtype))
        self.decode_mask = np.empty((1, 1, capacity + 1), mask_dtype)  # (1, 1, capacity + 1)
        self._open = np.zeros((), mask_dtype)
        self.position = 0
        self.resets = 0
        # Bytes copied into the cache since construction (for the decode-overhead benchmark).
        self.bytes_written = 0
        self.reset()

    @property
    def nbytes(self) -> int:
        rows = sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))
        return rows + self.decode_mask.nbytes

    @property
    def remaining(self) -> int:
        return self.capacity - self.position

    def reset(self) -> None:
        """Forget every row: position 0, every cache slot of the decode mask blocked."""
        self.position = 0
        self.resets += 1
        self.decode_mask.fill(MASK_BLOCKED)
        self.decode_mask[0, 0, -1] = self._open

    def fits(self, num_rows: int) -> bool:
        return num_rows >= 0 and self.position + num_rows <= self.capacity

    def advance(self, num_rows: int = 1) -> None:
        """Mark the `num_rows` rows at the position as filled and move past them."""
        if not self.fits(num_rows):
            raise CacheFullError(f"cannot advance {num_rows} rows at position {self.position} of {self.capacity}")
        start = self.position
        if num_rows == 1:
            self.decode_mask[0, 0, start] = self._open
        else:
            self.decode_mask[0, 0, start : start + num_rows] = self._open
        self.position = start + num_rows

    def write(self, layer: int, k_rows: np.ndarray, v_rows: np.ndarray, num_rows: int = 1) -> None:
        """Copy the first `num_rows` rows of `k_rows`/`v_rows` ([1, n, kv_dim]) to the position.

        The position does not move: every layer writes at the same rows, then the
        engine calls `advance(num_rows)` once.
        """
        if not self.fits(num_rows):
            raise CacheFullError(f"cannot write {num_rows} rows at position {self.position} of {self.capacity}")
        start = self.position
        if num_rows == 1:
            # Row assignment is the cheapest copy numpy offers for the per-token path.
            self.keys[layer][0, start] = k_rows[0, 0]
            self.values[layer][0, start] = v_rows[0, 0]
        else:
            self.keys[layer][0, start : start + num_rows] = k_rows[0, :num_rows]
            self.values[layer][0, start : start + num_rows] = v_rows[0, :num_rows]
        self.bytes_written += 2 * num_rows * self.kv_dim * self.keys[0].itemsize

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's full K and V arrays, each [1, capacity, kv_dim] (views, no copy)."""
        return self.keys[layer], self.values[layer]

    def history(self, layer: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's first `length` rows, each [1, length, kv_dim] (contiguous views)."""
        if not 0 <= length <= self.position:
            raise CacheFullError(f"history of {length} rows asked at position {self.position}")
        return self.keys[layer][:, :length], self.values[layer][:, :length]

    def rewind(self, length: int) -> None:
        """Forget every row from `length` on (their slots of the decode mask blocked again)."""
        if not 0 <= length <= self.position:
            raise CacheFullError(f"cannot rewind to {length} at position {self.position}")
        self.decode_mask[0, 0, length:self.capacity] = MASK_BLOCKED
        self.position = length
        self.resets += 1  # mirrors of the mask resynchronise it whole

    def snapshot(self, length: int | None = None) -> KVSnapshot:
        """Copy the first `length` rows (default: all filled rows) of every layer."""
        length = self.position if length is None else length
        if not 0 <= length <= self.position:
            raise CacheFullError(f"cannot snapshot {length} rows at position {self.position}")
        keys = np.stack([k[0, :length] for k in self.keys])  # (n_layers, length, kv_dim)
        values = np.stack([v[0, :length] for v in self.values])  # (n_layers, length, kv_dim)
        return KVSnapshot(length, keys, values)

    def restore(self, snapshot: KVSnapshot, length: int | None = None) -> None:
        """Put a snapshot's first `length` rows (default: all) back at rows 0.. and set the
        position to their end."""
        expected = (self.n_layers, snapshot.length, self.kv_dim)
        if snapshot.keys.shape != expected or snapshot.values.shape != expected:
            raise ValueError(f"snapshot of shape {snapshot.keys.shape} does not fit a cache of {expected}")
        length = snapshot.length if length is None else length
        if not 0 <= length <= snapshot.length:
            raise ValueError(f"cannot restore {length} rows of a {snapshot.length}-row snapshot")
        if length > self.capacity:
            raise CacheFullError(f"snapshot of {length} rows exceeds capacity {self.capacity}")
        self.reset()
        for layer in range(self.n_layers):
            self.keys[layer][0, :length] = snapshot.keys[layer, :length]
            self.values[layer][0, :length] = snapshot.values[layer, :length]
        self.bytes_written += 2 * self.n_layers * length * self.kv_dim * self.keys[0].itemsize
        self.advance(length)


def _checked_storage(storage, n_layers: int, shape: tuple[int, ...], dtype: np.dtype) -> tuple[tuple, tuple]:
    """Per-layer K and V arrays handed in by a backend, each exactly `shape` of `dtype`, C-contiguous."""
    keys, values = (tuple(part) for part in storage)
    if len(keys) != n_layers or len(values) != n_layers:
        raise ValueError(f"KV storage for {len(keys)}/{len(values)} layers, the cache has {n_layers}")
    for array in keys + values:
        if array.shape != shape or array.dtype != dtype or not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError(f"KV storage array {array.shape} {array.dtype} is not a writable contiguous"
                             f" {shape} {dtype} block")
    return keys, values


@dataclass(frozen=True)
class PrefixEntry:
    token_ids: tuple[int, ...]
    snapshot: KVSnapshot
    # The prefix's layer-input rows (embeddings with image features spliced in),
    # (length, hidden): lets the engine re-run the prefix without the vision graph.
    embeds: np.ndarray | None = None


class PrefixStore:
    """Up to `max_entries` KV prefix snapshots; the least recently used is evicted."""

    def __init__(self, max_entries: int = 4) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, PrefixEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def find(self, key: Hashable, token_ids: Sequence[int]) -> PrefixEntry | None:
        """The entry under `key` whose token ids are a proper prefix of `token_ids`, if any."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        prefix = entry.token_ids
        # A proper prefix: at least one prompt token must remain to produce the first logits.
        if len(prefix) >= len(token_ids) or tuple(token_ids[: len(prefix)]) != prefix:
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, token_ids: Sequence[int], snapshot: KVSnapshot,
            embeds: np.ndarray | None = None) -> None:
        if snapshot.length != len(token_ids):
            raise ValueError(f"snapshot covers {snapshot.length} rows but {len(token_ids)} token ids were given")
        if embeds is not None and len(embeds) != snapshot.length:
            raise ValueError(f"snapshot covers {snapshot.length} rows but {len(embeds)} embedding rows were given")
        if self.max_entries == 0:
            return
        self._entries[key] = PrefixEntry(tuple(token_ids), snapshot, embeds)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
