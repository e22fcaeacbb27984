"""The torch backend: the step graphs run eagerly, the same modules the exporter traces.

It is the PyTorch reference of clusca-trt (the test oracle for the ONNX engines) and a
usable backend where ONNX Runtime is not wanted.
"""

from __future__ import annotations

import numpy as np
import torch

from ..spec import OUT, ExportSpec
from ..steps import graph_module
from .base import StepEngine

_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64}


class TorchEngine(StepEngine):
    backend = "torch"

    def __init__(self, adapter, spec: ExportSpec, device: str = "cpu"):
        super().__init__(spec)
        self.device = torch.device(device)
        self.provider = f"torch-{self.device.type}"
        adapter = adapter.to(self.device)
        self.graphs = {n: graph_module(adapter, spec, n) for n in spec.graphs}
        self.state: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        self.state = {
            n: torch.zeros(t.shape, dtype=_TORCH_DTYPES[t.dtype], device=self.device)
            for n, t in self.state_specs.items()
        }

    @torch.inference_mode()
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        module = self.graphs[graph]
        g = self.spec.graphs[graph]
        self.check_feeds(g, feeds)
        args = [
            self.state[t.name] if t.name in self.state else torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device)
            for t in g.inputs
        ]
        result = None
        for t, value in zip(g.outputs, module(*args)):
            if t.name == OUT:
                result = value.detach().cpu().numpy()
            else:
                self.state[t.state_name] = value
        return result

    def read_state(self, name: str) -> np.ndarray:
        return self.state[name].detach().cpu().numpy()
