"""clusca-trt: build ClusCa engines, generate with them, inspect what was built.

A thin layer over library calls: errors become one line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import json
import io
import logging
import sys
from pathlib import Path

import click

from .errors import ClusCaError

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
            raise click.ClickException(str(e).splitlines()[0]) from None
        except (OSError, ValueError) as e:
            raise click.ClickException(f"{type(e).__name__}: {e}".splitlines()[0]) from None

    return wrapper


@click.group()
@click.version_option(package_name="clusca-trt")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(verbose: int, quiet: bool) -> None:
    """Cluster-driven feature caching (ClusCa) for Diffusion Transformers, as static engines."""
    _setup_logging(verbose, quiet)


def _labels(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@main.command()
@click.option("--model", "model_name", default=None, help="Model name (default: the built-in dit-tiny).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Original DiT .pt file or diffusers folder.")
@click.option("--random-init", is_flag=True, help="Random weights (tests and benchmarks only).")
@click.option("--seed", default=0, show_default=True, help="Seed of --random-init.")
@click.option("--clusters", "-K", default=16, show_default=True, help="K, clusters (0: TaylorSeer/FORA only).")
@click.option("--order", "-O", default=2, show_default=True, help="Highest Taylor order the engines keep.")
@click.option("--batch", "-B", default=1, show_default=True, help="Samples per engine call (CFG doubles it).")
@click.option("--kmeans-iterations", default=10, show_default=True, help="Lloyd iterations in the cluster graph.")
@click.option("--distance", type=click.Choice(["l1", "l2"]), default="l1", show_default=True)
@click.option("--opset", default=18, show_default=True, type=click.IntRange(18, 20))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Engine directory (default engines/<model>).")
@click.option("--force", is_flag=True, help="Rebuild even if the engines are up to date.")
@_errors
def build(model_name, checkpoint, random_init, seed, clusters, order, batch, kmeans_iterations, distance, opset, out, force):
    """Export the full, partial, forecast and clustering graphs of a model into an engine directory."""
    from .engines.build import build_engines
    from .models import DEFAULT_MODEL, load_model
    from .spec import BuildOptions

    name = model_name or DEFAULT_MODEL
    if model_name is None and checkpoint is None and not random_init:
        random_init = True  # the built-in default has no trained weights yet (labelled in the log)
    options = BuildOptions(
        batch=batch, clusters=clusters, order=order, kmeans_iterations=kmeans_iterations, distance=distance, opset=opset
    )
    loaded = load_model(name, checkpoint=checkpoint, random_init=random_init, seed=seed)
    out = out or Path("engines") / name
    result = build_engines(loaded, options, out, force=force)
    state = "up to date" if result.reused else "built"
    click.echo(f"{out}: {state} ({loaded.name}, K={clusters}, O={order}, batch={batch}, graphs: "
               f"{', '.join(result.manifest.data['graphs'])})")


def _progress(total: int, label: str):
    """A progress bar on stderr for interactive use; silent when stderr is not a terminal or with -q."""
    quiet = not logging.getLogger("clusca_trt").isEnabledFor(logging.INFO)
    return click.progressbar(length=total, label=label, file=io.StringIO() if quiet else sys.stderr)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(METHODS), default="clusca", show_default=True)
@click.option("--interval", "-N", type=int, default=None, help="Cycle length N (default: the model's).")
@click.option("--propagation", "-G", type=float, default=None, help="Propagation ratio gamma.")
@click.option("--order", "-O", type=int, default=None, help="Taylor order (<= the built order).")
@click.option("--clusters", "-K", type=int, default=None, help="Must equal the built K (checked).")
@click.option("--warmup", "-W", type=int, default=None, help="Leading full steps.")
@click.option("--fresh", type=click.Choice(["random", "nearest"]), default=None, help="Fresh-token policy.")
@click.option("--steps", "-S", default=50, show_default=True)
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)
@click.option("--cfg-scale", default=1.5, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--class-labels", default=None, help="Comma-separated class labels (default: 0..batch-1).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime", show_default=True)
@click.option("--out", "out_file", type=click.Path(path_type=Path), required=True, help=".npz (latents, labels, images) or .png")
@_errors
def generate(engine_dir, method, interval, propagation, order, clusters, warmup, fresh, steps, sampler, cfg_scale,
             seed, class_labels, provider, backend, out_file):
    """Sample with the engines in ENGINE_DIR and write latents (.npz) or an image grid (.png)."""
    from .runtime.output import write_result
    from .runtime.pipeline import Pipeline

    if out_file.suffix not in (".npz", ".png"):
        raise click.BadParameter(f"expected a .npz or .png file, got {out_file.name}", param_hint="--out")
    with Pipeline.load(engine_dir, provider=provider, backend=backend) as pipe:
        labels = _labels(class_labels) or list(range(pipe.spec.options.batch))
        chunks = -(-len(labels) // pipe.spec.options.batch)
        with _progress(steps * chunks, "sampling") as bar:
            result = pipe.generate(
                labels, seed=seed, method=method, interval=interval, propagation=propagation, order=order,
                steps=steps, sampler=sampler, cfg_scale=cfg_scale, warmup=warmup, fresh=fresh, clusters=clusters,
                progress=lambda _step: bar.update(1),
            )
    write_result(result, out_file)
    c = result.config
    click.echo(f"{out_file}: {len(result.labels)} samples, {c.method.value} (N={c.interval}, K={c.clusters}, "
               f"O={c.order}, gamma={c.propagation}), {steps} steps on {result.backend}/{result.provider} "
               f"in {result.seconds:.2f} s")


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@_errors
def inspect(engine_dir, as_json, verify):
    """What was built: graphs, shapes, ClusCa settings, hashes, versions."""
    from .engines.inspect import describe
    from .engines.manifest import Manifest

    manifest = Manifest.read(engine_dir)
    manifest.verify(hashes=verify)
    info = describe(manifest)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
    else:
        click.echo(_format(info))


def _format(info: dict) -> str:
    lines = [
        f"engine dir   {info['directory']}",
        f"model        {info['model']['name']} ({info['model']['family']}), source: {info['model']['source_summary']}",
        f"build        {info['build_summary']}",
        f"defaults     {info['defaults_summary']}",
        f"key          {info['key']}",
        f"cache        {info['cache']['summary']}",
        "graphs",
    ]
    for name, g in info["graphs"].items():
        lines.append(f"  {name:<12} {g['bytes'] / 1e6:9.2f} MB  sha256 {g['sha256'][:16]}")
        lines.append(f"    in : {g['inputs']}")
        lines.append(f"    out: {g['outputs']}")
    lines.append("versions     " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main()
