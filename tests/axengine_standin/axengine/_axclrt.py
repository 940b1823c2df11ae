"""AXCLRTSession (stand-in for axengine/_axclrt.py): a PCIe card's NPU behind axclrt.

The card's memory is not mapped into the host process: inputs go over with
`axclrtMemcpy(HOST_TO_DEVICE)` and outputs come back with `DEVICE_TO_HOST`, so there is
no cache to maintain and no host view of a buffer. `provider_options[0]["device_id"]`
picks the card (`_device_index`). Buffers: one per input / output index, sized for the
largest group, as on the board. Prints `[INFO] SOC Name`, `[INFO] VNPU type` and
`[INFO] Compiler version` per session. Same `run` contract and output order as _axe.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._axe import _as_specs
from ._axe_capi import CMM, STATS, IoBuffer, IoStruct, _Handle, engine_lib
from ._base_session import Session, SessionOptions
from ._graphs import graph_for, load_spec
from ._node import NodeArg
from ._release import RELEASE

__all__ = ["AXCLRTSession"]


class AXCLRTSession(Session):
    def __init__(self, path_or_bytes: Any, sess_options: SessionOptions | None = None,
                 provider_options: Any = None, **kwargs: Any) -> None:
        super().__init__()
        self._device_index = 0
        if provider_options is not None and "device_id" in provider_options[0]:
            self._device_index = provider_options[0].get("device_id", 0)
        print("[INFO] SOC Name: AX650N")
        print("[INFO] VNPU type: VNPUType.DISABLED")
        graph = graph_for(load_spec(path_or_bytes))
        print("[INFO] Compiler version: 3.4 standin")
        self._shape_count = graph.num_groups
        inputs = _as_specs(graph.inputs(g) for g in range(self._shape_count))
        outputs = _as_specs(graph.outputs(g) for g in range(self._shape_count))
        self._model_id = _Handle(graph, inputs, outputs)
        self._inputs = [[NodeArg(s.name, s.dtype, list(s.shape)) for s in g] for g in inputs]
        self._outputs = [[NodeArg(s.name, s.dtype, list(s.shape)) for s in g] for g in outputs]
        # Device buffers on the card (the real module keeps them behind an opaque axclrtEngineIO).
        self._device_inputs: list[tuple[IoBuffer, object]] = []
        self._device_outputs: list[tuple[IoBuffer, object]] = []
        for buffers, per_group in ((self._device_inputs, inputs), (self._device_outputs, outputs)):
            for i in range(len(per_group[0])):
                buffer = IoBuffer()
                buffer.nSize = max(group[i].nbytes for group in per_group)
                block = CMM.alloc(buffer.nSize, 128)
                buffer.phyAddr, buffer.pVirAddr = block.phys, None
                buffers.append((buffer, block))
        STATS.sessions_created += 1

    def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray], run_options=None,
            shape_group: int = 0) -> list[np.ndarray]:
        output_names = self._start_run(output_names, input_feed, shape_group)
        inputs = self._device_inputs
        for key, npy in input_feed.items():
            for i, one in enumerate(self.get_inputs(shape_group)):
                if one.name == key:
                    npy = self._check_input(key, npy, one)
                    block = inputs[i][1]
                    block.device[:npy.nbytes] = np.ascontiguousarray(npy).reshape(-1).view(np.uint8)  # H2D memcpy
                    STATS.bytes_in += npy.nbytes
        io = IoStruct()
        io.pInputs = [buffer for buffer, _ in inputs]
        io.pOutputs = [buffer for buffer, _ in self._device_outputs]
        if engine_lib.AX_ENGINE_RunGroupIOSync(self._model_id, None, shape_group, [io]) != 0:
            raise RuntimeError("axclrtEngineExecute failed 0x800b0001")
        results = []
        for i in self._picked_outputs(output_names, shape_group, RELEASE.subset_outputs_fail):
            spec = self.get_outputs(shape_group)[i]
            block = self._device_outputs[i][1]
            size = spec.dtype.itemsize * int(np.prod(spec.shape))
            results.append(block.device[:size].view(spec.dtype).reshape(spec.shape).copy())  # D2H memcpy
        return results
