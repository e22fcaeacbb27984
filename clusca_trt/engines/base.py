"""The engine interface the runtime drives, and the state rules every backend shares.

An engine owns the *state*: every tensor a graph writes except ``out`` (module caches,
hidden states, centroids, assignments, fresh indices). It lives where the backend computes
(host memory for ONNX Runtime CPU, device memory for CUDA / TensorRT) and never comes back
to the host between steps. ``run(graph, feeds)`` binds each graph input from the state when
the state has it, otherwise from the host ``feeds``; output ``X_out`` replaces state ``X``;
``out`` is returned to the host.
"""

from __future__ import annotations

import abc

import numpy as np

from ..errors import InputError
from ..spec import OUT, ExportSpec, GraphSpec

NP_DTYPES = {"float32": np.float32, "int64": np.int64}


class StepEngine(abc.ABC):
    """A set of step graphs with device-resident state. Use as a context manager."""

    backend: str = "?"
    provider: str = "?"

    def __init__(self, spec: ExportSpec):
        self.spec = spec
        self.state_specs = spec.state_tensors()
        self.pingpong = pingpong_state(spec)

    def host_inputs(self, graph: str) -> list:
        """The inputs of ``graph`` the caller must feed (all others come from the state)."""
        return [t for t in self.spec.graphs[graph].inputs if t.name not in self.state_specs]

    def check_feeds(self, g: GraphSpec, feeds: dict[str, np.ndarray]) -> None:
        for t in g.inputs:
            if t.name in self.state_specs:
                continue
            if t.name not in feeds:
                raise InputError(f"graph {g.name} expects input {t.name!r}, got none")
            a = feeds[t.name]
            if tuple(a.shape) != t.shape or a.dtype != NP_DTYPES[t.dtype]:
                raise InputError(
                    f"graph {g.name} input {t.name}: expected {t.dtype}{list(t.shape)}, "
                    f"got {a.dtype}{list(a.shape)}"
                )

    @abc.abstractmethod
    def reset(self) -> None:
        """Zero the state (caches, centroids) before a new sampling run."""

    @abc.abstractmethod
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        """Run one graph; returns ``out`` on the host if the graph has it."""

    def read_state(self, name: str) -> np.ndarray:
        """Copy one state tensor to the host (tests and debugging only)."""
        raise NotImplementedError

    def has_graph(self, graph: str) -> bool:
        return graph in self.spec.graphs

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def returns_out(g: GraphSpec) -> bool:
    return any(t.name == OUT for t in g.outputs)


def pingpong_state(spec: ExportSpec) -> frozenset[str]:
    """The state tensors some graph both reads and writes (input ``X``, output ``X_out``: the module
    caches in the full and partial graphs, the centroids in the cluster graph). An engine whose
    graphs must not write what they read (TensorRT, ONNX Runtime) keeps two buffers of these and
    swaps them after the call; every other state tensor is written by graphs that do not read it
    and needs one buffer."""
    out = set()
    for g in spec.graphs.values():
        reads = {t.name for t in g.inputs}
        out |= {t.state_name for t in g.outputs if t.name != OUT and t.state_name in reads}
    return frozenset(out)
