"""clusca-trt: build ClusCa engines, generate with them, inspect what was built.

A thin layer over library calls: errors become one line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import json
import io
import logging
import re
import sys
from pathlib import Path

import click

from .config import UpdateRule
from .errors import ClusCaError, InputError, describe, one_line

log = logging.getLogger("clusca_trt.cli")

METHODS = ("clusca", "taylorseer", "fora", "full")


def _setup_logging(verbose: int, quiet: bool) -> None:
    """Our own log at INFO (progress, which provider ran); other libraries' at WARNING (-vv: all DEBUG)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    root = logging.DEBUG if verbose > 1 else logging.WARNING
    logging.basicConfig(level=root, format="clusca-trt: %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("clusca_trt").setLevel(level)


def _errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClusCaError as e:
            raise click.ClickException(one_line(e)) from None
        except (OSError, ValueError) as e:
            raise click.ClickException(describe(e)) from None

    return wrapper


@click.group()
@click.version_option(package_name="clusca-trt")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(verbose: int, quiet: bool) -> None:
    """Cluster-driven feature caching (ClusCa) for Diffusion Transformers, as static engines."""
    _setup_logging(verbose, quiet)


def _labels(value: str | None) -> list[int] | None:
    """``--class-labels``: comma-separated integers, each one there (no empty list, no empty item)."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    if not all(re.fullmatch(r"-?[0-9]+", v) for v in items):
        raise InputError(f"--class-labels: expected comma-separated integers, got {value!r}")
    return [int(v) for v in items]


@main.command()
@click.option("--model", "model_name", default=None, help="Model name (default: the built-in, trained dit-digits).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Original DiT .pt file or diffusers folder.")
@click.option("--random-init", is_flag=True, help="Random weights (tests and benchmarks only).")
@click.option("--seed", default=0, show_default=True, help="Seed of --random-init.")
@click.option("--clusters", "-K", type=int, default=None,
              help="K, clusters (0: TaylorSeer/FORA only) [default: the model's: DiT/FLUX 16, HunyuanVideo 32].")
@click.option("--order", "-O", type=int, default=None,
              help="Highest Taylor order the engines keep [default: the model's: DiT 2, FLUX/HunyuanVideo 1].")
@click.option("--batch", "-B", default=1, show_default=True, help="Samples per engine call (CFG doubles it).")
@click.option("--kmeans-iterations", default=10, show_default=True, help="Lloyd iterations in the cluster graph.")
@click.option("--distance", type=click.Choice(["l1", "l2"]), default="l2", show_default=True,
              help="k-means distance: squared L2 by one MatMul per iteration; l1: the reference's (costlier).")
@click.option("--opset", default=20, show_default=True, type=click.IntRange(18, 20),
              help="ONNX opset; 20 exports tanh-GELU as one Gelu node (TensorRT 10 parses it).")
@click.option("--height", type=int, default=None, help="FLUX: image height in pixels, multiple of 16 [default: 1024].")
@click.option("--width", type=int, default=None, help="FLUX: image width in pixels, a multiple of 16 [default: 1024].")
@click.option("--text-length", type=int, default=None, help="FLUX: T5 tokens per prompt [default: 512; schnell 256].")
@click.option("--frames", type=int, default=None, help="HunyuanVideo: video frames, 4 k + 1 [default: 65].")
@click.option("--text-clusters", type=int, default=None, help="FLUX: K of the text tokens [default: --clusters, at most the text tokens].")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Engine directory (default engines/<model>).")
@click.option("--force", is_flag=True, help="Rebuild even if the engines are up to date.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt: also build TensorRT plans (checks every graph for TensorRT first).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="TensorRT plan precision of the model graphs [default: fp16]; k-means/selection stay fp32.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimisation level.")
@click.option("--workspace", type=click.IntRange(min=1), default=None, help="TensorRT workspace limit in MiB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="TensorRT timing cache file, reused across builds (default: a per-user cache).")
@click.option("--device", type=click.IntRange(min=0), default=0, show_default=True, help="CUDA device for TensorRT.")
@_errors
def build(model_name, checkpoint, random_init, seed, clusters, order, batch, kmeans_iterations, distance, opset, out, force,
          backend, precision, opt_level, workspace, timing_cache, device, height, width, text_length, text_clusters,
          frames):
    """Export the full, partial, forecast and clustering graphs of a model into an engine directory."""
    from .engines.trt_compat import check_graphs

    trt_options = None
    if backend == "tensorrt":
        from .exporters.trt_build import TrtBuildOptions, require_tensorrt

        require_tensorrt()  # before any export work: a one-line error saying how to install it
        trt_options = TrtBuildOptions(precision=precision or "fp16", optimization_level=opt_level,
                                      workspace_mib=workspace, timing_cache=timing_cache)
    elif precision not in (None, "fp32") or workspace is not None or timing_cache is not None:
        raise click.UsageError("--precision, --workspace and --timing-cache apply to --backend tensorrt "
                               "(ONNX Runtime graphs are float32)")
    from .exporters.build import build_engines
    from .models import DEFAULT_MODEL, load_model
    from .spec import BuildOptions

    # every size option in range before anything is loaded or allocated (the family defaults come later)
    BuildOptions(batch=batch, clusters=0 if clusters is None else clusters, order=0 if order is None else order,
                 kmeans_iterations=kmeans_iterations, distance=distance, opset=opset, text_clusters=text_clusters)
    name = DEFAULT_MODEL if model_name is None else model_name
    loaded = load_model(name, checkpoint=checkpoint, random_init=random_init, seed=seed,
                        height=height, width=width, text_length=text_length, frames=frames)
    family_defaults = loaded.adapter.default_run
    clusters = family_defaults.clusters if clusters is None else clusters
    order = family_defaults.order if order is None else order
    options = BuildOptions(
        batch=batch, clusters=clusters, order=order, kmeans_iterations=kmeans_iterations, distance=distance,
        opset=opset, text_clusters=text_clusters,
    )
    out = out or Path("engines") / name
    # every exported graph is checked for TensorRT: fatal for a TensorRT build, a warning otherwise
    check = functools.partial(check_graphs, strict=backend == "tensorrt")
    result = build_engines(loaded, options, out, force=force, check=check)
    state = "up to date" if result.reused else "built"
    click.echo(f"{result.manifest.directory}: {state} ({loaded.name}, K={clusters}, O={order}, batch={batch}, graphs: "
               f"{', '.join(result.manifest.data['graphs'])})")
    if trt_options is not None:
        from .exporters.trt_build import build_plans

        plans = build_plans(result.manifest, trt_options, device=device, force=force)
        click.echo(f"{plans.directory}: TensorRT {plans.data['tensorrt']['platform']['tensorrt']} plans "
                   f"({trt_options.precision}) for {', '.join(plans.data['tensorrt']['plans'])}")


def _device_options(fn):
    """--device and --precision of generate and bench (the torch backend; TensorRT: the device)."""
    fn = click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                      help="torch backend: weights and caches in this precision [default: fp32]; openvino: the model "
                           "graphs' inference precision [default: bf16 where the CPU has bf16 units, else fp32]; "
                           "k-means and selection stay fp32.")(fn)
    return click.option("--device", default=None, metavar="cpu|cuda[:N]",
                        help="torch backend: where it runs [default: cpu]; tensorrt: the GPU [default: cuda:0].")(fn)


def _parse_correction(ctx, param, value):
    if value is None:
        return None
    try:
        values = [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected a number or comma-separated numbers, got {value!r}") from None
    return values[0] if len(values) == 1 else tuple(values)


def _update_options(fn):
    """--update, --correction, --pair: how a partial step's fresh tokens update the caches (generate, bench)."""
    fn = click.option("--pair/--no-pair", default=None,
                      help="The cond and uncond rows of a sample share one clustering and its fresh tokens "
                           "[default: the model's].")(fn)
    fn = click.option("--correction", default=None, callback=_parse_correction, metavar="S|S0,S1,...",
                      help="Share of the fresh tokens' correction applied, in [0, 1] (update residual, step); "
                           "one number, or one per block with fresh rows.")(fn)
    return click.option("--update", type=click.Choice([u.value for u in UpdateRule]), default=None,
                        help="How fresh tokens update the MLP cache: paper (the reference), residual (by the "
                             "forecast's error, kept), step (by the forecast's error, this step only) "
                             "[default: the model's].")(fn)


def _progress(total: int, label: str):
    """A progress bar on stderr for interactive use; silent when stderr is not a terminal or with -q."""
    quiet = not logging.getLogger("clusca_trt").isEnabledFor(logging.INFO)
    return click.progressbar(length=total, label=label, file=io.StringIO() if quiet else sys.stderr)


def _family_options(fn):
    """The inputs of the families' sampling that are CLI options (``clusca_trt.families``: one schema
    for ``Pipeline.generate``, these options and the server's fields); each defaults to None here, so
    that an option given for a family that does not take it is refused, and the family's default
    fills the others."""
    from .families import cli_fields
    from .fields import COMMON

    for f in reversed([*(c for c in COMMON if c.cli), *cli_fields().values()]):
        default = "" if f.default is None else f" [default: {f.default}]"
        kind = {"prompts": dict(multiple=True), "labels": {}, "choice": dict(type=click.Choice(f.choices)),
                "int": dict(type=int), "number": dict(type=float)}[f.kind]
        fn = click.option(*f.cli, f.name, default=None, help=f.help + (default if f.kind != "prompts" else ""),
                          **kind)(fn)
    return fn


def _family_inputs(pipe, values: dict) -> dict:
    """The family inputs of ``generate`` / ``bench`` from their CLI options: options of other families
    refused, DiT's class labels 0..batch-1 by default, the rest left to the family's defaults."""
    from .families import cli_fields

    fam = pipe.family
    own = {f.name for f in fam.fields}
    given = {k: v for k, v in values.items() if v is not None and v != ()}
    for name in given:
        if name not in own:
            flag = cli_fields()[name].cli[0]
            raise InputError(f"expected {fam.primary.cli[0]} for a {fam.name} model, got {flag}")
    primary = fam.primary
    if primary.kind == "labels":
        given[primary.name] = _labels(given.get(primary.name)) or list(range(pipe.spec.options.batch))
    elif primary.name not in given:
        raise InputError(f"expected {primary.cli[0]} for a {fam.name} model, got none")
    else:
        given[primary.name] = list(given[primary.name])
    return given


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="[default: the build's (inspect shows it; clusca unless tune --write chose another)]")
@click.option("--interval", "-N", type=int, default=None, help="Cycle length N (default: the model's).")
@click.option("--propagation", "-G", type=float, default=None, help="Propagation ratio gamma.")
@click.option("--order", "-O", type=int, default=None, help="Taylor order (<= the built order).")
@click.option("--clusters", "-K", type=int, default=None, help="Must equal the built K (checked).")
@click.option("--warmup", "-W", type=int, default=None, help="Leading full steps.")
@click.option("--fresh", type=click.Choice(["random", "nearest"]), default=None, help="Fresh-token policy.")
@_update_options
@_family_options
@click.option("--height", type=int, default=None, help="FLUX: choose the build of this height (several in ENGINE_DIR).")
@click.option("--width", type=int, default=None, help="FLUX: choose the build of this width.")
@click.option("--frames", type=int, default=None, help="HunyuanVideo: choose the build of this frame count.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "torch", "tensorrt"]), default="onnxruntime",
              show_default=True, help="openvino: the graphs on OpenVINO's CPU plugin; tensorrt: the plans built with "
                                      "build --backend tensorrt.")
@_device_options
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads of a CPU backend (onnxruntime, openvino) [default: the backend's].")
@click.option("--out", "out_file", type=click.Path(path_type=Path), required=True,
              help=".npz (latents, labels, images), .png, or .mp4 for videos (several: <stem>-<i>.mp4)")
@click.option("--compare", is_flag=True,
              help="Run full, clusca, fora and taylorseer on the same inputs and seed; write a .png grid with one "
                   "row per method and print each one's measured speed-up vs full.")
@_errors
def generate(engine_dir, method, interval, propagation, order, clusters, warmup, fresh, update, correction, pair,
             provider, backend, device, precision, threads, out_file, height, width, frames, compare, **family_values):
    """Sample with the engines in ENGINE_DIR and write latents (.npz), an image grid (.png) or videos (.mp4)."""
    from .runtime.output import SUFFIXES, check_output, write_result
    from .runtime.pipeline import Pipeline

    if out_file.suffix not in SUFFIXES:
        raise click.BadParameter(f"expected a .npz, .png or .mp4 (video) file, got {out_file.name}", param_hint="--out")
    _labels(family_values.get("class_labels"))  # its syntax, before anything is loaded
    select = {"height": height, "width": width, "frames": frames}
    with Pipeline.load(engine_dir, provider=provider, backend=backend, select=select, device=device,
                       precision=precision, threads=threads) as pipe:
        check_output(out_file, has_decoder=pipe.decoder is not None)  # before sampling, not after
        inputs = _family_inputs(pipe, family_values)
        steps = inputs.setdefault("steps", pipe.family.steps(pipe.model["sampling"]))
        seed = inputs.pop("seed", 0)
        if compare:
            _compare(pipe, inputs, out_file, seed, dict(interval=interval, propagation=propagation, order=order,
                                                        warmup=warmup, fresh=fresh, clusters=clusters, update=update,
                                                        correction=correction, pair=pair))
            return
        count = len(inputs[pipe.family.primary.name])
        chunks = -(-count // pipe.spec.options.batch)
        with _progress(steps * chunks, "sampling") as bar:
            result = pipe.generate(
                **inputs, seed=seed, method=method, interval=interval, propagation=propagation, order=order,
                warmup=warmup, fresh=fresh, clusters=clusters, update=update, correction=correction, pair=pair,
                progress=lambda _step: bar.update(1),
            )
    write_result(result, out_file)
    c = result.config
    click.echo(f"{out_file}: {len(result.latents)} samples, {c.method.value} (N={c.interval}, K={c.clusters}, "
               f"O={c.order}, gamma={c.propagation}), {steps} steps on {result.engine} "
               f"in {result.seconds:.2f} s")


def _compare(pipe, inputs: dict, out_file: Path, seed: int, settings: dict) -> None:
    """generate --compare: every method on the same inputs, one PNG row each, speed-ups vs full."""
    from .runtime.compare import available_methods, compare_methods, write_comparison_png

    if out_file.suffix != ".png":
        raise click.BadParameter(f"expected a .png file with --compare, got {out_file.name}", param_hint="--out")
    methods = available_methods(bool(pipe.spec.clustered_groups), pipe.spec.options.order)
    runs = compare_methods(pipe, inputs, methods, seed=seed, **settings)
    write_comparison_png(runs, out_file)
    first = runs[0].result
    click.echo(f"{out_file}: {len(first.latents)} samples x {len(runs)} methods (rows), seed {seed}, "
               f"{inputs.get('steps')} steps on {first.engine}")
    for r in runs:
        click.echo(f"  {r.label:<40} {r.result.seconds:8.2f} s  {r.speedup:5.2f}x vs full")


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@_errors
def inspect(engine_dir, as_json, verify):
    """What was built: graphs, shapes, ClusCa settings, hashes, versions."""
    from .engines.inspect import describe
    from .engines.manifest import Manifest, list_builds

    infos = []
    for build_dir in list_builds(engine_dir):  # several for a directory with one build per resolution
        manifest = Manifest.read(build_dir)  # schema-checked
        if verify:
            manifest.check(hashes=True)  # the full check of Pipeline.load: sizes, sha256, graphs vs spec
        else:
            manifest.verify(hashes=False)
        infos.append(describe(manifest))
    if as_json:
        click.echo(json.dumps(infos[0] if len(infos) == 1 else {"builds": infos}, indent=2, sort_keys=True))
    else:
        click.echo("\n\n".join(_format(info) for info in infos))


def _format(info: dict) -> str:
    lines = [
        f"engine dir   {info['directory']}",
        f"model        {info['model']['name']} ({info['model']['family']}), source: {info['model']['source_summary']}",
        f"build        {info['build_summary']}",
        f"defaults     {info['defaults_summary']}",
        f"key          {info['key']}",
        f"cache        {info['cache']['summary']}",
        f"cpu          {info['cpu_backends']['summary']}",
        "graphs",
    ]
    for name, g in info["graphs"].items():
        lines.append(f"  {name:<12} {g['bytes'] / 1e6:9.2f} MB  sha256 {g['sha256'][:16]}")
        lines += [f"    file: {p}" for p in g["paths"]]
        lines.append(f"    in : {g['inputs']}")
        lines.append(f"    out: {g['outputs']}")
    lines.append("versions     " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())))
    return "\n".join(lines)



class _BaselineRefused(click.ClickException):
    exit_code = 2  # a baseline from another device / provider / versions / settings (1: a regression)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--methods", default="full,clusca,fora,taylorseer", show_default=True,
              help="Comma-separated methods, run interleaved (full is always included).")
@click.option("--interval", "-N", type=int, default=None, help="Cycle length N (default: the model's).")
@click.option("--propagation", "-G", type=float, default=None, help="Propagation ratio gamma.")
@click.option("--order", "-O", type=int, default=None, help="Taylor order (<= the built order).")
@click.option("--warmup", "-W", type=int, default=None, help="Leading full steps.")
@click.option("--fresh", type=click.Choice(["random", "nearest"]), default=None, help="Fresh-token policy.")
@_update_options
@click.option("--steps", "-S", default=50, show_default=True)
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)
@click.option("--cfg-scale", default=1.5, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--class-labels", default=None, help="Comma-separated class labels (default: 0..batch-1).")
@click.option("--repeats", "-r", default=3, show_default=True, help="Interleaved rounds; latencies are medians.")
@click.option("--warmup-runs", default=1, show_default=True, help="Untimed short runs of every method first.")
@click.option("--profile-calls", default=5, show_default=True,
              help="Profiled partial-graph calls that split its time (propagation); 0: skip.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "torch"]), default="onnxruntime",
              show_default=True)
@_device_options
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads of a CPU backend (onnxruntime, openvino).")
@click.option("--json", "json_file", type=click.Path(path_type=Path), default=None,
              help="Write the result as JSON (usable as a --baseline later).")
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="A JSON from an earlier bench on the same device/provider/versions.")
@click.option("--max-regression", default="10%", show_default=True,
              help="Tolerance against --baseline: exit 1 when a run is slower by more.")
@_errors
def bench(engine_dir, methods, interval, propagation, order, warmup, fresh, update, correction, pair, steps, sampler,
          cfg_scale, seed, class_labels, repeats, warmup_runs, profile_calls, provider, backend, device, precision,
          threads, json_file, baseline, max_regression):
    """Latency of the engines in ENGINE_DIR: full vs ClusCa vs FORA / TaylorSeer, interleaved.

    Prints median latency per step kind and per sampling run, wall and FLOPs speed-ups, their
    ratio (efficiency), ClusCa's overhead share and peak memory. With --baseline, exits 1 on a
    latency regression beyond --max-regression and 2 when the baseline is not comparable."""
    from .analysis.bench import (BaselineMismatchError, BenchSettings, compare, default_inputs, format_table,
                                load_baseline, parse_tolerance, run_bench, write_json)
    from .runtime.pipeline import Pipeline

    tol = parse_tolerance(max_regression)
    base = load_baseline(baseline) if baseline is not None else None
    settings = BenchSettings(
        steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()), interval=interval,
        propagation=propagation, order=order, warmup=warmup, fresh=fresh, update=update, correction=correction,
        pair=pair, repeats=repeats,
        warmup_runs=warmup_runs, profile_calls=profile_calls,
    )
    labels = _labels(class_labels)
    with Pipeline.load(engine_dir, provider=provider, backend=backend, threads=threads, device=device,
                       precision=precision) as pipe:
        inputs = default_inputs(pipe, settings, labels)
        result = run_bench(pipe, settings, inputs, threads=threads)
    click.echo(format_table(result))
    if json_file is not None:
        write_json(result, json_file)
        click.echo(f"{json_file}: written")
    if base is not None:
        try:
            regressions = compare(result, base, tol)
        except BaselineMismatchError as e:
            raise _BaselineRefused(str(e)) from None
        if regressions:
            raise click.ClickException(
                f"latency regression beyond {max_regression}: " + "; ".join(str(r) for r in regressions))
        click.echo(f"no latency regression beyond {max_regression} against {baseline}")


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--min-psnr", type=float, default=None, help="Quality floor: mean PSNR (dB) vs full compute, same seeds.")
@click.option("--min-ssim", type=float, default=None, help="Quality floor: mean SSIM vs full compute, same seeds.")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="At most these seconds of sampling per engine call (one engine batch); alone: the best PSNR within it.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Calibration samples [default: DiT 16, FLUX/HunyuanVideo 4].")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="FLUX/HunyuanVideo: a text file of calibration prompts, one per line.")
@click.option("--embeddings", "embeddings_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="FLUX/HunyuanVideo: an .npz of prompt_embeds, pooled_prompt_embeds (HunyuanVideo: and "
                   "prompt_attention_mask) [default for random-weight builds: random embeddings].")
@_family_options
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
              help="The whole tune, full compute on the calibration set included.")
@click.option("--max-interval", type=click.IntRange(min=2), default=12, show_default=True, help="Largest N tried.")
@click.option("--height", type=int, default=None, help="FLUX: choose the build of this height (several in ENGINE_DIR).")
@click.option("--width", type=int, default=None, help="FLUX: choose the build of this width.")
@click.option("--frames", type=int, default=None, help="HunyuanVideo: choose the build of this frame count.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "torch", "tensorrt"]), default="onnxruntime",
              show_default=True, help="The backend you will run: every candidate is timed on it.")
@_device_options
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads of a CPU backend.")
@click.option("--json", "json_file", type=click.Path(path_type=Path), default=None,
              help="Write the front, every candidate tried and the chosen one as JSON.")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path), default=None,
              help="Plot speed-up vs PSNR (.png; needs matplotlib).")
@click.option("--write", "write", is_flag=True,
              help="Store the chosen settings as the build's defaults (generate, bench, serve and Pipeline.generate "
                   "use them unless told otherwise; inspect shows them).")
@_errors
def tune(engine_dir, min_psnr, min_ssim, max_seconds, samples, prompts_file, embeddings_file, budget_minutes,
         max_interval, height, width, frames, provider, backend, device, precision, threads, json_file, plot_file,
         write, **family_values):
    """The fastest ClusCa / TaylorSeer / FORA settings of ENGINE_DIR that keep a quality floor.

    Runs full compute on a small calibration set, then searches the settings the build allows,
    timed on this machine with the chosen backend and scored by PSNR / SSIM of the final images
    against full compute on the same seeds; prints the Pareto front (speed-up vs PSNR)."""
    from .analysis.tune import (TuneError, TuneSettings, calibration_inputs, format_front, plot_front,
                                source_record, write_json)
    from .analysis.tune import tune as run_tune
    from .engines.manifest import write_defaults
    from .runtime.pipeline import Pipeline

    settings = TuneSettings(min_psnr=min_psnr, min_ssim=min_ssim, max_seconds=max_seconds,
                            budget_seconds=60.0 * budget_minutes, max_interval=max_interval)
    if plot_file is not None and plot_file.suffix != ".png":
        raise click.BadParameter(f"expected a .png file, got {plot_file.name}", param_hint="--plot")
    if prompts_file is not None and embeddings_file is not None:
        raise click.UsageError("give either --prompts or --embeddings")
    given = {k: v for k, v in family_values.items() if v is not None and v != ()}
    seed = given.pop("seed", 0)
    steps = given.pop("steps", None)
    if "class_labels" in given:
        given["class_labels"] = _labels(given["class_labels"])
    if "prompt" in given:
        given["prompt"] = list(given["prompt"])
    if prompts_file is not None:
        prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"expected prompts in {prompts_file}, one per line, got none")
        given["prompt"] = prompts
    if embeddings_file is not None:
        import numpy as np

        with np.load(embeddings_file) as data:
            given.update({k: data[k] for k in data.files})
    select = {"height": height, "width": width, "frames": frames}
    with Pipeline.load(engine_dir, provider=provider, backend=backend, select=select, device=device,
                       precision=precision, threads=threads) as pipe:
        own = {f.name for f in pipe.family.fields}
        for name in given:
            if name not in own:
                raise InputError(f"expected inputs of a {pipe.family.name} model, got {name}")
        count = samples or (16 if pipe.family.primary.kind == "labels" else 4)
        inputs = calibration_inputs(pipe, count, given, rng_seed=seed)
        runs_log = logging.getLogger("clusca_trt.runtime.pipeline")
        level = runs_log.level
        if not logging.getLogger("clusca_trt").isEnabledFor(logging.DEBUG):  # a line per run: with -v only
            runs_log.setLevel(logging.WARNING)
        with _progress(1000, "tuning") as bar:
            bar.item_show_func = lambda status: status
            done = [0]

            def progress(fraction: float, status: str) -> None:
                step = max(0, int(1000 * fraction) - done[0])
                done[0] += step
                bar.update(step, current_item=status)

            try:
                result = run_tune(pipe, settings, inputs, seed=seed, steps=steps, progress=progress)
            finally:
                runs_log.setLevel(level)
        build_dir = pipe.manifest.data["build_dir"]
        directory = pipe.manifest.directory
    click.echo(format_front(result))
    if json_file is not None:
        write_json(result, json_file)
        click.echo(f"{json_file}: written")
    if plot_file is not None:
        plot_front(result, plot_file)
        click.echo(f"{plot_file}: written")
    if result.chosen is None:
        raise TuneError(result.error)
    if write:
        write_defaults(directory, result.chosen.config, source_record(result), build_dir=build_dir)
        click.echo(f"{directory}: defaults set to {result.chosen.label} (inspect shows them)")


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path), required=False)
@click.option("--model", "model_name", default=None,
              help="A named config (dit-xl-2, ...) instead of ENGINE_DIR: counted on depth-1/2 exports, scaled.")
@click.option("--clusters", "-K", default=16, show_default=True, help="K (with --model).")
@click.option("--order", "-O", type=int, default=None, help="Taylor order (with --model: also the built order; default 2).")
@click.option("--batch", "-B", default=1, show_default=True, help="Samples per call (with --model).")
@click.option("--interval", "-N", type=int, default=None, help="Cycle length N (default: the model's).")
@click.option("--warmup", "-W", type=int, default=None, help="Leading full steps.")
@click.option("--steps", "-S", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors
def flops(engine_dir, model_name, clusters, order, batch, interval, warmup, steps, as_json):
    """FLOPs per graph and per sampling run of full / ClusCa / TaylorSeer / FORA, and their speed-ups."""
    from .config import ClusCaConfig
    from .analysis import flops as fl
    from .models.dit import DiTAdapter
    from .spec import BuildOptions

    if (engine_dir is None) == (model_name is None):
        raise click.UsageError("give either ENGINE_DIR or --model")
    run_order = order if engine_dir is not None else None
    if engine_dir is not None:
        from .engines.manifest import Manifest

        manifest = Manifest.read(engine_dir)
        built = manifest.spec.options
        defaults = ClusCaConfig(**manifest.defaults) if manifest.defaults else ClusCaConfig()
    else:
        built = BuildOptions(batch=batch, clusters=clusters, order=2 if order is None else order)
        defaults = DiTAdapter.default_run
    # the run settings are checked for every method (interval 0 is no method's) before anything is counted
    ClusCaConfig.for_method("fora", built_clusters=0, built_order=built.order, defaults=defaults,
                            interval=interval, order=run_order, warmup=warmup)
    if engine_dir is not None:
        spec = manifest.spec
        graphs = fl.count_engine_dir(manifest)
        what = f"{engine_dir} ({manifest.model.get('name')})"
    else:
        logging.getLogger("onnx_ir").setLevel(logging.WARNING)
        ex = fl.dit_flops(model_name, built)
        spec, graphs = ex.spec, ex.per_graph
        what = f"{model_name} (counted at depths {ex.probe_depths[0]} and {ex.probe_depths[1]}, scaled to {ex.depth})"
    per_call = {n: g.total for n, g in graphs.items()}
    built_k = spec.options.clusters if spec.clustered_groups else 0
    rows = {}
    for method in ("full", "clusca", "taylorseer", "fora"):
        if (method == "clusca" and built_k == 0) or (method == "taylorseer" and spec.options.order < 1):
            continue  # what these engines cannot run at all
        if method == "taylorseer" and run_order == 0:
            continue  # --order 0 is FORA's
        config = ClusCaConfig.for_method(method, built_clusters=built_k, built_order=spec.options.order,
                                         defaults=defaults, interval=interval if method != "full" else None,
                                         order=run_order, warmup=warmup)
        sched = fl.schedule_flops(per_call, spec, fl.plan(steps, config, spec.options.order), config.clusters > 0)
        rows[method] = {"config": {"interval": config.interval, "clusters": config.clusters, "order": config.order,
                                   "warmup": config.warmup},
                        "schedule": sched.to_dict(), "speedup": fl.flops_speedup(per_call, spec, config, steps)}
    info = {"model": what, "graph_batch": spec.graph_batch, "steps": steps,
            "graphs": {n: g.to_dict() for n, g in graphs.items()}, "methods": rows}
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(f"{what}, graph batch {spec.graph_batch}")
    for n, g in graphs.items():
        top = ", ".join(f"{k} {100 * v / g.total:.0f}%" for k, v in list(g.by_component.items())[:5]) if g.total else ""
        click.echo(f"  {n:<12} {g.total / 1e9:10.3f} GFLOPs per call  ({top})")
    for method, r in rows.items():
        c, s = r["config"], r["schedule"]
        calls = ", ".join(f"{v} {k}" for k, v in s["calls"].items() if v)
        click.echo(f"  {method:<12} N={c['interval']} K={c['clusters']} O={c['order']} W={c['warmup']}: "
                   f"{s['total'] / 1e9:10.2f} GFLOPs per {steps}-step run ({calls}), speed-up {r['speedup']:.2f}x")



@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy listens on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="HTTP port (0: a free one).")
@click.option("--replicas", "-R", default=1, show_default=True, type=click.IntRange(min=1),
              help="Engine replicas (each loads the engines; on GPUs: one per GPU).")
@click.option("--max-batch-wait-ms", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a replica waits for compatible requests to fill a batch.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Requests admitted beyond those the replicas hold; more get 503.")
@click.option("--address", default=None, help="Join this Ray cluster (HOST:PORT or auto) instead of a local Ray.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU backend threads per replica [default: local: the cores shared out; cluster: the backend's].")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]), default="onnxruntime",
              show_default=True, help="openvino: OpenVINO's CPU plugin (bf16 where the CPU has bf16 units).")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=None,
              help="GPUs each replica reserves [default: 1 for a GPU provider or backend, else 0].")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="Largest request body (FLUX prompt embeddings are large); more gets 413.")
@click.option("--body-timeout-s", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="A request body must arrive within this; a slower one gets 408 and frees its slot.")
@click.option("--max-uploads", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Request bodies received at once; more get 503 at once.")
@_errors
def serve(engine_dir, host, port, replicas, max_batch_wait_ms, max_queue, address, threads, provider, backend,
          gpus_per_replica, max_body_mb, body_timeout_s, max_uploads):
    """Serve ENGINE_DIR over HTTP on Ray Serve until Ctrl-C: GET / (a page to try it), GET /health,
    GET /info, POST /generate, POST /compare.

    Concurrent requests with the same settings run as one engine batch (up to the build's --batch);
    each result equals Pipeline.generate alone with the same arguments. Needs the serve extra."""
    from .serve import require_ray

    require_ray()
    from .serve.server import ServeOptions, serve_forever

    options = ServeOptions(engine_dir, host=host, port=port, replicas=replicas, max_batch_wait_ms=max_batch_wait_ms,
                           max_queue=max_queue, address=address, threads=threads, provider=provider, backend=backend,
                           gpus_per_replica=gpus_per_replica, max_body_mb=max_body_mb, body_timeout_s=body_timeout_s,
                           max_uploads=max_uploads)
    serve_forever(options, ready=lambda url: click.echo(f"serving on {url}"))

if __name__ == "__main__":  # pragma: no cover
    main()
