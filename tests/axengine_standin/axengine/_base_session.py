"""SessionOptions and the Session base (stand-in for axengine/_base_session.py).

As the real base: `_validate_input` checks only that group 0's input names are fed,
`_validate_output` that every asked name is one of group 0's outputs, and
`get_inputs(g)` / `get_outputs(g)` raise ValueError past the group count but index
the list at exactly the count (the real off-by-one: IndexError there).
"""

from __future__ import annotations

import numpy as np

from ._node import NodeArg


class SessionOptions:
    pass


class Session:
    def __init__(self) -> None:
        self._shape_count = 0
        self._inputs: list[list[NodeArg]] = []
        self._outputs: list[list[NodeArg]] = []

    def _validate_input(self, feed_input_names: dict[str, np.ndarray]) -> None:
        missing = [i.name for i in self.get_inputs() if i.name not in feed_input_names]
        if missing:
            raise ValueError(f"Required inputs ({missing}) are missing from input feed ({list(feed_input_names)}).")
        # Stricter than the real one, which silently ignores names it does not know.
        extra = [name for name in feed_input_names if name not in [i.name for i in self.get_inputs()]]
        if extra:
            raise ValueError(f"Unexpected inputs {extra}: the model has {[i.name for i in self.get_inputs()]}.")

    def _validate_output(self, output_names: list[str] | None) -> None:
        if output_names is not None:
            for name in output_names:
                if name not in [o.name for o in self.get_outputs()]:
                    raise ValueError(f"Output name '{name}' is not in model outputs name list.")

    def _start_run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray],
                   shape_group: int) -> list[str]:
        """What both providers' run() do first (validation, default names, the group check)."""
        self._validate_input(input_feed)
        self._validate_output(output_names)
        if output_names is None:
            output_names = [o.name for o in self.get_outputs(shape_group)]  # a group past the end fails here
        if shape_group > self._shape_count - 1 or shape_group < 0:
            raise ValueError(f"Invalid shape group: {shape_group}")
        return output_names

    def _picked_outputs(self, output_names: list[str], shape_group: int, subset_fails: bool) -> list[int]:
        """Output indices run() reads, in order: `output_names.index` per graph output (108722c: a subset
        raises, a permutation misorders) or, before, the graph's outputs that were asked for."""
        names = [o.name for o in self.get_outputs(shape_group)]
        if subset_fails:
            return [output_names.index(name) for name in names]
        return [i for i, name in enumerate(names) if name in output_names]

    def _check_input(self, key: str, npy: np.ndarray, one: NodeArg) -> np.ndarray:
        assert list(one.shape) == list(npy.shape) and one.dtype == npy.dtype, (
            f"model inputs({key}) expect shape {one.shape} and dtype {one.dtype}, however gets input"
            f" with shape {npy.shape} and dtype {npy.dtype}")
        return npy if npy.flags.c_contiguous or npy.flags.f_contiguous else np.ascontiguousarray(npy)

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        if shape_group > self._shape_count:
            raise ValueError(f"Shape group '{shape_group}' is out of range, total {self._shape_count}.")
        return self._inputs[shape_group]

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        if shape_group > self._shape_count:
            raise ValueError(f"Shape group '{shape_group}' is out of range, total {self._shape_count}.")
        return self._outputs[shape_group]
