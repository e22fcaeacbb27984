"""exporters/precision.py: a float32 ONNX graph -> the same graph with its matrix products in fp16 or
bf16 and its module caches in that type at the interface (what ``build --backend tensorrt`` builds
fp16 / bf16 TensorRT plans from; the k-means and selection graphs are never lowered).

* ``lower_precision``: MatMul, Gemm, Conv and ConvTranspose run in the low type between casts
  (PyTorch autocast's policy: element-wise work, normalisation, softmax and the sinusoidal
  timestep embedding stay fp32); their float initializers are converted, not cast at run time;
  the graph inputs and outputs named in ``state`` (``half_state``: the module caches) take the
  low type, so an engine keeps them in half the memory. Hidden states, centroids and distances
  stay fp32. The result is built strongly typed (weakly typed builds with precision flags are
  deprecated since TensorRT 10.12 and gone in 11).
* ``_lowered_file``: the same, file to file, with the weights streamed tensor by tensor between
  external-data files, so host memory stays bounded for FLUX-size graphs.

The plans' key and their refusal at load include a hash of this file's text
(``engines.trt_plan.rewrite_code_sha256``): plans lowered by other code are rebuilt, never loaded.
Keep this file to the rewrite alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engines.trt_plan import PRECISIONS
from ..errors import ConfigError
from ..spec import STATE_SUFFIX, ExportSpec

LOW_PRECISION_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


def lower_precision(model, precision: str, types: dict[str, int] | None = None, state=(), store=None):
    """ONNX model -> the same model with MatMul / Gemm / Conv / ConvTranspose in fp16 or bf16.

    Float inputs of those nodes are cast to the low type (initializers are converted instead),
    their outputs cast back to fp32, so every other node keeps its type. A node whose operator
    does not take the low type at the model's opset stays fp32 (ONNX Conv takes bf16 from
    opset 22). ``state``: names of graph inputs and outputs (the module caches) that take the low
    type at the graph's interface, cast to fp32 right after the input and from fp32 right before
    the output (TensorRT fuses the casts), so the engine keeps them in half the memory; every other
    input and output keeps its type. ``types`` maps value names to ONNX element types (default: ONNX
    shape inference on ``model``; pass it for models over 2 GB). ``store`` reads and writes
    initializers (``_MemoryStore`` by default; ``_ExternalStore`` streams them tensor by tensor
    between external-data files). Returns a new model.
    """
    import onnx
    import onnx.defs
    from onnx import TensorProto, helper

    if precision == "fp32":
        return model
    if precision not in ("fp16", "bf16"):
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    store = store or _MemoryStore()
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    low_str = "tensor(float16)" if precision == "fp16" else "tensor(bfloat16)"
    lowered_ops = {
        op for op in LOW_PRECISION_OPS
        if any(low_str in tc.allowed_type_strs for tc in onnx.defs.get_schema(op, opset).type_constraints)
    }
    if types is None:
        types = value_types(onnx.shape_inference.infer_shapes(model))
    types = dict(types)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    head, tail = _low_interface(g, set(state), low, types)
    inits = {i.name: i for i in g.initializer}
    converted: dict[str, str] = {}
    nodes = list(head)
    for node in g.node:
        if node.op_type not in lowered_ops or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if not name or types.get(name) != TensorProto.FLOAT:
                continue
            if name not in converted:
                converted[name] = f"{name}__{precision}"
                if name in inits:
                    g.initializer.append(store.convert(inits[name], converted[name], lambda a: _to_low(a, precision)))
                else:
                    nodes.append(helper.make_node("Cast", [name], [converted[name]], name=f"{name}__to_{precision}", to=low))
            node.input[i] = converted[name]
        back = []
        for j, name in enumerate(node.output):
            if name and types.get(name) == TensorProto.FLOAT:
                node.output[j] = f"{name}__{precision}"
                converted[name] = node.output[j]  # a lowered consumer reads the low value: no cast pair
                back.append(helper.make_node("Cast", [node.output[j]], [name], name=f"{name}__to_fp32", to=TensorProto.FLOAT))
        nodes.append(node)
        nodes += back
    nodes += tail
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return out


def _low_interface(g, state: set[str], low: int, types: dict[str, int]) -> tuple[list, list]:
    """Give the float graph inputs and outputs named in ``state`` the low type ``low``: consumers
    of such an input read its fp32 cast ``<name>__fp32``; such an output is the low cast of what
    its producer made (renamed ``<name>__fp32``). Returns the Cast nodes to put first and last."""
    from onnx import TensorProto, helper

    # one pass over the nodes: where every name is read and written (not a scan per state tensor)
    readers: dict[str, list] = {}
    writers: dict[str, list] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            readers.setdefault(name, []).append((n.input, i))
        for j, name in enumerate(n.output):
            writers.setdefault(name, []).append((n.output, j))
    outputs = {o.name for o in g.output}
    head, tail = [], []
    touched = set()
    for v in g.input:
        if v.name in state and v.type.tensor_type.elem_type == TensorProto.FLOAT:
            wide = f"{v.name}__fp32"
            for names, i in readers.get(v.name, ()):
                names[i] = wide
            if v.name in outputs:  # a state tensor passed through unchanged
                raise ConfigError(f"graph output {v.name} is also a graph input; cannot give it a low type")
            head.append(helper.make_node("Cast", [v.name], [wide], name=f"{v.name}__to_fp32_in", to=TensorProto.FLOAT))
            v.type.tensor_type.elem_type = low
            types[v.name], types[wide] = low, TensorProto.FLOAT
            touched.add(v.name)
    for v in g.output:
        if v.name in state and v.type.tensor_type.elem_type == TensorProto.FLOAT:
            wide = f"{v.name}__fp32"
            if not writers.get(v.name):
                raise ConfigError(f"graph output {v.name} has no producing node; cannot give it a low type")
            for names, j in writers[v.name]:
                names[j] = wide
            for names, i in readers.get(v.name, ()):  # nodes that also read the output inside the graph read its fp32 value
                names[i] = wide
            tail.append(helper.make_node("Cast", [wide], [v.name], name=f"{v.name}__to_low_out", to=low))
            v.type.tensor_type.elem_type = low
            types[v.name], types[wide] = low, TensorProto.FLOAT
            touched.add(v.name)
    keep = [vi for vi in g.value_info if vi.name not in touched]
    del g.value_info[:]
    g.value_info.extend(keep)
    return head, tail


def half_state(spec: ExportSpec) -> frozenset[str]:
    """The graph inputs and outputs of the model graphs that are kept in the plan's low type: the
    module caches (``<slot>_f0``, ``<slot>_fhi`` and their ``_out``). Hidden states, centroids,
    distances and indices stay as they are (k-means runs in fp32)."""
    names = {t.name for t in spec.cache_tensors()}
    return frozenset(names | {n + STATE_SUFFIX for n in names})


def value_types(model) -> dict[str, int]:
    """Element type of every named value (inputs, outputs, initializers, inferred value_info)."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _to_low(a: np.ndarray, precision: str) -> np.ndarray:
    if precision == "fp16":
        return a.astype(np.float16)
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16)


class _MemoryStore:
    """Initializers in memory: read, convert, and put back as embedded tensors."""

    def convert(self, tensor, name: str, fn):
        from onnx import numpy_helper

        return numpy_helper.from_array(fn(numpy_helper.to_array(tensor)), name)


class _ExternalStore:
    """Initializers streamed tensor by tensor: read from the source model's external data
    (``source_dir``), written to one new external-data file ``sink`` (named ``location`` beside
    the new model). At most one tensor (and its converted twin) is in memory at a time."""

    ALIGN = 4096

    def __init__(self, source_dir: Path, sink, location: str):
        self.source_dir, self.sink, self.location = str(source_dir), sink, location
        self.written: set[str] = set()  # names of the tensors already in ``sink``

    def read(self, tensor) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(tensor, self.source_dir)

    def put(self, array: np.ndarray, name: str):
        from onnx import TensorProto, external_data_helper, numpy_helper

        tensor = numpy_helper.from_array(array, name)
        raw = tensor.raw_data
        pad = -self.sink.tell() % self.ALIGN
        self.sink.write(b"\0" * pad)
        offset = self.sink.tell()
        self.sink.write(raw)
        external_data_helper.set_external_data(tensor, self.location, offset, len(raw))
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        self.written.add(name)
        return tensor

    def convert(self, tensor, name: str, fn):
        return self.put(fn(self.read(tensor)), name)

    def relocate(self, model) -> None:
        """Move every initializer that still points into the source's external data into ``sink``."""
        from onnx import external_data_helper

        for tensor in model.graph.initializer:
            if external_data_helper.uses_external_data(tensor) and tensor.name not in self.written:
                tensor.CopyFrom(self.put(self.read(tensor), tensor.name))


def _lowered_file(src: Path, precision: str, workdir: Path, state=()) -> Path:
    """Write the low-precision twin of ``src`` into ``workdir`` (weights as external data).

    Host memory stays bounded for graphs of any size: the graph is loaded without its weights,
    and the weights are streamed tensor by tensor from ``src``'s external data into the twin's
    (read, convert, write, drop). Peak: the graph structure plus about 2.5 x the largest
    tensor in fp32 (FLUX.1-dev's largest, a single block's ``proj_out``, is 189 MB: well under
    1 GB at the peak), never the whole model."""
    import onnx

    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    types = value_types(onnx.shape_inference.infer_shapes(model))
    dst = workdir / src.name
    location = dst.name + ".data"
    with open(workdir / location, "wb") as sink:
        store = _ExternalStore(src.parent, sink, location)
        low = lower_precision(model, precision, types, state=state, store=store)
        store.relocate(low)
    onnx.save_model(low, str(dst))
    return dst
