"""Why computing some tokens exactly does not beat forecasting them all on ``dit-digits``: where
the fresh values help and where they hurt, block by block.

    python benchmarks/fresh_values.py                 # 20 samples, N=5, K=16: about 5 min on 2 cores
    python benchmarks/fresh_values.py --samples 40 --interval 8

Runs ClusCa with the ``step`` rule and correction 0 (the TaylorSeer trajectory: the fresh rows are
computed, and change nothing) on the torch backend, and at every partial step also runs the model
in full on the same input (the truth a correction aims at). Per block b, at b's fresh tokens, it
measures (means over partial steps and tokens, relative L2 errors against the truth):

* the MLP output: the Taylor forecast vs the fresh value ``f_j`` (the MLP on the partial step's
  residual stream);
* the final layer's input (the residual stream after the last block): the forecast everywhere vs
  with block b's MLP corrected at those tokens (``e_final - e_M(b) + e'_M(b)``; a partial step
  computes no attention, so no other token and no other block changes);
* the model output (the final layer: LayerNorm, modulation, linear): the same two, aggregated over
  tokens and steps.

A ratio below 1 in the last column: correcting block b at its fresh tokens brings the model's
output closer to full compute; above 1: further. Writes ``fresh-values.md`` and ``.json`` to
``--out`` (default ``benchmarks/results``). Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusca_trt import ops, steps  # noqa: E402
from clusca_trt.analysis.bench import device_name  # noqa: E402
from clusca_trt.context import PartialContext, PlainContext  # noqa: E402
from clusca_trt.models import load_model  # noqa: E402
from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402
from clusca_trt.spec import GRAPH_PARTIAL, BuildOptions  # noqa: E402

MODEL = "dit-digits"


class Truth(PlainContext):
    """The model in full on the partial step's input: every branch output, by block."""

    def __init__(self, slots):
        super().__init__(slots)
        self.out: dict = {}

    def branch(self, slot, layer, fn):
        self.out[("attn", layer)] = y = fn()
        return y

    def fresh_branch(self, slot, layer, h, row_fn):
        self.out[("mlp", layer)] = y = row_fn(h)
        return y

    def hidden(self, group, h):
        self.out["final"] = h


class Forecast(PartialContext):
    """The partial step on the forecast alone (the TaylorSeer trajectory), recording every block's
    attention and MLP forecast, its fresh rows and the fresh values there."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.out: dict = {}

    def branch(self, slot, layer, fn):
        self.out[("attn", layer)] = y = super().branch(slot, layer, fn)
        return y

    def fresh_branch(self, slot, layer, h, row_fn):
        rows = self._group(self.slots[slot].fresh_group, h.shape[1])[0][layer]
        forecast = self.fns.taylor_forecast(self.cache(slot, "f0", layer), self.cache(slot, "fhi", layer), self.coef)
        self.out[("mlp", layer)] = forecast
        self.out[("rows", layer)] = rows
        self.out[("fresh", layer)] = row_fn(ops.take_rows(h, rows))
        self.write(slot, "f0", layer, self.cache(slot, "f0", layer))
        return forecast


class Recorder:
    def __init__(self):
        self.stats = defaultdict(list)

    def partial(self, graph: steps.ModelStepGraph, inputs: dict) -> dict:
        spec, adapter = graph.spec, graph.adapter
        model_inputs = graph.model_inputs(inputs)
        truth = Truth(spec.slots)
        adapter.forward_step(truth, model_inputs)
        groups = [g.name for g in spec.clustered_groups]
        caches = {t.name: inputs[t.name] for t in spec.cache_tensors()}
        ctx = Forecast(spec.slots, caches, inputs["forecast_coef"], inputs["gamma"][:1],
                       assign={g: inputs[f"assign_{g}"] for g in groups}, fresh={g: inputs[f"fresh_{g}"] for g in groups})
        out = {"out": adapter.forward_step(ctx, model_inputs), **ctx.new_state()}
        self.measure(adapter, model_inputs, truth.out, ctx.out)
        return out

    def measure(self, adapter, model_inputs: dict, truth: dict, fc: dict) -> None:
        mod = model_inputs["mod"]  # [rows, L, 6D]: shift, scale, gate of attention, then of the MLP
        blocks = mod.shape[1]
        gates = [mod[:, b].chunk(6, dim=1) for b in range(blocks)]
        e_final = sum(g[2].unsqueeze(1) * (fc[("attn", b)] - truth[("attn", b)])
                      + g[5].unsqueeze(1) * (fc[("mlp", b)] - truth[("mlp", b)]) for b, g in enumerate(gates))
        final = adapter.model.final_layer
        shift, scale = model_inputs["mod_final"].chunk(2, dim=1)

        def output(h):  # the final layer on the residual stream after the last block, per token
            return final.linear(final.norm_final(h) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))

        h_true = truth["final"]
        y_true, y_fc = output(h_true), output(h_true + e_final)

        def rel(a, b):
            return (a - b).norm(dim=-1) / b.norm(dim=-1)

        for b in range(blocks):
            rows, gate = fc[("rows", b)], gates[b][5].unsqueeze(1)
            m_true = ops.take_rows(truth[("mlp", b)], rows)
            self.stats[(b, "forecast")].append(float(rel(ops.take_rows(fc[("mlp", b)], rows), m_true).mean()))
            self.stats[(b, "fresh")].append(float(rel(fc[("fresh", b)], m_true).mean()))
            e_b = ops.take_rows(e_final, rows)
            swap = gate * (fc[("fresh", b)] - m_true) - gate * (ops.take_rows(fc[("mlp", b)], rows) - m_true)
            h_t = ops.take_rows(h_true, rows)
            self.stats[(b, "stream_fc")].append(float((e_b.norm(dim=-1) / h_t.norm(dim=-1)).mean()))
            self.stats[(b, "stream_fresh")].append(float(((e_b + swap).norm(dim=-1) / h_t.norm(dim=-1)).mean()))
            y_t = ops.take_rows(y_true, rows)
            y_c = output(h_t + e_b + swap)
            self.stats[(b, "out_fc_sq")].append(float(((ops.take_rows(y_fc, rows) - y_t) ** 2).sum()))
            self.stats[(b, "out_fresh_sq")].append(float(((y_c - y_t) ** 2).sum()))


@contextlib.contextmanager
def recording(recorder: Recorder):
    """The partial graph's module computes through ``recorder`` while inside (this script only)."""
    original = steps.ModelStepGraph.compute

    def compute(self, inputs):
        return recorder.partial(self, inputs) if self.graph.name == GRAPH_PARTIAL else original(self, inputs)

    steps.ModelStepGraph.compute = compute
    try:
        yield
    finally:
        steps.ModelStepGraph.compute = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--interval", "-N", type=int, default=5)
    p.add_argument("--clusters", "-K", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    t0 = time.perf_counter()
    loaded = load_model(MODEL)
    spec = loaded.adapter.export_spec(BuildOptions(batch=args.batch, clusters=args.clusters, order=2))
    pipe = Pipeline.from_adapter(loaded.adapter, spec)
    recorder = Recorder()
    with torch.no_grad(), recording(recorder):
        pipe.generate([i % 10 for i in range(args.samples)], method="clusca", interval=args.interval, order=2,
                      propagation=0.0, update="step", correction=0.0, seed=args.seed, steps=50, cfg_scale=1.5)
    s = recorder.stats
    blocks = sorted({b for b, _ in s})
    rows = []
    for b in blocks:
        rows.append({
            "block": b,
            "mlp_forecast_error": float(np.mean(s[(b, "forecast")])),
            "mlp_fresh_error": float(np.mean(s[(b, "fresh")])),
            "stream_forecast_error": float(np.mean(s[(b, "stream_fc")])),
            "stream_corrected_error": float(np.mean(s[(b, "stream_fresh")])),
            "output_error_ratio": float(np.sqrt(np.sum(s[(b, "out_fresh_sq")]) / np.sum(s[(b, "out_fc_sq")]))),
        })
    cmd = " ".join(["python"] + sys.argv)
    md = [
        f"# Fresh values against the forecast, block by block (`{MODEL}`)",
        "",
        f"`{cmd}` in {(time.perf_counter() - t0) / 60:.0f} min on {device_name()}, torch backend "
        f"(torch {torch.__version__}). {args.samples} samples (labels 0..9), seed {args.seed}, 50-step DDIM, CFG 1.5, "
        f"N={args.interval}, K={args.clusters}, O=2, on the TaylorSeer trajectory (update step, correction 0). Relative "
        "L2 errors against the model run in full on the same input, at each block's fresh tokens, means over the "
        "partial steps and tokens.",
        "",
        "| block | MLP output: forecast | MLP output: fresh value | stream after the last block: forecast | "
        "same, block corrected | model output error, corrected / forecast |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(f"| {r['block']} | {r['mlp_forecast_error']:.4f} | {r['mlp_fresh_error']:.4f} | "
                  f"{r['stream_forecast_error']:.4f} | {r['stream_corrected_error']:.4f} | {r['output_error_ratio']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fresh-values.md").write_text("\n".join(md) + "\n")
    (args.out / "fresh-values.json").write_text(json.dumps({"command": cmd, "device": device_name(),
                                                           "settings": {k: str(v) for k, v in vars(args).items()},
                                                           "blocks": rows}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
