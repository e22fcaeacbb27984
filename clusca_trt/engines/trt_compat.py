"""TensorRT compatibility of an exported ONNX graph, checked on the CPU before any build.

ONNX graph -> findings (graph, node, op, what is wrong); ``check_graphs`` raises
``TensorRTCompatError`` naming the first offending node, or only logs (``strict=False``).

What the TensorRT ONNX parser needs, from its support matrix (kept as data with the TensorRT
version it describes: ``clusca_trt/data/tensorrt_onnx_ops.json``):

* the default-domain opset within the parser's range, and no node from another domain
  (custom domains need plugins);
* every operator in the support list, marked supported;
* static shapes everywhere: every graph input and output, and every value after ONNX shape
  inference (our engines are built without optimisation profiles);
* data types: the type of an operator's data input (the matrix's "Supported Types" column,
  which describes the data input; ``type_input`` in the data names exceptions) must be one
  the operator supports, and a ``Cast`` may only target a listed type. This is where the
  boolean and int64 patterns the parser rejects show up: arithmetic, reductions, MatMul or
  ArgMin on BOOL; MatMul, Softmax, Sqrt... on INT64; casts to DOUBLE or to the quantized
  types. No tensor may have a type outside the parser's list (STRING, INT16, UINT16/32/64,
  COMPLEX); UINT8 only as a network input or output; DOUBLE is cast down to FLOAT by the
  parser, clamping (a warning);
* the per-operator restrictions that can be checked statically: inputs that must be
  initializers or build-time constants (``axes`` of the reductions, Squeeze, Unsqueeze; the
  ``K`` of TopK, ...), outputs that must be unused (LayerNormalization's mean and inverse
  standard deviation, MaxPool's indices), attribute values (TopK ``sorted``, Resize modes,
  pooling ``dilations``, ...).

Local functions are inlined first; the bodies of If / Loop / Scan are checked recursively.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx.shape_inference
from onnx import TensorProto, numpy_helper

from ..errors import ClusCaError, one_line
from ..files import read_json

log = logging.getLogger(__name__)

DATA_FILE = "tensorrt_onnx_ops.json"

# ONNX element types as the support matrix names them (FP8 is E4M3 in TensorRT)
_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.INT8: "INT8",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.INT4: "INT4",
    TensorProto.DOUBLE: "DOUBLE",
}
if hasattr(TensorProto, "FLOAT4E2M1"):
    _TYPE_NAMES[TensorProto.FLOAT4E2M1] = "FP4"

_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"})
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})


class TensorRTCompatError(ClusCaError):
    """An exported graph uses something the TensorRT ONNX parser rejects; names the node."""

    def __init__(self, message: str, findings: list[Finding] | None = None):
        super().__init__(message)
        self.findings = list(findings or [])


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str  # the node's name (or "op#index" if unnamed); "" for model-level findings
    op: str
    message: str
    severity: str = "error"  # "error": the parser rejects it; "warning": it builds, with a caveat

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op})" if self.node else self.op
        return f"{self.graph}: {where}: {self.message}"


@dataclass(frozen=True)
class SupportMatrix:
    """The TensorRT ONNX parser's support matrix for one TensorRT version."""

    tensorrt: str
    source: str
    opset_min: int
    opset_max: int
    domains: tuple[str, ...]
    dtypes: dict
    ops: dict = field(repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> SupportMatrix:
        return cls(d["tensorrt"], d["source"], d["opset"]["min"], d["opset"]["max"], tuple(d["domains"]), d["dtypes"], d["ops"])

    @classmethod
    def load(cls, path: Path | None = None) -> SupportMatrix:
        if path is None:
            return _packaged()
        return cls.from_dict(read_json(path))

    def op(self, op_type: str) -> dict | None:
        return self.ops.get(op_type)


@functools.lru_cache(maxsize=1)
def _packaged() -> SupportMatrix:
    text = resources.files("clusca_trt").joinpath("data", DATA_FILE).read_text()
    return SupportMatrix.from_dict(json.loads(text))


# -- the check ------------------------------------------------------------------------------


def check_model(model: onnx.ModelProto, graph_name: str = "graph", matrix: SupportMatrix | None = None) -> list[Finding]:
    """Every finding for one ONNX model (errors and warnings), in graph order."""
    matrix = matrix or SupportMatrix.load()
    findings: list[Finding] = []
    opset = {o.domain: o.version for o in model.opset_import}
    default = opset.get("", opset.get("ai.onnx"))
    if default is None or not matrix.opset_min <= default <= matrix.opset_max:
        findings.append(
            Finding(graph_name, "", "opset_import",
                    f"expected a default-domain opset in {matrix.opset_min}..{matrix.opset_max} "
                    f"(TensorRT {matrix.tensorrt}), got {default}")
        )
    if model.functions:
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as e:  # a function the inliner cannot expand is reported per node below
            log.debug("could not inline local functions of %s: %s", graph_name, e)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        findings.append(Finding(graph_name, "", "shape_inference", f"expected ONNX shape inference to succeed, got {one_line(e)}"))
        inferred = model
    _Checker(graph_name, matrix, findings).graph(inferred.graph, top=True)
    return findings


def check_graph_file(path: Path, matrix: SupportMatrix | None = None, graph_name: str | None = None) -> list[Finding]:
    """Findings for one ``.onnx`` file (external weights are not read: only their shapes matter)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return check_model(model, graph_name or path.name, matrix)


def check_graphs(paths: dict[str, Path], strict: bool = True, matrix: SupportMatrix | None = None) -> list[Finding]:
    """Check every graph; with ``strict`` raise ``TensorRTCompatError`` on the first error, naming
    the node, else log the errors as warnings. Warnings are always logged. Returns all findings."""
    matrix = matrix or SupportMatrix.load()
    findings: list[Finding] = []
    for path in paths.values():
        findings += check_graph_file(Path(path), matrix, Path(path).name)
    errors = [f for f in findings if f.severity == "error"]
    for f in findings:
        if f.severity == "warning":
            log.warning("TensorRT %s: %s", matrix.tensorrt, f)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = f"TensorRT {matrix.tensorrt} ONNX parser would reject {errors[0]}{more}"
        if strict:
            raise TensorRTCompatError(message, findings)
        log.warning("%s; a TensorRT build of these graphs would fail", message)
        for f in errors[1:]:
            log.warning("TensorRT %s: %s", matrix.tensorrt, f)
    else:
        log.info("TensorRT %s compatibility: %d graphs pass", matrix.tensorrt, len(paths))
    return findings


class _Checker:
    """Walks one graph (and its subgraphs) with the types and constants known so far."""

    def __init__(self, graph_name: str, matrix: SupportMatrix, findings: list[Finding]):
        self.graph_name = graph_name
        self.m = matrix
        self.findings = findings
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple | None] = {}
        self.weights: dict[str, np.ndarray | None] = {}  # initializers and Constant outputs (value if small)
        self.constant: set[str] = set()  # build-time constants (weights, and what is computed from them)
        self.io: set[str] = set()

    def add(self, node: str, op: str, message: str, severity: str = "error") -> None:
        self.findings.append(Finding(self.graph_name, node, op, message, severity))

    # -- value information ----------------------------------------------------------------
    def _value_info(self, v) -> None:
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            return
        if t.elem_type:
            self.types[v.name] = t.elem_type
        if t.HasField("shape"):
            self.shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
        else:
            self.shapes.setdefault(v.name, None)

    def graph(self, g: onnx.GraphProto, top: bool = False, prefix: str = "") -> None:
        for v in list(g.input) + list(g.output) + list(g.value_info):
            self._value_info(v)
        for init in g.initializer:
            self.types[init.name] = init.data_type
            self.shapes[init.name] = tuple(init.dims)
            self.weights[init.name] = _small_value(init)
            self.constant.add(init.name)
        if top:
            init_names = {i.name for i in g.initializer}
            for kind, values in (("input", g.input), ("output", g.output)):
                for v in values:
                    if v.name in init_names:
                        continue
                    self.io.add(v.name)
                    shape = self.shapes.get(v.name)
                    if shape is None or any(not isinstance(d, int) or d <= 0 for d in shape):
                        self.add("", f"graph {kind} {v.name!r}", f"expected a static shape, got {_fmt_shape(shape)}")
        for index, node in enumerate(g.node):
            self.node(node, index, prefix)

    # -- one node -------------------------------------------------------------------------
    def node(self, node: onnx.NodeProto, index: int, prefix: str) -> None:
        name = prefix + (node.name or f"{node.op_type}#{index}")
        op = node.op_type
        self._record_constants(node)
        if node.domain not in self.m.domains:
            self.add(name, op, f"expected an operator of the default ONNX domain, got domain {node.domain!r} "
                               f"(custom operators need a TensorRT plugin)")
            return
        entry = self.m.op(op)
        if entry is None:
            self.add(name, op, f"expected an operator in the TensorRT {self.m.tensorrt} parser's support list, got {op}")
            return
        if not entry["supported"]:
            self.add(name, op, f"expected a supported operator, got {op}, which the TensorRT {self.m.tensorrt} parser does not support")
            return
        self._check_types(node, name, entry)
        self._check_outputs_static(node, name)
        self._check_rules(node, name, entry.get("rules", {}))
        if op in _SUBGRAPH_OPS:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    self.graph(a.g, prefix=f"{name}/{a.name}/")
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for i, sub in enumerate(a.graphs):
                        self.graph(sub, prefix=f"{name}/{a.name}[{i}]/")

    def _record_constants(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if op == "Constant":
            for a in node.attribute:
                if a.name == "value" and node.output:
                    self.weights[node.output[0]] = _small_value(a.t)
                    self.types.setdefault(node.output[0], a.t.data_type)
            self.constant.update(o for o in node.output if o)
            return
        if op in ("Shape", "Size"):
            shape = self.shapes.get(node.input[0]) if node.input else None
            if shape is not None and all(isinstance(d, int) and d > 0 for d in shape):
                self.constant.update(o for o in node.output if o)
            return
        inputs = [i for i in node.input if i]
        if op not in _RANDOM_OPS and op not in _SUBGRAPH_OPS and inputs and all(i in self.constant for i in inputs):
            self.constant.update(o for o in node.output if o)
            if op == "Identity" and inputs[0] in self.weights:
                self.weights[node.output[0]] = self.weights[inputs[0]]

    def _check_types(self, node, name: str, entry: dict) -> None:
        supported = set(entry.get("types", ()))
        idx = entry.get("type_input", 0)
        dtypes = self.m.dtypes
        if idx is not None and len(node.input) > idx and node.input[idx]:
            t = self.types.get(node.input[idx])
            if t is not None:
                tname = _TYPE_NAMES.get(t, onnx.TensorProto.DataType.Name(t))
                if tname == "DOUBLE" and "DOUBLE" in dtypes.get("cast_down", ()):
                    pass  # reported once, where the DOUBLE tensor is produced
                elif tname not in supported:
                    self.add(name, node.op_type,
                             f"expected input {node.input[idx]!r} of type {'/'.join(sorted(supported))}, got {tname}")
        bad_cast = False
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            tname = _TYPE_NAMES.get(to, onnx.TensorProto.DataType.Name(to) if to is not None else "?")
            if tname not in supported:
                bad_cast = True
                self.add(name, "Cast", f"expected a cast to {'/'.join(sorted(supported))}, got a cast to {tname}")
        for out in node.output:
            if not out or out not in self.types or bad_cast:  # a bad cast target is reported once, above
                continue
            tname = _TYPE_NAMES.get(self.types[out], onnx.TensorProto.DataType.Name(self.types[out]))
            if tname in dtypes.get("cast_down", ()):
                self.add(name, node.op_type, f"output {out!r} is {tname}: the parser casts it down to FP32, clamping "
                                             f"to +-FLT_MAX", severity="warning")
            elif tname not in dtypes["supported"]:
                self.add(name, node.op_type, f"expected output {out!r} of a TensorRT type, got {tname}")
            elif tname in dtypes.get("io_only", ()) and out not in self.io:
                self.add(name, node.op_type, f"expected {tname} only on network inputs and outputs, got {tname} "
                                             f"for the inner tensor {out!r}")

    def _check_outputs_static(self, node, name: str) -> None:
        for out in node.output:
            if not out:
                continue
            shape = self.shapes.get(out, "missing")
            if shape == "missing" or shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
                got = "no inferred shape" if shape == "missing" else _fmt_shape(shape)
                self.add(name, node.op_type, f"expected a static shape for output {out!r}, got {got}")

    def _check_rules(self, node, name: str, rules: dict) -> None:
        op = node.op_type
        inputs = list(node.input)
        for key, what in (("weights_inputs", "an initializer"), ("constant_inputs", "a build-time constant")):
            for i, label in rules.get(key, {}).items():
                i = int(i)
                if i < len(inputs) and inputs[i]:
                    ok = inputs[i] in self.weights if key == "weights_inputs" else inputs[i] in self.constant
                    if not ok:
                        self.add(name, op, f"expected input {label} ({inputs[i]!r}) to be {what}, got a computed tensor")
        for i, label in rules.get("false_inputs", {}).items():
            i = int(i)
            if i < len(inputs) and inputs[i]:
                v = self.weights.get(inputs[i])
                if v is not None and bool(np.any(v)):
                    self.add(name, op, f"expected {label} to be False, got True")
        for i, bound in rules.get("max_constant", {}).items():
            i = int(i)
            if i < len(inputs) and inputs[i]:
                v = self.weights.get(inputs[i])
                if v is not None and v.size and int(np.max(v)) > bound:
                    self.add(name, op, f"expected input {i} <= {bound}, got {int(np.max(v))}")
        for i, label in rules.get("absent_inputs", {}).items():
            i = int(i)
            if i < len(inputs) and inputs[i]:
                self.add(name, op, f"expected no {label} input, got {inputs[i]!r}")
        outputs = list(node.output)
        for i, label in rules.get("absent_outputs", {}).items():
            i = int(i)
            if i < len(outputs) and outputs[i]:
                self.add(name, op, f"expected the {label} output to be unused, got {outputs[i]!r}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for attr, allowed in rules.get("attributes", {}).items():
            if attr not in attrs:
                continue
            value = attrs[attr]
            if isinstance(value, bytes):
                value = value.decode()
            if allowed == "ones":
                if value and any(int(v) != 1 for v in value):
                    self.add(name, op, f"expected {attr} all ones, got {list(value)}")
            elif not allowed:
                self.add(name, op, f"expected no {attr} attribute, got one")
            elif value not in allowed:
                self.add(name, op, f"expected {attr} in {allowed}, got {value!r}")


def _small_value(t: TensorProto) -> np.ndarray | None:
    """The value of a small initializer (axes, K, flags); None for weights (possibly external)."""
    n = 1
    for d in t.dims:
        n *= d
    if n > 64 or t.data_location == TensorProto.EXTERNAL:
        return None
    try:
        return numpy_helper.to_array(t)
    except Exception:
        return None


def _fmt_shape(shape) -> str:
    if shape is None:
        return "an unknown rank"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
