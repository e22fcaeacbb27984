"""A readable description of an engine directory (``clusca-trt inspect``)."""

from __future__ import annotations

from .manifest import Manifest


def cache_bytes(manifest: Manifest) -> dict:
    """Bytes of every module cache (layers x (O+1) x batch x tokens x dim x 4), with the breakdown."""
    spec = manifest.spec
    rows, total = [], 0
    for t in spec.cache_tensors():
        n = 4
        for d in t.shape:
            n *= d
        rows.append({"tensor": t.name, "shape": list(t.shape), "bytes": n})
        total += n
    return {"tensors": rows, "bytes": total, "summary": f"{total / 2**20:.1f} MiB module caches (float32), "
            f"{len(spec.slots)} slots x {spec.options.order + 1} Taylor factors"}


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
        graphs[name] = {
            "file": entry["file"],
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
        "defaults_summary": ", ".join(f"{k}={v}" for k, v in defaults.items()),
        "graphs": graphs,
        "cache": cache_bytes(manifest),
        "versions": d["versions"],
    }
