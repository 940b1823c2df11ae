"""InferenceSession of the stand-in: the real one's checks, backed by a reference graph."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from ._providers import axclrt_provider_name, get_available_providers

FORMAT = "vlmd-axengine-standin/1"
_BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass
class Stats:
    """Process-wide counters, like the NPU's view of the work: sessions loaded, bytes copied in."""

    sessions_created: int = 0
    runs: int = 0
    bytes_in: int = 0

    def reset(self) -> None:
        self.sessions_created = self.runs = self.bytes_in = 0


STATS = Stats()


class SessionOptions:
    pass


class NodeArg:
    def __init__(self, name: str, dtype: Any, shape: Any) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape

    def __repr__(self) -> str:
        return f"NodeArg({self.name!r}, {self.dtype}, {self.shape})"


_GRAPHS: dict[tuple, Any] = {}
_GRAPHS_LOCK = threading.Lock()


# Build options a spec may carry, passed to the reference builder as they are (see __init__.py).
_BUILD_OPTIONS = ("history_lengths", "placeholder", "vision_input", "vision_output")


def _reference_sessions(spec: dict) -> Any:
    """H1's reference graphs for the checkpoint, built once per (checkpoint, build options)."""
    from npu.reference import build_reference_sessions

    options = {name: spec[name] for name in _BUILD_OPTIONS if spec.get(name) is not None}
    if "history_lengths" in options:
        options["history_lengths"] = tuple(options["history_lengths"])
    key = (spec["checkpoint"], spec.get("precision", "bf16"), spec["kv_capacity"], spec["prefill_chunk"],
           spec.get("history_groups", 0), tuple(sorted(options.items())))
    with _GRAPHS_LOCK:
        if key not in _GRAPHS:
            _GRAPHS[key] = build_reference_sessions(
                spec["checkpoint"], precision=key[1], kv_capacity=key[2], prefill_chunk=key[3], history_groups=key[4],
                **options)
        return _GRAPHS[key]


def _pick_graph(sessions: Any, graph: str) -> Any:
    if graph == "vision":
        found = sessions.vision
    elif graph == "post":
        found = sessions.post
    elif graph.startswith("layer") and graph[5:].isdigit() and int(graph[5:]) < len(sessions.layers):
        found = sessions.layers[int(graph[5:])]
    else:
        found = None
    if found is None:
        raise RuntimeError(f"Failed to load model: the checkpoint has no graph {graph!r}")
    return found


class _TopK:
    """A `--post_topk` post graph: outputs the k best logits' indices (int32) and values."""

    def __init__(self, post: Any, k: int) -> None:
        self._post, self._k = post, k
        self.name, self.num_groups = post.name, 1
        logits = post.outputs(0)[0]
        self._specs = [(("indices", (1, 1, k), np.dtype(np.int32))), ("values", (1, 1, k), logits.dtype)]

    def inputs(self, group: int = 0):
        return self._post.inputs(group)

    def outputs(self, group: int = 0):
        return [_Spec(*spec) for spec in self._specs]

    def run(self, feed: dict, group: int = 0) -> list[np.ndarray]:
        logits = np.asarray(self._post.run(feed, group)[0], dtype=np.float32).reshape(-1)  # (vocab,)
        best = np.argpartition(-logits, self._k)[: self._k]
        best = best[np.argsort(-logits[best], kind="stable")]  # (k,) best first
        values = logits[best].astype(self._specs[1][2])
        return [best.astype(np.int32).reshape(1, 1, -1), values.reshape(1, 1, -1)]


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple
    dtype: np.dtype


def _load_spec(path_or_bytes: Any) -> dict:
    try:
        if isinstance(path_or_bytes, bytes):
            spec = json.loads(path_or_bytes.decode("utf-8"))
        elif isinstance(path_or_bytes, (str, os.PathLike)):
            with open(path_or_bytes, "rb") as handle:
                spec = json.loads(handle.read().decode("utf-8"))
        else:
            raise TypeError(f"Unable to load model from type '{type(path_or_bytes)}'")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RuntimeError(f"Failed to load model: {exc}") from exc
    if spec.get("format") != FORMAT:
        raise RuntimeError("Failed to load model: not a stand-in axmodel")
    return spec


def _choose_provider(providers: Any, provider_options: Any) -> tuple[str, dict | None]:
    available = get_available_providers()
    if providers is None:
        chosen, options = available[0], None
    elif isinstance(providers, str):
        if providers not in available:
            raise ValueError(f"Selected provider: '{providers}' is not available.")
        chosen, options = providers, None
    elif isinstance(providers, list):
        chosen, options = None, None
        for entry in providers:
            name, entry_options = (entry, None) if isinstance(entry, str) else entry
            if name in available and chosen is None:
                chosen, options = name, entry_options
        if chosen is None:
            raise ValueError(f"Selected provider(s): {providers} is(are) not available.")
    else:
        raise TypeError(f"Invalid provider type: {type(providers)}")
    if options is None and provider_options:
        options = provider_options[0]
    return chosen, options


class InferenceSession:
    def __init__(self, path_or_bytes: Any, sess_options: SessionOptions | None = None, providers: Any = None,
                 provider_options: list[dict] | None = None, **kwargs: Any) -> None:
        self._provider, self._provider_options = _choose_provider(providers, provider_options)
        spec = _load_spec(path_or_bytes)
        graph = _pick_graph(_reference_sessions(spec), spec["graph"])
        self._graph = _TopK(graph, int(spec["post_topk"])) if spec.get("post_topk") else graph
        self._shape_count = self._graph.num_groups
        as_shape = list if self._provider == axclrt_provider_name else tuple
        self._inputs = [[NodeArg(s.name, np.dtype(s.dtype), as_shape(s.shape)) for s in self._graph.inputs(g)]
                        for g in range(self._shape_count)]
        self._outputs = [[NodeArg(s.name, np.dtype(s.dtype), as_shape(s.shape)) for s in self._graph.outputs(g)]
                         for g in range(self._shape_count)]
        STATS.sessions_created += 1

    def get_providers(self) -> str:
        return self._provider

    def get_session_options(self) -> None:
        return None

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        if shape_group > self._shape_count:
            raise ValueError(f"Shape group '{shape_group}' is out of range, total {self._shape_count}.")
        return self._inputs[shape_group]  # IndexError at shape_group == count, as the real one

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        if shape_group > self._shape_count:
            raise ValueError(f"Shape group '{shape_group}' is out of range, total {self._shape_count}.")
        return self._outputs[shape_group]

    def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray], run_options: Any = None,
            shape_group: int = 0) -> list[np.ndarray]:
        self._check_names(output_names, input_feed)
        if not 0 <= shape_group < self._shape_count:
            raise ValueError(f"Invalid shape group: {shape_group}")
        graph_names = [o.name for o in self._outputs[shape_group]]
        names = graph_names if output_names is None else output_names
        ranks = [names.index(name) for name in graph_names]  # ValueError on a subset, as the real one
        cmm = {}
        for one in self._inputs[shape_group]:
            array = input_feed[one.name]
            assert list(one.shape) == list(array.shape) and one.dtype == array.dtype, (
                f"model inputs({one.name}) expect shape {one.shape} and dtype {one.dtype}, however gets input"
                f" with shape {array.shape} and dtype {array.dtype}"
            )
            cmm[one.name] = np.array(array, copy=True, order="C")  # the copy into CMM
            STATS.bytes_in += array.nbytes
        STATS.runs += 1
        results = [np.array(r, copy=True) for r in self._graph.run(cmm, shape_group)]
        return [results[i] for i in ranks]

    def _check_names(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray]) -> None:
        expected = [i.name for i in self._inputs[0]]
        missing = [name for name in expected if name not in input_feed]
        if missing:
            raise ValueError(f"Required inputs ({missing}) are missing from input feed ({list(input_feed)}).")
        extra = [name for name in input_feed if name not in expected]
        if extra:
            raise ValueError(f"Unexpected inputs {extra}: the model has {expected}.")
        for name in output_names or []:
            if name not in [o.name for o in self._outputs[0]]:
                raise ValueError(f"Output name '{name}' is not in model outputs name list.")
