"""Feeding the step graphs in tests: the conditioning a step's inputs give (``cond`` graph tables)."""

from __future__ import annotations

import torch

from clusca_trt.steps import graph_module


def conditioned(adapter, inputs: dict) -> dict:
    """``inputs`` plus the adapter's conditioning of them: what ``forward_step`` takes."""
    return {**inputs, **adapter.conditioning(inputs)}


def step_tables(adapter, spec, inputs: dict, step: int = 3) -> dict:
    """The cond graph's tables with ``inputs``' conditioning inputs at the rows of ``step`` (and, at
    every other step's rows, the same inputs with other timesteps), and that step's ``cond_row``."""
    B, steps = spec.graph_batch, spec.options.cond_steps
    feeds = {}
    for t in spec.cond_inputs:
        rows = [inputs[t.name]] * steps
        if t.name in ("t", "timestep"):  # other steps: other timesteps, so a wrong row shows
            rows = [inputs[t.name] * 0 + (s + 1) / (steps + 1) * (999 if t.name == "t" else 1) for s in range(steps)]
            rows[step] = inputs[t.name]
        feeds[t.name] = torch.cat(rows)
    cond = graph_module(adapter, spec, "cond")
    with torch.no_grad():
        tables = cond(*[feeds[n] for n in cond.input_names])
    row = torch.arange(B) + step * B
    return {"cond_row": row, **{n[: -len("_out")]: v for n, v in zip(cond.output_names, tables)}}


def per_block(caches: dict) -> dict:
    """Caches stacked over the blocks (``attn_f0`` [L, B, T, D], ``attn_fhi`` [L, O, B, T, D]) as the
    graphs take them: one tensor per block (``attn_f0_0``, ``attn_fhi_0``, ...)."""
    return {f"{name}_{i}": value[i] for name, value in caches.items() for i in range(value.shape[0])}


def read_cache(engine, name: str):
    """A cache factor of every block (``mlp_f0`` -> ``mlp_f0_0``, ``mlp_f0_1``, ...) read back and stacked."""
    import numpy as np

    blocks = sorted((n for n in engine.state_specs if n.rsplit("_", 1)[0] == name), key=lambda n: int(n.rsplit("_", 1)[1]))
    return np.stack([engine.read_state(n) for n in blocks])
