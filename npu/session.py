"""The session: the one interface every graph runs through (DESIGN §2).

A session is one compiled graph (vision, decoder layer i, post) with one or more
shape groups. `AxEngineSession` wraps axengine on a board; `ReferenceSession`
computes the same graphs in numpy. The engine sees only this interface.

Contract:
- `inputs(group)` / `outputs(group)` list `TensorSpec`s in the graph's order.
- `run(feed, group)` takes every input of that group, by name, with its exact shape
  and dtype, and returns the outputs in `outputs(group)` order. The returned arrays
  may be buffers the session reuses: they stay valid until the session's next `run`;
  a caller that keeps one copies it.
- bf16 tensors are `ml_dtypes.bfloat16` arrays, never uint16 views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
# The board's "blocked" mask value: bf16 -65536 (ax-llm and Pulsar2 builds use it).
MASK_BLOCKED = -65536.0


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)} {dtype_name(self.dtype)}"


def dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if np.dtype(dtype) == BF16 else np.dtype(dtype).name


@runtime_checkable
class Session(Protocol):
    """One graph with `num_groups` shape groups."""

    name: str
    num_groups: int

    def inputs(self, group: int = 0) -> list[TensorSpec]: ...

    def outputs(self, group: int = 0) -> list[TensorSpec]: ...

    def run(self, feed: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]: ...


class SessionError(RuntimeError):
    """A feed that does not match the graph, or a graph that failed to run."""


class ShapeGroups:
    """The spec half of a Session, shared by every backend: per-group input and output specs.

    Subclasses set `name`, `_inputs` and `_outputs` (one list of TensorSpec per group).
    """

    name: str
    _inputs: list[list[TensorSpec]]
    _outputs: list[list[TensorSpec]]

    @property
    def num_groups(self) -> int:
        return len(self._inputs)

    def inputs(self, group: int = 0) -> list[TensorSpec]:
        return list(self._inputs[self._group(group)])

    def outputs(self, group: int = 0) -> list[TensorSpec]:
        return list(self._outputs[self._group(group)])

    def _group(self, group: int) -> int:
        if not 0 <= group < self.num_groups:
            raise SessionError(f"{self.name}: shape group {group} out of range 0..{self.num_groups - 1}")
        return group


def check_feed(session: Session, feed: dict[str, np.ndarray], group: int) -> None:
    """Raise SessionError unless `feed` holds exactly the group's inputs, exact shape and dtype."""
    if not 0 <= group < session.num_groups:
        raise SessionError(f"{session.name}: shape group {group} out of range 0..{session.num_groups - 1}")
    specs = session.inputs(group)
    expected = {spec.name for spec in specs}
    missing = sorted(expected - feed.keys())
    extra = sorted(feed.keys() - expected)
    if missing or extra:
        raise SessionError(f"{session.name} group {group}: missing inputs {missing}, unexpected inputs {extra}")
    for spec in specs:
        array = feed[spec.name]
        if not isinstance(array, np.ndarray):
            raise SessionError(f"{session.name} group {group}: input {spec.name} is {type(array).__name__}, not ndarray")
        if array.dtype != spec.dtype:
            raise SessionError(
                f"{session.name} group {group}: input {spec.name} has dtype {dtype_name(array.dtype)},"
                f" graph wants {dtype_name(spec.dtype)}"
            )
        if tuple(array.shape) != spec.shape:
            raise SessionError(
                f"{session.name} group {group}: input {spec.name} has shape {list(array.shape)},"
                f" graph wants {list(spec.shape)}"
            )
