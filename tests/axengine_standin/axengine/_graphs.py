"""What a stand-in ".axmodel" computes: a reference graph of a checkpoint, or a synthetic one.

A stand-in ".axmodel" is a small JSON file, `{"format": "vlmd-axengine-standin/1",
"graph": "vision" | "layer<i>" | "post", ...}` (optional `"family": "smolvlm"`: the graphs of
SmolVLM's packages, `npu.reference.smolvlm_graphs`; default InternVL's) with either

- `"checkpoint": DIR` and the build options (`precision`, `kv_capacity`,
  `prefill_chunk`, `history_groups`, optional `post_topk`; and, as published builds
  differ, optional `history_lengths` [128, 256, ...] (Pulsar2's `--last_kv_cache_len`
  list, instead of history_groups), `placeholder` "hidden" | "kv_dim" (group 1's K/V
  placeholder width), `vision_input` "uint8_nhwc" | "float32_nchw", `vision_output`
  "bf16" | "fp32"): the reference graph vlmd's reference backend builds from DIR
  (`reference_build_options` is the one place that maps spec keys to
  `build_reference_sessions` arguments), or
- `"synthetic": {"hidden", "kv_dim", "kv_capacity", "prefill_chunk", "history_groups",
  "vocab"}`: a decoder layer or post graph of those shapes that computes nothing (its
  outputs stay zero). Benchmarks use it to run the real data path at a real model's
  shapes without its weights.

`GraphSpec.nbytes` is what the engine would report as a tensor's `nSize`.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

FORMAT = "vlmd-axengine-standin/1"
BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def load_spec(path_or_bytes: Any) -> dict:
    try:
        if isinstance(path_or_bytes, bytes):
            spec = json.loads(path_or_bytes.decode("utf-8"))
        elif isinstance(path_or_bytes, (str, os.PathLike)):
            with open(path_or_bytes, "rb") as handle:
                spec = json.loads(handle.read().decode("utf-8"))
        else:
            raise TypeError(f"Unable to load model from type '{type(path_or_bytes)}'")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RuntimeError("Failed to load model.") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise RuntimeError("Failed to load model.")
    return spec


def reference_build_options(spec: dict) -> dict:
    """`build_reference_sessions` keyword arguments for a checkpoint spec (the only mapping)."""
    options = {"precision": spec.get("precision", "bf16"), "kv_capacity": spec["kv_capacity"],
               "prefill_chunk": spec["prefill_chunk"], "history_groups": spec.get("history_groups", 0)}
    options.update({name: spec[name] for name in _BUILD_OPTIONS if spec.get(name) is not None})
    if "history_lengths" in options:  # hashable: the options key the graph cache
        options["history_lengths"] = tuple(options["history_lengths"])
    return options


# Build keys of published builds, passed to the reference builder as they are.
_BUILD_OPTIONS = ("history_lengths", "placeholder", "vision_input", "vision_output")
# What a SmolVLM package's graphs can differ in (`build_smolvlm_sessions`' arguments).
_SMOLVLM_OPTIONS = ("precision", "kv_capacity", "prefill_chunk", "history_groups", "history_lengths", "placeholder")


_GRAPHS: dict[tuple, Any] = {}
_GRAPHS_LOCK = threading.Lock()


def _reference_sessions(spec: dict) -> Any:
    """The reference graphs of a checkpoint, built once per (checkpoint, build options)."""
    from npu.reference import build_reference_sessions
    from npu.reference.smolvlm_graphs import build_smolvlm_sessions

    builders = {"internvl": (build_reference_sessions, None), "smolvlm": (build_smolvlm_sessions, _SMOLVLM_OPTIONS)}
    family = spec.get("family", "internvl")
    if family not in builders:
        raise RuntimeError("Failed to load model.")
    build, accepted = builders[family]
    options = {k: v for k, v in reference_build_options(spec).items() if accepted is None or k in accepted}
    key = (spec["checkpoint"], family, *sorted(options.items()))
    with _GRAPHS_LOCK:
        if key not in _GRAPHS:
            _GRAPHS[key] = build(spec["checkpoint"], **options)
        return _GRAPHS[key]


def graph_for(spec: dict) -> Any:
    """The graph a spec names; RuntimeError("Failed to load model.") when there is none."""
    if "synthetic" in spec:
        return SyntheticGraph(spec["graph"], spec["synthetic"])
    sessions = _reference_sessions(spec)
    name = spec.get("graph", "")
    if name == "vision":
        found = sessions.vision
    elif name == "post":
        found = sessions.post
    elif name.startswith("layer") and name[5:].isdigit() and int(name[5:]) < len(sessions.layers):
        found = sessions.layers[int(name[5:])]
    else:
        found = None
    if found is None:
        raise RuntimeError("Failed to load model.")
    return TopK(found, int(spec["post_topk"])) if name == "post" and spec.get("post_topk") else found


class TopK:
    """A `--post_topk` post graph: the k best logits' indices (int32) and values."""

    def __init__(self, post: Any, k: int) -> None:
        self._post, self._k = post, k
        self.name, self.num_groups = post.name, 1
        logits = post.outputs(0)[0]
        self._specs = [GraphSpec("indices", (1, 1, k), np.dtype(np.int32)), GraphSpec("values", (1, 1, k), logits.dtype)]

    def inputs(self, group: int = 0):
        return self._post.inputs(group)

    def outputs(self, group: int = 0):
        return list(self._specs)

    def run(self, feed: dict, group: int = 0) -> list[np.ndarray]:
        logits = np.asarray(self._post.run(feed, group)[0], dtype=np.float32).reshape(-1)  # (vocab,)
        best = np.argpartition(-logits, self._k)[: self._k]
        best = best[np.argsort(-logits[best], kind="stable")]  # (k,) best first
        values = logits[best].astype(self._specs[1].dtype)
        return [best.astype(np.int32).reshape(1, 1, -1), values.reshape(1, 1, -1)]


class SyntheticGraph:
    """A layer or post graph with a real model's shapes that computes nothing."""

    def __init__(self, name: str, dims: dict) -> None:
        hidden, kv_dim, capacity = dims["hidden"], dims["kv_dim"], dims["kv_capacity"]
        chunk, n_history = dims["prefill_chunk"], dims.get("history_groups", 0)
        self.name = name
        if name == "post":
            self._inputs = [[GraphSpec("input", (1, 1, hidden), BF16)]]
            self._outputs = [[GraphSpec("output", (1, 1, dims["vocab"]), BF16)]]
        elif name.startswith("layer"):
            # (rows, K/V input rows, mask columns) per group: decode, first chunk (AXERA's
            # [1, 1, hidden] placeholder K/V), then chunks against chunk * (g - 1) history rows.
            groups = [(1, capacity, capacity + 1)]
            if chunk:
                groups.append((chunk, None, chunk))
                groups += [(chunk, chunk * g, chunk * (g + 1)) for g in range(1, n_history + 1)]
            self._inputs, self._outputs = [], []
            for rows, kv_rows, mask_cols in groups:
                kv_shape = (1, 1, hidden) if kv_rows is None else (1, kv_rows, kv_dim)
                self._inputs.append([GraphSpec("K_cache", kv_shape, BF16), GraphSpec("V_cache", kv_shape, BF16),
                                     GraphSpec("indices", (1, rows), np.dtype(np.uint32)),
                                     GraphSpec("input", (1, rows, hidden), BF16),
                                     GraphSpec("mask", (1, rows, mask_cols), BF16)])
                self._outputs.append([GraphSpec("K_cache_out", (1, rows, kv_dim), BF16),
                                      GraphSpec("V_cache_out", (1, rows, kv_dim), BF16),
                                      GraphSpec("output", (1, rows, hidden), BF16)])
        else:
            raise RuntimeError("Failed to load model.")
        self.num_groups = len(self._inputs)
        self._results = [[np.zeros(s.shape, s.dtype) for s in group] for group in self._outputs]

    def inputs(self, group: int = 0):
        return list(self._inputs[group])

    def outputs(self, group: int = 0):
        return list(self._outputs[group])

    def run(self, feed: dict, group: int = 0) -> list[np.ndarray]:
        return self._results[group]
