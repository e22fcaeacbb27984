"""GPU benchmark of the torch backend: full, ClusCa and TaylorSeer on our CUDA engine against eager
diffusers, on the same weights, with latency, speed-up, efficiency, peak memory and host
synchronisations per sample. Part of ``scripts/gpu-check.sh`` (issue 14).

    python benchmarks/gpu.py --out DIR            # on a GPU: DiT-XL/2 (fp32, bf16) and FLUX.1-dev size (bf16)
    python benchmarks/gpu.py --tiny --out DIR     # anywhere, the CPU too: the same code at tiny sizes

Models (random weights, made on the device; nothing is downloaded):

* DiT-XL/2 at 256 x 256: diffusers' ``DiTTransformer2DModel`` (28 blocks, width 1152, 16 heads),
  converted to our DiT in memory (the same weights); one sample with classifier-free guidance
  (batch 2), 50 DDIM steps, cfg 1.5; ClusCa N=5, K=16, gamma 0.005, O=2; TaylorSeer N=5, O=2.
  Eager diffusers: the diffusers model called every step by the same DDIM loop (our sampler).
* FLUX.1-dev size at 1024 x 1024: diffusers' ``FluxTransformer2DModel`` with FLUX.1-dev's
  architecture (19 double- and 38 single-stream blocks, width 3072, 512 T5 tokens) in bf16, random
  prompt embeddings, 50 flow-matching steps, guidance 3.5; ClusCa N=6, K=16, O=1; TaylorSeer N=6,
  O=1. Eager diffusers: the same module called every step, diffusers' scheduler on the GPU (as
  ``FluxPipeline`` runs it). If the first full step says the whole run would not fit ``--budget``
  seconds, blocks are dropped from the end of both stacks in proportion and the table says so.

Each method runs twice on a short schedule first (warm-up: the torch engine captures its CUDA
graphs), then ``--repeats`` rounds run every method once in a rotated order; latencies are
medians. FLOPs: matrix products, convolutions and attention of one call of each graph, counted by
``torch.utils.flop_counter`` (element-wise work not counted), summed over the method's schedule;
efficiency = wall speed-up / FLOPs speed-up. Peak memory: the CUDA allocator's peak during the
method's timed runs. Host syncs: the torch engine's count (downloads of ``out``, capture
synchronisations, waits for a pinned buffer) per sample. Writes ``DIR/gpu-bench.json`` and
``DIR/gpu-bench.md``. Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusca_trt.analysis.flops import schedule_flops  # noqa: E402
from clusca_trt.runtime.denoiser import sample_keys  # noqa: E402
from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402
from clusca_trt.spec import BuildOptions  # noqa: E402

log = logging.getLogger("gpu-bench")

DIT_SIZES = {  # diffusers DiTTransformer2DModel: heads, head dim, layers, latent side
    "xl": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32),
    "tiny": dict(num_attention_heads=4, attention_head_dim=8, num_layers=2, sample_size=8),
}
METHODS = ("full", "clusca", "taylorseer")


@dataclass
class Method:
    """One row: a callable that samples once and returns the final latents (host numpy)."""

    key: str
    label: str
    run: object  # (steps) -> np.ndarray
    samples: int
    engine: object = None  # our torch engine (host syncs, FLOPs), None for eager diffusers
    config: object = None  # ClusCaConfig of our methods
    seconds: list[float] = field(default_factory=list)
    latents: np.ndarray | None = None
    peak_bytes: int | None = None
    syncs: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# environment


def env_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": str(device), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet():
    """diffusers and the model loaders log and warn; keep the output to the tables."""
    for name in ("diffusers", "transformers", "clusca_trt"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return contextlib.redirect_stderr(io.StringIO())


# ------------------------------------------------------------------------------------------
# measuring


def measure(methods: list[Method], steps: int, warmup_steps: int, repeats: int, device: torch.device) -> None:
    for m in methods:  # twice: every graph a short run calls is then warmed up and captured
        log.info("warm-up: %s (2 x %d steps)", m.label, warmup_steps)
        m.run(warmup_steps)
        m.run(warmup_steps)
    for r in range(repeats):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            before = m.engine.host_syncs if m.engine is not None else 0
            sync(device)
            t0 = time.perf_counter()
            latents = m.run(steps)
            sync(device)
            m.seconds.append(time.perf_counter() - t0)
            if m.engine is not None:
                m.syncs.append(m.engine.host_syncs - before)
            if device.type == "cuda":
                m.peak_bytes = max(m.peak_bytes or 0, int(torch.cuda.max_memory_allocated(device)))
            m.latents = latents
            log.info("round %d: %s %.3f s", r + 1, m.label, m.seconds[-1])


def summarize(methods: list[Method], pipe, steps: int, per_graph: dict[str, int]) -> dict:
    """Rows by method key: latency, speed-ups, FLOPs, efficiency, memory, host syncs, error vs full."""
    by_key = {m.key: m for m in methods}
    full, eager = by_key["full"], by_key.get("diffusers")
    ref = full.latents
    rows = {}
    full_flops = None
    for m in methods:
        lat = statistics.median(m.seconds)
        row = {"label": m.label, "latency_s": round(lat, 4), "runs_s": [round(s, 4) for s in m.seconds],
               "speedup_vs_full": round(statistics.median(full.seconds) / lat, 3)}
        if eager is not None:
            row["speedup_vs_diffusers"] = round(statistics.median(eager.seconds) / lat, 3)
        if m.config is not None:
            planned = pipe.plan(steps, m.config)
            sched = schedule_flops(per_graph, pipe.spec, planned, clustered=m.config.clusters > 0)
            row["flops"] = sched.total
            row["calls"] = sched.calls
            if m.key == "full":
                full_flops = sched.total
        if m.syncs:
            row["host_syncs_per_sample"] = statistics.median(m.syncs) / m.samples
        if m.peak_bytes is not None:
            row["peak_memory_gib"] = round(m.peak_bytes / 2**30, 2)
        if m is not full and ref is not None:
            row["rel_l2_vs_full"] = float(np.linalg.norm(m.latents - ref) / max(np.linalg.norm(ref), 1e-30))
        rows[m.key] = row
    for row in rows.values():
        if "flops" in row and full_flops:
            row["flops_speedup"] = round(full_flops / row["flops"], 3)
            row["efficiency"] = round(row["speedup_vs_full"] / row["flops_speedup"], 3)
    return rows


def finish(pipe, methods: list, steps: int) -> dict:
    """The result fields every model has (graph FLOPs, device memory, the methods' table), read
    before the pipeline is closed; closes it."""
    per_graph = pipe.engine.graph_flops()
    fields = {"device_memory_mib": {k: round(v / 2**20, 2) for k, v in pipe.engine.memory().items()},
              "flops_per_call": per_graph, "methods": summarize(methods, pipe, steps, per_graph)}
    pipe.close()
    return fields


def ours(pipe, inputs: dict, settings: dict, samples: int) -> list[Method]:
    out = []
    for key in METHODS:
        kw = dict(settings.get(key, {}))
        config = pipe.resolve_config(key, **kw)

        def run(steps, key=key, kw=kw):
            return pipe.generate(**inputs, steps=steps, method=key, **kw).latents

        label = {"full": "ours, full", "clusca": "ours, ClusCa", "taylorseer": "ours, TaylorSeer"}[key]
        out.append(Method(key, f"{label} ({pipe.engine.provider})", run, samples, pipe.engine, config))
    return out


# ------------------------------------------------------------------------------------------
# DiT-XL/2


def make_dit(size: str, device: torch.device, seed: int):
    """(our DiT adapter, diffusers' DiTTransformer2DModel) with the same random weights, on ``device``."""
    from diffusers import DiTTransformer2DModel

    from clusca_trt.models import dit

    kw = DIT_SIZES[size]
    with torch.device(device):
        theirs = DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=1000, **kw)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 4.0))
        first = theirs.transformer_blocks[0].norm1.emb
        for blk in theirs.transformer_blocks[1:]:  # one conditioning embedding, as every converted checkpoint
            blk.norm1.emb.load_state_dict(first.state_dict())
    cfg = dit.DiTConfig(input_size=kw["sample_size"], patch_size=2, in_channels=4,
                        hidden_size=kw["num_attention_heads"] * kw["attention_head_dim"], depth=kw["num_layers"],
                        num_heads=kw["num_attention_heads"], num_classes=1000, learn_sigma=True, time_freq_shift=1,
                        mlp_norm_eps=theirs.config.norm_eps)
    with torch.device(device):
        model = dit.DiT(cfg)
    sd = dit._from_diffusers_state_dict(theirs.state_dict(), cfg)
    sd["pos_embed"] = model.pos_embed.detach().clone()
    model.load_state_dict({k: v.to(device) for k, v in sd.items()})
    return dit.DiTAdapter(model.eval()), theirs.eval()


def diffusers_dit(model, dtype, device, labels, seed: int, cfg_scale: float):
    """Eager diffusers: our DDIM loop with guidance around the diffusers model call."""
    from clusca_trt.runtime.dit import apply_cfg
    from clusca_trt.runtime.denoiser import initial_noise
    from clusca_trt.runtime.samplers import GaussianDiffusion

    B, C = len(labels), model.config.in_channels
    shape = (C, model.config.sample_size, model.config.sample_size)
    y = torch.tensor(list(labels) + [model.config.num_embeds_ada_norm] * B, device=device)

    @torch.inference_mode()
    def run(steps):
        diffusion = GaussianDiffusion(steps, "ddim")
        x = initial_noise(sample_keys(seed, B), shape)
        for s in range(steps):
            i = steps - 1 - s
            xin = torch.from_numpy(np.concatenate([x, x])).to(device, dtype)
            t = torch.full((2 * B,), diffusion.model_timestep(i), device=device)
            out = model(xin, timestep=t, class_labels=y).sample.float().cpu().numpy()
            x = diffusion.step(x, apply_cfg(out, B, C, cfg_scale), i, None)
        return x

    return run


def bench_dit(args, device: torch.device, precision: str) -> dict:
    size = "tiny" if args.tiny else "xl"
    name = f"DiT-{'tiny' if args.tiny else 'XL/2'} {precision}"
    log.info("%s: making the model", name)
    adapter, theirs = make_dit(size, device, args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    theirs = theirs.to(dtype)
    K = 4 if args.tiny else 16
    spec = adapter.export_spec(BuildOptions(batch=1, clusters=K, order=2))
    pipe = Pipeline.from_adapter(adapter, spec, device=str(device), precision=precision)
    labels = [207]
    inputs = dict(class_labels=labels, seed=args.seed, sampler="ddim", cfg_scale=1.5)
    methods = ours(pipe, inputs, {"clusca": {"interval": 5, "propagation": 0.005}, "taylorseer": {"interval": 5}},
                   len(labels))
    methods.append(Method("diffusers", f"diffusers DiTTransformer2DModel, eager ({precision})",
                          diffusers_dit(theirs, dtype, device, labels, args.seed, 1.5), len(labels)))
    steps = args.steps
    measure(methods, steps, args.warmup_steps, args.repeats, device)
    result = {"model": name, "precision": precision, "steps": steps, "samples": len(labels), "guidance": 1.5,
              "config": {"size": size, **DIT_SIZES[size], "K": K, "order": 2}, **finish(pipe, methods, steps)}
    del pipe, adapter, theirs, methods
    free(device)
    return result


# ------------------------------------------------------------------------------------------
# FLUX.1-dev size


def make_flux(tiny: bool, device: torch.device, seed: int):
    """(diffusers' FluxTransformer2DModel with random weights in bf16, its config)."""
    from diffusers import FluxTransformer2DModel

    from clusca_trt.models.flux import NAMED_CONFIGS

    cfg = NAMED_CONFIGS["flux-tiny" if tiny else "flux-dev"]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**cfg.transformer_config())
    model = model.to(torch.bfloat16).eval()
    return model, cfg


def truncate_flux(model, cfg, fraction: float):
    """Keep the first ``fraction`` of both block stacks (at least one each); returns the new config."""
    import torch.nn as nn

    double = max(1, round(cfg.num_layers * fraction))
    single = max(1, round(cfg.num_single_layers * fraction)) if cfg.num_single_layers else 0
    model.transformer_blocks = nn.ModuleList(list(model.transformer_blocks)[:double])
    model.single_transformer_blocks = nn.ModuleList(list(model.single_transformer_blocks)[:single])
    return cfg.replace(num_layers=double, num_single_layers=single)


def diffusers_flux(model, cfg, runtime, sampling, embeds, device, seed: int, guidance: float):
    """Eager diffusers: the transformer called every step, diffusers' scheduler on the device."""
    from clusca_trt.models.flux import position_ids

    ids = position_ids(cfg).to(device)
    txt_ids, img_ids = ids[: cfg.text_length], ids[cfg.text_length:]
    pe, pp = (torch.from_numpy(e).to(device, torch.bfloat16) for e in embeds)
    g = torch.full((1,), guidance, device=device, dtype=torch.float32) if cfg.guidance_embeds else None

    @torch.inference_mode()
    def run(steps):
        scheduler = runtime.make_scheduler(sampling, steps)
        x = torch.from_numpy(runtime.initial_latents(sample_keys(seed, 1), sampling)).to(device, torch.bfloat16)
        for t in scheduler.timesteps:
            timestep = t.expand(1).to(device, torch.bfloat16) / 1000
            out = model(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pp, timestep=timestep,
                        img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0]
            x = scheduler.step(out, t, x, return_dict=False)[0]
        return runtime.finish(x.float().cpu().numpy(), sampling)  # unpacked, as our runtime returns them

    return run


def bench_flux(args, device: torch.device, deadline: float) -> dict:
    from types import SimpleNamespace

    from clusca_trt.models.flux import FluxAdapter
    from clusca_trt.runtime.flux import RUNTIME

    log.info("FLUX: making the model")
    model, cfg = make_flux(args.tiny, device, args.seed)
    full_size = (cfg.num_layers, cfg.num_single_layers)
    steps = args.steps
    scaled = None
    adapter = FluxAdapter(model, cfg)
    spec = adapter.export_spec(BuildOptions(batch=1, clusters=4 if args.tiny else 16, order=1))
    rng = np.random.default_rng(args.seed)
    embeds = [rng.standard_normal((1, cfg.text_length, cfg.joint_attention_dim), dtype=np.float32),
              rng.standard_normal((1, cfg.pooled_projection_dim), dtype=np.float32)]
    # one eager full step of the whole model says what a run costs; scale the blocks to the budget
    probe = Pipeline.from_adapter(adapter, spec, device=str(device), precision="bf16", cuda_graphs=False)
    inputs = dict(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], seed=args.seed, guidance_scale=3.5)
    probe.generate(**inputs, steps=1, method="full")
    sync(device)
    t0 = time.perf_counter()
    probe.generate(**inputs, steps=2, method="full")
    sync(device)
    step_s = (time.perf_counter() - t0) / 2
    probe.close()
    del probe
    # full-step equivalents: warm-ups + repeats x (ours full, ClusCa ~N/5 + partial, TaylorSeer, eager diffusers)
    per_round = steps * (1 + 1.05) + 2 * (steps / 6 + 4)
    needed = step_s * (args.repeats * per_round + 4 * args.warmup_steps * 2)
    left = deadline - time.monotonic()
    if needed > left and not args.tiny:
        fraction = max(0.05, left / needed * 0.9)
        cfg = truncate_flux(model, cfg, fraction)
        adapter = FluxAdapter(model, cfg)
        spec = adapter.export_spec(BuildOptions(batch=1, clusters=16, order=1))
        scaled = {"double": cfg.num_layers, "single": cfg.num_single_layers, "of": list(full_size),
                  "why": f"a full step took {step_s:.3f} s; the whole run needed about {needed:.0f} s, {left:.0f} s left"}
        log.warning("FLUX scaled to %d/%d double and %d/%d single blocks (%s)", cfg.num_layers, full_size[0],
                    cfg.num_single_layers, full_size[1], scaled["why"])
        free(device)
    pipe = Pipeline.from_adapter(adapter, spec, device=str(device), precision="bf16")
    methods = ours(pipe, inputs, {"clusca": {"interval": 6}, "taylorseer": {"interval": 6}}, 1)
    sampling = SimpleNamespace(**adapter.sampling_info())
    methods.append(Method("diffusers", "diffusers FluxTransformer2DModel, eager (bf16)",
                          diffusers_flux(model, cfg, RUNTIME, sampling, embeds, device, args.seed, 3.5), 1))
    measure(methods, steps, args.warmup_steps, args.repeats, device)
    result = {"model": f"FLUX.1-dev size{' (tiny)' if args.tiny else ''} bf16", "precision": "bf16", "steps": steps,
              "samples": 1, "guidance": 3.5, "first_full_step_s": round(step_s, 4),
              "config": {"height": cfg.height, "width": cfg.width, "text_length": cfg.text_length,
                         "double_blocks": cfg.num_layers, "single_blocks": cfg.num_single_layers,
                         "hidden": cfg.hidden_size, "K": spec.options.clusters, "order": 1},
              "scaled": scaled, **finish(pipe, methods, steps)}
    del pipe, adapter, model, methods
    free(device)
    return result


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# output


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# GPU benchmark ({'tiny sizes, ' if report['tiny'] else ''}{env.get('gpu', env['device'])}, "
             f"torch {env['torch']}, CUDA {env.get('cuda')})", ""]
    for r in report["results"]:
        if "error" in r:
            lines += [f"## {r['model']}", "", f"failed: {r['error']}", ""]
            continue
        lines += [f"## {r['model']}, {r['steps']} steps", ""]
        if r.get("scaled"):
            s = r["scaled"]
            lines += [f"Scaled: {s['double']}/{s['of'][0]} double and {s['single']}/{s['of'][1]} single blocks "
                      f"({s['why']}).", ""]
        lines += ["| method | latency s | vs full | vs diffusers | FLOPs x | efficiency | peak GiB | host syncs/sample |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["methods"].values():
            lines.append(
                f"| {row['label']} | {row['latency_s']:.3f} | {row['speedup_vs_full']:.2f}x | "
                f"{_f(row.get('speedup_vs_diffusers'), 2, 'x')} | {_f(row.get('flops_speedup'), 2, 'x')} | "
                f"{_f(row.get('efficiency'), 2)} | {_f(row.get('peak_memory_gib'), 2)} | "
                f"{_f(row.get('host_syncs_per_sample'), 0)} |")
        lines.append("")
    return "\n".join(lines)


def _f(v, digits: int, suffix: str = "") -> str:
    return "" if v is None else f"{v:.{digits}f}{suffix}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu-bench.json and gpu-bench.md")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and few steps (CPU-friendly; for tests)")
    ap.add_argument("--device", default=None, help="cuda[:N] or cpu [default: cuda if available]")
    ap.add_argument("--models", default="dit,flux", help="comma-separated: dit, flux")
    ap.add_argument("--dit-precisions", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps [default: 50; --tiny: 6]")
    ap.add_argument("--warmup-steps", type=int, default=None, help="steps of the warm-up run [default: 8; --tiny: 4]")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds [default: 3; --tiny: 1]")
    ap.add_argument("--budget", type=float, default=360.0, help="seconds for the whole script (FLUX is scaled to fit)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.steps = args.steps or (6 if args.tiny else 50)
    args.warmup_steps = args.warmup_steps or (4 if args.tiny else 8)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    deadline = time.monotonic() + args.budget
    logging.basicConfig(level=logging.INFO, format="gpu-bench: %(message)s", stream=sys.stdout, force=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tiny": args.tiny,
              "env": env_info(device), "args": {k: str(v) for k, v in vars(args).items()}, "results": []}
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "dit" in models:
        jobs += [(f"DiT {p}", lambda p=p: bench_dit(args, device, p)) for p in args.dit_precisions.split(",") if p]
    if "flux" in models:
        jobs.append(("FLUX", lambda: bench_flux(args, device, deadline)))
    with quiet():
        for label, job in jobs:
            try:
                report["results"].append(job())
            except Exception as e:  # one model's failure leaves the others' numbers
                log.exception("%s failed", label)
                report["results"].append({"model": label, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
                free(device)
            (args.out / "gpu-bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu-bench.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
