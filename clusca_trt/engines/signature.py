"""A graph file's contract: the names, static shapes and dtypes of its inputs and outputs, read
from the ONNX header (no weights) and compared with the ``GraphSpec`` it must implement.

    graph_signature(path) -> (inputs, outputs)     [(name, shape, dtype), ...] each
    signature_mismatch(path, graph_spec) -> None, or one line saying the first difference

The exporter checks every graph it writes with it; loading an engine directory checks every
graph file against the manifest's spec with it (a swapped or foreign file is refused at load,
not part-way through sampling).
"""

from __future__ import annotations

from pathlib import Path

from ..spec import GraphSpec

Signature = list[tuple[str, tuple, str]]


def graph_signature(path: Path) -> tuple[Signature, Signature]:
    """(inputs, outputs) of the ONNX file at ``path``. Raises what ``onnx.load`` raises for a file
    that is not ONNX."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [_entry(v) for v in model.graph.input], [_entry(v) for v in model.graph.output]


def _entry(v) -> tuple[str, tuple, str]:
    import onnx

    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim)
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = f"type{v.type.tensor_type.elem_type}"
    return v.name, dims, dtype


def expected_signature(g: GraphSpec) -> tuple[Signature, Signature]:
    return [(t.name, tuple(t.shape), t.dtype) for t in g.inputs], [(t.name, tuple(t.shape), t.dtype) for t in g.outputs]


def _text(e: tuple[str, tuple, str] | None) -> str:
    return "nothing" if e is None else f"{e[0]} {e[2]}{list(e[1])}"


def signature_mismatch(path: Path, g: GraphSpec) -> str | None:
    """None where the graph file at ``path`` has exactly the inputs and outputs of ``g``, else one
    line naming the first difference ("expected input 2 y int64[2], got forecast_coef float32[3]")."""
    got = graph_signature(path)
    want = expected_signature(g)
    for kind, have, need in zip(("input", "output"), got, want):
        if have == need:
            continue
        for i in range(max(len(have), len(need))):
            a = have[i] if i < len(have) else None
            b = need[i] if i < len(need) else None
            if a != b:
                return (f"{Path(path).name} is not the {g.name} graph of this build: expected {kind} {i} "
                        f"{_text(b)}, got {_text(a)} ({len(need)} {kind}s expected, {len(have)} found)")
    return None
