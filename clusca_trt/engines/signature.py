"""A graph file's contract: the names, static shapes and dtypes of its inputs and outputs, read
from the ONNX header (no weights) and compared with the ``GraphSpec`` it must implement; where
its external data lies; and the facts of the model a manifest states that the graph holds.

    graph_signature(path) -> (inputs, outputs)     [(name, shape, dtype), ...] each
    signature_mismatch(path, graph_spec) -> None, or one line saying the first difference
    external_data(graph) -> [file, ...]            every file its tensors' external data names
    label_rows(graph) -> int | None                rows of the embedding the ``y`` input indexes
    graph_problem(graph, ...) -> None, or one line: all of the above against a manifest

The exporter checks every graph it writes with it; loading an engine directory checks every
graph file against the manifest's spec with it (a swapped or foreign file is refused at load,
not part-way through sampling).
"""

from __future__ import annotations

from pathlib import Path

from ..spec import GraphSpec

Signature = list[tuple[str, tuple, str]]
LABELS = "y"  # DiT's class-label input; its embedding has one row per class and one for "no class"


def read_graph(path: Path):
    """The ``ModelProto`` of the ONNX file at ``path`` without its external data (the header and
    small tensors only). Raises what ``onnx.load`` raises for a file that is not ONNX."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def graph_signature(path) -> tuple[Signature, Signature]:
    """(inputs, outputs) of the ONNX file at ``path`` (or of a ``ModelProto``). Raises what
    ``onnx.load`` raises for a file that is not ONNX."""
    model = read_graph(path) if isinstance(path, (str, Path)) else path
    return [_entry(v) for v in model.graph.input], [_entry(v) for v in model.graph.output]


def _tensors(graph):
    """Every ``TensorProto`` of ``graph`` and its subgraphs (initializers, sparse ones, attributes)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def external_data(model) -> list[str]:
    """The ``location`` of every tensor of ``model`` whose data lies in another file (in order, repeats kept)."""
    import onnx

    out = []
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            out.append({e.key: e.value for e in t.external_data}.get("location", ""))
    return out


def label_rows(model) -> int | None:
    """Rows of the embedding table that the ``y`` input indexes (a ``Gather`` of an initializer by
    ``y``), or None where the graph has no such table."""
    tables = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == LABELS and node.input[0] in tables:
            dims = tables[node.input[0]].dims
            return int(dims[0]) if dims else None
    return None


def graph_problem(model, file: str, g: GraphSpec, data_files: list[str], num_classes: int | None = None) -> str | None:
    """None where the graph ``model`` (file name ``file``) is what the manifest says, else one line:
    its signature is ``g``'s (``signature_mismatch``); its external data lies only in ``data_files``
    (the files of its own manifest entry, beside it: never a path outside the build folder); and
    where it takes the class labels ``y``, their embedding has ``num_classes + 1`` rows (the last is
    the null class of guidance)."""
    mismatch = signature_mismatch(model, g, file)
    if mismatch is not None:
        return mismatch
    for location in external_data(model):
        if location not in data_files:
            return (f"{file} keeps weights in {location!r}: expected external data only in "
                    f"{', '.join(data_files) or 'no file'} (the files of its build), got another file")
    if num_classes is not None and any(t.name == LABELS for t in g.inputs):
        rows = label_rows(model)
        if rows is None:
            return f"{file} has no class-label embedding: expected a Gather of {LABELS} from a table, got none"
        if rows != num_classes + 1:
            return (f"{file} embeds {rows - 1} classes (and the null class): expected model.sampling.num_classes "
                    f"{rows - 1}, got {num_classes}")
    return None


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


def signature_mismatch(path, g: GraphSpec, file: str | None = None) -> str | None:
    """None where the graph file at ``path`` (or the ``ModelProto`` of the file named ``file``) has
    exactly the inputs and outputs of ``g``, else one line naming the first difference ("expected
    input 2 y int64[2], got forecast_coef float32[3]")."""
    file = file or Path(path).name
    got = graph_signature(path)
    want = expected_signature(g)
    for kind, have, need in zip(("input", "output"), got, want):
        if have == need:
            continue
        for i in range(max(len(have), len(need))):
            a = have[i] if i < len(have) else None
            b = need[i] if i < len(need) else None
            if a != b:
                return (f"{file} is not the {g.name} graph of this build: expected {kind} {i} "
                        f"{_text(b)}, got {_text(a)} ({len(need)} {kind}s expected, {len(have)} found)")
    return None
