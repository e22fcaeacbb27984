"""exporters/trt_build.py: an engine directory's ONNX graphs -> a TensorRT plan per graph beside
them (``<graph>.<key>.plan``), recorded in the manifest's ``tensorrt`` section
(``clusca-trt build --backend tensorrt``).

Polygraphy's loaders build them (``NetworkFromOnnxPath`` -> ``CreateConfig`` -> ``EngineFromNetwork``
-> ``SaveEngine``): static shapes, strongly typed networks, TF32 off, a timing cache reused across
builds, the builder optimisation level and workspace limit as options, on the CUDA device asked
for (current while building). Precision lives in the graph: for fp16 / bf16 the model graphs are
lowered first (``exporters.precision``, streamed to a file beside the plan and deleted once it is
built); the k-means and selection graphs stay fp32.

The plans are keyed by content (``engines.trt_plan.plan_key``): the same graphs, options,
precision-rewriting code, TensorRT version and GPU reuse them. A build writes every plan into a
temporary folder first, then moves them in and replaces the manifest atomically: a failed build
leaves the directory as it was.

Weights: every plan embeds its own copy of the weights it uses (full + partial + forecast: about
2.2 x the model's weights on the device, and as much again on disk). TensorRT's weight-stripped
plans (``STRIP_PLAN`` with ``REFIT_IDENTICAL``, refitted at load from the ONNX weights) shrink the
plan files but not the device memory: a refit copies the weights into each engine. See the
README's GPU section for the numbers and the route to one device copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..engines.manifest import Manifest, describe_files, now
from ..engines.trt_compat import check_graphs
from ..engines.trt_plan import (TrtBuildOptions, TrtPlatform, check_plan_io, current_platform, engine_io, on_device,
                                plan_key, polygraphy_output, require_tensorrt, rewrite_key)
from ..errors import EngineError
from .precision import _lowered_file, half_state

log = logging.getLogger(__name__)

__all__ = ["TrtBuildOptions", "build_plan", "build_plans", "default_timing_cache", "require_tensorrt"]


def default_timing_cache(platform: TrtPlatform, env: dict | None = None) -> Path:
    """``$XDG_CACHE_HOME/clusca-trt/timing-trt<version>-sm<cc>.cache`` (``~/.cache`` by default)."""
    env = os.environ if env is None else env
    base = Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME", "~")).expanduser() / ".cache")
    cc = platform.compute_capability.replace(".", "")
    return base / "clusca-trt" / f"timing-trt{platform.tensorrt}-sm{cc}.cache"


def build_plan(onnx_path: Path, plan_path: Path, options: TrtBuildOptions, timing_cache: Path):
    """One ONNX graph -> one serialized plan at ``plan_path``; returns the deserialized engine.
    Call it with the target device current (``on_device``)."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    with polygraphy_output(f"TensorRT build of {Path(onnx_path).name}"):
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
        pools = {trt.MemoryPoolType.WORKSPACE: options.workspace_mib << 20} if options.workspace_mib else None
        config = CreateConfig(
            tf32=False,  # Polygraphy clears TensorRT's TF32 flag: fp32 means fp32; low precision is explicit in the graph
            builder_optimization_level=options.optimization_level,
            memory_pool_limits=pools,
            load_timing_cache=str(timing_cache),
        )
        build = EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache))
        return SaveEngine(build, path=str(plan_path))()


def build_plans(manifest: Manifest, options: TrtBuildOptions, device: int = 0, force: bool = False) -> Manifest:
    """Build (or reuse) a TensorRT plan for every graph of an engine directory, on CUDA device ``device``.

    Content-keyed: the same ONNX files (and weights), options, precision-rewriting code, TensorRT
    version and GPU reuse the plans (after checking their files). Every plan is built in a temporary
    folder first; only then do they move in under new names, the manifest is replaced atomically and
    the old plans are removed, so a failed build leaves the directory as it was. A lowered (fp16 /
    bf16) graph is written next to its plan, streamed tensor by tensor (``_lowered_file``), and
    deleted once its plan is built.
    """
    require_tensorrt()
    platform = current_platform(device)
    directory = manifest.directory
    onnx_hashes = {n: ",".join(f["sha256"] for f in e["files"]) for n, e in manifest.data["graphs"].items()}
    key = plan_key(onnx_hashes, options, platform)
    section = manifest.data.get("tensorrt")
    if section and section.get("key") == key and not force:
        try:
            manifest.verify(hashes=True)
            log.info("TensorRT plans in %s are up to date (key %s): reusing them", directory, key[:12])
            return manifest
        except EngineError as e:
            log.info("TensorRT plans in %s cannot be reused (%s): rebuilding", directory, e)
    check_graphs(manifest.graph_paths(), strict=True)
    timing_cache = Path(options.timing_cache) if options.timing_cache else default_timing_cache(platform)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    spec = manifest.spec
    work = Path(tempfile.mkdtemp(prefix=".plans-building-", dir=directory))
    try:
        staged = {}
        for i, (name, src) in enumerate(manifest.graph_paths().items(), 1):
            precision = options.graph_precision(name)
            log.info("building TensorRT plan for %s (%d/%d, %s, optimisation level %d, cuda:%d)", name, i,
                     len(spec.graphs), precision, options.optimization_level, device)
            lowered = None if precision == "fp32" else _lowered_file(src, precision, work, state=half_state(spec))
            staged[name] = work / f"{name}.plan"
            with on_device(device):
                engine = build_plan(lowered or src, staged[name], options, timing_cache)
                check_plan_io(spec, name, engine_io(engine))
                del engine
            if lowered is not None:
                for f in (lowered, lowered.with_name(lowered.name + ".data")):
                    f.unlink(missing_ok=True)
        plans = {}
        for name, tmp_plan in staged.items():
            final = directory / f"{name}.{key[:12]}.plan"
            os.replace(tmp_plan, final)
            plans[name] = dict(describe_files(directory, {name: final})[name], precision=options.graph_precision(name))
        old = _plan_files(manifest)
        data = dict(manifest.data)
        data["tensorrt"] = {
            "key": key,
            "created": now(),
            "platform": platform.to_dict(),
            "options": options.key_dict(),
            "rewrite": rewrite_key(options),
            "plans": plans,
        }
        updated = Manifest(data, directory)
        updated.write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for f in old - _plan_files(updated):
        f.unlink(missing_ok=True)
    log.info("TensorRT plans written to %s (key %s, TensorRT %s, sm %s, %s)", directory, key[:12], platform.tensorrt,
             platform.compute_capability, platform.device)
    return updated


def _plan_files(manifest: Manifest) -> set[Path]:
    plans = manifest.data.get("tensorrt", {}).get("plans", {})
    return {manifest.plan_path(f["file"]) for e in plans.values() for f in e["files"]}
