"""A readable description of an engine directory (``clusca-trt inspect``)."""

from __future__ import annotations

import math

from ..spec import ExportSpec
from .manifest import Manifest


def cache_bytes(manifest: Manifest) -> dict:
    """Bytes of every module cache (layers x (O+1) x batch x tokens x dim x 4), with the breakdown."""
    return spec_cache_bytes(manifest.spec)


def spec_cache_bytes(spec: ExportSpec, bytes_per_value: int = 4) -> dict:
    """The module caches of a spec, without building anything: per cache tensor and per slot
    (layers x Taylor factors x batch x tokens x dim x ``bytes_per_value``: 4 for the float32
    engines, 2 for half-precision plans). A family whose spec needs no weights (HunyuanVideo's
    ``export_spec(cfg, options)``) gets its real configuration's size from its config alone."""
    rows, total = [], 0
    for t in spec.cache_tensors():
        n = bytes_per_value * math.prod(t.shape)
        rows.append({"tensor": t.name, "shape": list(t.shape), "bytes": n})
        total += n
    factors = spec.options.order + 1
    slots = [
        {"slot": s.name, "layers": s.layers, "factors": factors, "batch": spec.graph_batch, "tokens": s.tokens,
         "dim": s.dim, "bytes": s.layers * factors * spec.graph_batch * s.tokens * s.dim * bytes_per_value}
        for s in spec.slots
    ]
    per_slot = ", ".join(
        f"{s['slot']} {s['layers']}x{s['factors']}x{s['batch']}x{s['tokens']}x{s['dim']}" for s in slots
    )
    dtype = {4: "float32", 2: "16-bit"}.get(bytes_per_value, f"{bytes_per_value}-byte")
    summary = (f"{total / 2**20:.1f} MiB module caches ({dtype}), {len(spec.slots)} slots x {factors} Taylor factors "
               f"(layers x factors x batch x tokens x dim: {per_slot})")
    return {"tensors": rows, "slots": slots, "bytes": total, "summary": summary}


def defaults_summary(defaults: dict, source: dict | None) -> str:
    """The run defaults in one line, with their method and where they came from."""
    from ..config import ClusCaConfig

    try:
        method = ClusCaConfig(**defaults).method.value if defaults else ClusCaConfig().method.value
    except Exception:  # the schema checked them; a newer field this version lacks must not break inspect
        method = "?"
    text = f"{method}: " + ", ".join(f"{k}={v}" for k, v in defaults.items())
    if not source:
        return text + " (the model family's, set by the build)"
    floors = [f"{label} {source[key]:g}{unit}" for key, label, unit in (
        ("min_psnr", "PSNR >=", " dB"), ("min_ssim", "SSIM >=", ""), ("max_seconds", "<=", " s per call"))
        if isinstance(source.get(key), (int, float))]
    measured = [f"{label} {source[key]:{fmt}}{unit}" for key, label, fmt, unit in (
        ("psnr", "PSNR", ".2f", " dB"), ("ssim", "SSIM", ".4f", ""), ("speedup", "speed-up", ".2f", "x"))
        if isinstance(source.get(key), (int, float))]
    where = ", ".join(str(source[k]) for k in ("backend", "device") if source.get(k))
    parts = [f"from clusca-trt {source.get('tool')}", source.get("created")]
    detail = "; ".join(x for x in (", ".join(floors), ", ".join(measured), where) if x)
    return text + f" ({' '.join(p for p in parts if p)}{': ' + detail if detail else ''})"


def cpu_backends(manifest: Manifest) -> dict:
    """What the CPU backends run here: the CPU, ONNX Runtime's precision (fp32), OpenVINO's default
    precision on this CPU (bf16 where it has bf16 units) and its compiled-model cache in the engine
    directory (files and bytes; none until a first ``--backend openvino`` load)."""
    from .base import cpu_name
    from .openvino import CACHE_DIR, choose_precision, cpu_capabilities

    out = {"cpu": cpu_name(), "onnxruntime": {"precision": "fp32"}}
    try:
        caps = cpu_capabilities()
        out["openvino"] = {"precision": choose_precision(None, caps), "capabilities": list(caps)}
    except Exception as e:  # OpenVINO missing or broken: inspect still describes the build
        out["openvino"] = {"unavailable": str(e).splitlines()[0][:200]}
    cache = manifest.directory / CACHE_DIR
    files = [f for f in cache.iterdir() if f.is_file()] if cache.is_dir() else []
    out["openvino"]["cache"] = {"directory": str(cache), "files": len(files), "bytes": sum(f.stat().st_size for f in files)}
    ov = out["openvino"]
    head = (f"openvino {ov['precision']} ({', '.join(ov['capabilities'])})" if "precision" in ov
            else f"openvino unavailable ({ov['unavailable']})")
    out["summary"] = (f"{out['cpu']}: onnxruntime fp32, {head}; openvino cache {ov['cache']['files']} files, "
                      f"{ov['cache']['bytes'] / 1e6:.1f} MB")
    return out


def describe(manifest: Manifest) -> dict:
    d = manifest.data
    spec = manifest.spec
    src = d["model"]["source"]
    if src["kind"] == "random-init":
        source = f"RANDOM weights (seed {src['seed']}, not a trained model)"
    else:
        source = f"{src['kind']} {src['path']} (sha256 {src['sha256'][:16]})"
    graphs = {}
    for name, entry in d["graphs"].items():
        g = spec.graphs[name]
        path = manifest.graph_path(name)
        graphs[name] = {
            "file": entry["file"],
            "path": str(path),  # where it is: the build folder the manifest names
            "paths": [str(path.parent / f["file"]) for f in entry["files"]],  # with its external data
            "build_dir": str(manifest.build_dir),
            "bytes": sum(f["bytes"] for f in entry["files"]),
            "sha256": entry["files"][0]["sha256"],
            "inputs": ", ".join(f"{t.name}{list(t.shape)}" for t in g.inputs),
            "outputs": ", ".join(f"{t.name}{list(t.shape)}" for t in g.outputs),
        }
    b = d["build"]
    defaults = d.get("defaults", {})
    return {
        "directory": str(manifest.directory),
        "key": d["key"],
        "created": d.get("created"),
        "model": dict(d["model"], source_summary=source),
        "build": b,
        "build_summary": f"batch {b['batch']} (graph batch {spec.graph_batch}), K={b['clusters']}, O={b['order']}, "
        f"k-means {b['kmeans_iterations']} it. {b['distance']}, {b['dtype']}, opset {b['opset']}",
        "defaults": defaults,
        "defaults_source": manifest.defaults_source,
        "defaults_summary": defaults_summary(defaults, manifest.defaults_source),
        "graphs": graphs,
        "cache": cache_bytes(manifest),
        "cpu_backends": cpu_backends(manifest),
        "versions": d["versions"],
    }
