"""The step graphs as torch modules: what is exported to ONNX and what the torch backend runs.

* cond:      conditioning inputs of cond_steps steps (timesteps, labels) -> conditioning tables (state)
* plain:     step inputs -> out (the model alone, no caches: method full)
* full:      step inputs, taylor_coef, caches -> out, hidden_<g>, refreshed caches
* partial:   step inputs, forecast_coef, gamma (one per group), update (the rule), assign_<g>, fresh_<g>, caches
             -> out, fresh slots' F_0
* forecast:  step inputs, forecast_coef, caches -> out

Step inputs: the model inputs, then ``cond_row`` and the conditioning tables; each model step
graph gathers its step's rows of the tables and gives the adapter the conditioning tensors by name.
* cluster_<g>: hidden_<g>, centroids_<g>, init_<g>, warm, pair -> assign_<g>, centroids_<g>, dist_<g>
* select_<g>:  assign_<g>, dist_<g>, key_<g>, dist_weight -> fresh_<g>

Every module takes its inputs positionally in the spec's order and returns its outputs in
the spec's order, so the same module traces to ONNX and runs eagerly as the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .context import FullContext, PartialContext, PlainContext
from .spec import (COND_ROW, GRAPH_COND, GRAPH_FORECAST, GRAPH_FULL, GRAPH_PARTIAL, GRAPH_PLAIN, OUT, PAIR,
                   STATE_SUFFIX, STEP_GRAPHS, TABLE_SUFFIX, UPDATE, ExportSpec)


class StepGraph(nn.Module):
    """Base: maps positional inputs to names and named outputs back to the spec order."""

    def __init__(self, spec: ExportSpec, name: str):
        super().__init__()
        self.spec = spec
        self.graph = spec.graphs[name]
        self.input_names = [t.name for t in self.graph.inputs]
        self.output_names = [t.name for t in self.graph.outputs]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.input_names, tensors))
        out = self.compute(named)
        return tuple(out[n] for n in self.output_names)

    def compute(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class ClusCaOps(nn.Module):
    """The ``ops`` functions a step context calls, as named submodules: the exporter records the
    module path on every ONNX node, so each node of a ClusCa operation carries the name scope
    ``clusca.<operation>`` (``clusca.propagate``, ...) that profiles and FLOPs counts attribute by."""

    def __init__(self):
        super().__init__()
        for name, fn in ops.NAMED_FUNCTIONS.items():
            self.add_module(name, _Op(fn))


class ModelStepGraph(StepGraph):
    """plain / full / partial / forecast: one adapter forward under a step context."""

    def __init__(self, adapter, spec: ExportSpec, name: str):
        super().__init__(spec, name)
        self.adapter = adapter
        self.clusca = ClusCaOps()

    def model_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the adapter's forward takes: the model inputs and the step's conditioning (its rows
        of the tables, or the conditioning inputs where the family has no tables)."""
        spec = self.spec
        out = {t.name: inputs[t.name] for t in spec.model_inputs}
        if spec.cond_tensors:
            rows = inputs[COND_ROW]
            out.update({t.name: inputs[t.name + TABLE_SUFFIX].index_select(0, rows) for t in spec.cond_tensors})
        else:
            out.update({t.name: inputs[t.name] for t in spec.cond_inputs})
        return out

    def compute(self, inputs):
        caches = {t.name: inputs[t.name] for t in self.spec.cache_tensors() if t.name in inputs}
        slots = self.spec.slots
        if self.graph.name == GRAPH_PLAIN:
            ctx = PlainContext(slots)
        elif self.graph.name == GRAPH_FULL:
            ctx = FullContext(slots, caches, inputs.get("taylor_coef"))
        elif self.graph.name == GRAPH_PARTIAL:
            groups = [g.name for g in self.spec.clustered_groups]
            ctx = PartialContext(
                slots,
                caches,
                inputs["forecast_coef"],
                {g: inputs["gamma"][i : i + 1] for i, g in enumerate(groups)},
                assign={g: inputs[f"assign_{g}"] for g in groups},
                fresh={g: inputs[f"fresh_{g}"] for g in groups},
                update=inputs[UPDATE],
            )
        elif self.graph.name == GRAPH_FORECAST:
            ctx = PartialContext(slots, caches, inputs["forecast_coef"])
        else:
            raise ValueError(f"not a model step graph: {self.graph.name}")
        ctx.fns = self.clusca
        out = {OUT: self.adapter.forward_step(ctx, self.model_inputs(inputs))}
        out.update(ctx.new_state())
        for group, h in ctx.hidden_states.items():
            out[f"hidden_{group}"] = h
        return out


class CondGraph(StepGraph):
    """cond: the adapter's ``conditioning`` over ``cond_steps`` steps of rows at once."""

    def __init__(self, adapter, spec: ExportSpec):
        super().__init__(spec, GRAPH_COND)
        self.adapter = adapter

    def compute(self, inputs):
        tensors = self.adapter.conditioning({t.name: inputs[t.name] for t in self.spec.cond_inputs})
        return {t.name + TABLE_SUFFIX + STATE_SUFFIX: tensors[t.name] for t in self.spec.cond_tensors}


class ClusterGraph(StepGraph):
    def __init__(self, spec: ExportSpec, group: str):
        super().__init__(spec, f"cluster_{group}")
        self.group = group

    def compute(self, inputs):
        g = self.group
        assign, centroids, dist = ops.kmeans(
            inputs[f"hidden_{g}"],
            inputs[f"centroids_{g}"],
            inputs[f"init_{g}"],
            inputs["warm"],
            self.spec.options.kmeans_iterations,
            self.spec.options.distance,
        )
        # paired: every row takes its sample's first row's clustering (the guidance halves share it)
        rows = ops.pair_index(inputs[PAIR], self.spec.graph_batch, self.spec.options.batch)
        return {f"assign_{g}_out": assign.index_select(0, rows), f"centroids_{g}_out": centroids.index_select(0, rows),
                f"dist_{g}_out": dist.index_select(0, rows)}


class SelectGraph(StepGraph):
    def __init__(self, spec: ExportSpec, group: str):
        super().__init__(spec, f"select_{group}")
        self.group = group

    def compute(self, inputs):
        g = self.group
        key = inputs[f"key_{g}"] + inputs["dist_weight"] * inputs[f"dist_{g}"].unsqueeze(0)
        fresh = ops.select_fresh(inputs[f"assign_{g}"], key, self.spec.group(g).clusters)
        return {f"fresh_{g}_out": fresh}


def graph_module(adapter, spec: ExportSpec, name: str) -> StepGraph:
    if name in STEP_GRAPHS:
        return ModelStepGraph(adapter, spec, name).eval()
    if name == GRAPH_COND:
        return CondGraph(adapter, spec).eval()
    kind, _, group = name.partition("_")
    if kind == "cluster":
        return ClusterGraph(spec, group).eval()
    if kind == "select":
        return SelectGraph(spec, group).eval()
    raise ValueError(f"unknown graph {name!r}")


def example_inputs(spec: ExportSpec, name: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Valid example inputs for tracing (indices in range, coefficients finite)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.graphs[name].inputs:
        if t.dtype == "int64":
            high = _index_bound(spec, t.name)
            out.append(torch.randint(0, high, t.shape, generator=gen, dtype=torch.int64))
        else:
            out.append(torch.rand(t.shape, generator=gen) if t.shape else torch.rand((), generator=gen))
    return tuple(out)


def _index_bound(spec: ExportSpec, name: str) -> int:
    if name == COND_ROW:
        return spec.cond_rows
    for g in spec.groups:
        if name == f"assign_{g.name}":
            return max(g.clusters, 1)
        if name in (f"fresh_{g.name}", f"init_{g.name}"):
            return g.tokens
    for t in (*spec.model_inputs, *spec.cond_inputs):
        if t.name == name:
            return 2
    raise KeyError(name)
