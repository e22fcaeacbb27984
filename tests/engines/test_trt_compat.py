"""TensorRT compatibility of exported graphs: every DiT graph passes; graphs the parser would reject
fail with the offending node named."""

import functools
import logging
import shutil

import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

from clusca_trt.exporters.build import build_engines
from clusca_trt.engines.trt_compat import SupportMatrix, TensorRTCompatError, check_graphs, check_model
from clusca_trt.spec import BuildOptions


@pytest.fixture(scope="module")
def engines_k0(tiny_model, tmp_path_factory):
    """TaylorSeer/FORA-only engines (K=0, O=0): just the full and forecast graphs, checked at build."""
    out = tmp_path_factory.mktemp("compat") / "k0"
    check = functools.partial(check_graphs, strict=True)
    return build_engines(tiny_model, BuildOptions(batch=1, clusters=0, order=0), out, check=check).manifest


@pytest.mark.parametrize("engines", ["engines_k4", "engines_k16", "engines_k0"])
def test_every_exported_dit_graph_passes(engines, request):
    manifest = request.getfixturevalue(engines)
    findings = check_graphs(manifest.graph_paths(), strict=True)
    assert findings == []
    matrix = SupportMatrix.load()
    for path in manifest.graph_paths().values():
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        assert ops and all(matrix.op(op)["supported"] for op in ops)  # the check saw real, listed operators


def test_support_data_records_its_tensorrt_version_and_covers_our_opsets():
    m = SupportMatrix.load()
    assert m.tensorrt == "10.15" and "operators.md" in m.source
    assert m.opset_min <= 18 and m.opset_max >= 20  # BuildOptions allows opset 18..20
    assert m.op("LayerNormalization")["supported"] and not m.op("Det")["supported"]


def _unsupported(src, dst):
    """A real exported graph with one element-wise op (Tanh / Gelu / Sigmoid) turned into Bernoulli
    (valid ONNX; no TensorRT support)."""
    model = onnx.load(str(src), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type in ("Tanh", "Gelu", "Sigmoid"))
    node.op_type = "Bernoulli"
    onnx.save(model, str(dst))
    return node.name


def test_a_graph_with_an_unsupported_op_fails_naming_the_node(engines_k4, tmp_path):
    paths = dict(engines_k4.graph_paths())
    for p in tmp_path.glob("*"):
        p.unlink()
    src = paths["partial"]
    shutil.copy(src.with_suffix(".onnx.data"), tmp_path) if src.with_suffix(".onnx.data").exists() else None
    paths["partial"] = tmp_path / "partial.onnx"
    node = _unsupported(src, paths["partial"])
    with pytest.raises(TensorRTCompatError) as e:
        check_graphs(paths, strict=True)
    msg = str(e.value)
    assert f"partial.onnx: node {node!r} (Bernoulli)" in msg and "does not support" in msg and "\n" not in msg
    assert [f.node for f in e.value.findings if f.severity == "error"] == [node]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_not_strict_only_warns(engines_k4, tmp_path):
    path = tmp_path / "partial.onnx"
    node = _unsupported(engines_k4.graph_path("partial"), path)
    records, logger = _Records(), logging.getLogger("clusca_trt.engines.trt_compat")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.WARNING)  # whatever an earlier test of this worker set (the CLI sets levels)
    try:
        findings = check_graphs({"partial": path}, strict=False)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert [f.node for f in findings] == [node]
    assert any(node in m and "would fail" in m for m in records.messages)


def test_build_fails_early_and_leaves_nothing(tiny_model, engines_k0, tmp_path, monkeypatch):
    """build_engines with the strict check: the export is vetted before anything is put in place."""

    def export_with_an_unsupported_op(adapter, spec, out_dir):
        paths = {}
        for name, src in engines_k0.graph_paths().items():
            paths[name] = out_dir / src.name
            shutil.copy(src, paths[name])
        _unsupported(engines_k0.graph_path("full"), paths["full"])
        return paths

    monkeypatch.setattr("clusca_trt.exporters.build.export_all", export_with_an_unsupported_op)
    check = functools.partial(check_graphs, strict=True)
    with pytest.raises(TensorRTCompatError, match=r"full.onnx: node '.*' \(Bernoulli\)"):
        build_engines(tiny_model, BuildOptions(batch=1, clusters=0, order=0), tmp_path / "eng", force=True, check=check)
    assert list(tmp_path.iterdir()) == []


# -- small graphs with one problem each -----------------------------------------------------------


def _model(nodes, inputs, outputs, opset=18, initializers=(), functions=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))
    m.ir_version = 9
    return m


def vi(name, dtype=T.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dtype, list(shape) if shape is not None else None)


def const(name, values, dtype=T.INT64):
    return helper.make_tensor(name, dtype, [len(values)], values)


CASES = {
    "bool arithmetic": (
        [helper.make_node("Greater", ["a", "a"], ["b"], name="gt"), helper.make_node("Add", ["b", "b"], ["c"], name="bool_add")],
        [vi("a")], [vi("c", T.BOOL)], {}, "bool_add", "expected input 'b' of type BF16/FP16/FP32/INT32/INT64, got BOOL",
    ),
    "int64 matmul": (
        [helper.make_node("MatMul", ["i", "j"], ["k"], name="int_mm")],
        [vi("i", T.INT64, (2, 3)), vi("j", T.INT64, (3, 2))], [vi("k", T.INT64, (2, 2))], {}, "int_mm", "got INT64",
    ),
    "cast to double": (
        [helper.make_node("Cast", ["a"], ["d"], name="to_double", to=T.DOUBLE), helper.make_node("Cast", ["d"], ["e"], to=T.FLOAT)],
        [vi("a")], [vi("e")], {}, "to_double", "expected a cast to BF16/BOOL/FP16/FP32/INT32/INT64/UINT8, got a cast to DOUBLE",
    ),
    "uint8 inside the network": (
        [helper.make_node("Cast", ["a"], ["u"], name="to_u8", to=T.UINT8), helper.make_node("Cast", ["u"], ["e"], name="back", to=T.FLOAT)],
        [vi("a")], [vi("e")], {}, "to_u8", "expected UINT8 only on network inputs and outputs",
    ),
    "int16 tensor": (
        [helper.make_node("Cast", ["a"], ["s"], name="to_i16", to=T.INT16), helper.make_node("Cast", ["s"], ["e"], to=T.FLOAT)],
        [vi("a")], [vi("e")], {}, "to_i16", "got a cast to INT16",
    ),
    "dynamic input": (
        [helper.make_node("Relu", ["a"], ["b"], name="relu")], [vi("a", shape=("batch", 3))], [vi("b", shape=("batch", 3))],
        {}, "", "graph input 'a': expected a static shape, got [batch, 3]",
    ),
    "data-dependent shape": (
        [helper.make_node("NonZero", ["a"], ["nz"], name="nonzero"), helper.make_node("Cast", ["nz"], ["e"], name="c", to=T.FLOAT)],
        [vi("a")], [vi("e", shape=(2, 6))], {}, "nonzero", "expected a static shape for output 'nz', got [2, ",
    ),
    "custom domain": (
        [helper.make_node("FancyOp", ["a"], ["b"], name="fancy", domain="com.example")], [vi("a")], [vi("b")],
        {"opset": [("", 18), ("com.example", 1)]}, "fancy", "got domain 'com.example'",
    ),
    "unknown op": (
        [helper.make_node("Frobnicate", ["a"], ["b"], name="frob")], [vi("a")], [vi("b")],
        {}, "frob", "expected an operator in the TensorRT 10.15 parser's support list, got Frobnicate",
    ),
    "computed reduction axes": (
        [helper.make_node("ArgMax", ["a"], ["ax"], name="argmax", axis=1, keepdims=0),
         helper.make_node("ReduceSum", ["a", "ax"], ["r"], name="rsum", keepdims=1)],
        [vi("a")], [vi("r", shape=None)], {}, "rsum", "expected input axes ('ax') to be an initializer, got a computed tensor",
    ),
    "topk unsorted": (
        [helper.make_node("TopK", ["a", "k"], ["v", "i"], name="topk", sorted=0)], [vi("a")],
        [vi("v", shape=(2, 2)), vi("i", T.INT64, (2, 2))], {"init": [const("k", [2])]}, "topk", "expected sorted in [1], got 0",
    ),
    "layernorm statistics used": (
        [helper.make_node("LayerNormalization", ["a", "w"], ["y", "mean"], name="ln")], [vi("a")],
        [vi("y"), vi("mean", shape=(2, 1))], {"init": [helper.make_tensor("w", T.FLOAT, [3], [1.0] * 3)]},
        "ln", "expected the Mean output to be unused, got 'mean'",
    ),
    "dropout in training": (
        [helper.make_node("Dropout", ["a", "", "t"], ["y"], name="drop")], [vi("a")], [vi("y")],
        {"init": [helper.make_tensor("t", T.BOOL, [], [True])]}, "drop", "expected training_mode to be False, got True",
    ),
    "bad node inside an If branch": (
        [helper.make_node("If", ["cond"], ["y"], name="branch",
                          then_branch=helper.make_graph([helper.make_node("Det", ["a"], ["d"], name="det")], "then", [], [vi("d", shape=())]),
                          else_branch=helper.make_graph([helper.make_node("ReduceSum", ["a"], ["d2"], name="sum", keepdims=0)], "else", [],
                                                        [vi("d2", shape=())]))],
        [vi("a", shape=(3, 3)), vi("cond", T.BOOL, ())], [vi("y", shape=())], {}, "branch/then_branch/det", "does not support",
    ),
    "opset too old": (
        [helper.make_node("Relu", ["a"], ["b"], name="relu")], [vi("a")], [vi("b")], {"opset": [("", 8)]},
        "", "expected a default-domain opset in 9..24 (TensorRT 10.15), got 8",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rejected_patterns_name_the_node(case):
    nodes, inputs, outputs, extra, node, message = CASES[case]
    model = _model(nodes, inputs, outputs, initializers=extra.get("init", ()))
    if "opset" in extra:
        del model.opset_import[:]
        model.opset_import.extend(helper.make_opsetid(d, v) for d, v in extra["opset"])
    errors = [f for f in check_model(model, "case.onnx") if f.severity == "error"]
    assert any(f.node == node and message in str(f) for f in errors), [str(f) for f in errors]


def test_clean_small_graph_passes_with_computed_constants_and_functions():
    """CumSum's axis computed from a static Shape is a build-time constant; a local function is inlined."""
    fn = helper.make_function("local", "Twice", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
                              [helper.make_opsetid("", 18)])
    nodes = [
        helper.make_node("Shape", ["a"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="first_dim", axis=0),
        helper.make_node("Sub", ["n", "n"], ["ax"], name="axis0"),
        helper.make_node("CumSum", ["a", "ax"], ["c"], name="cumsum"),
        helper.make_node("Twice", ["c"], ["y"], name="twice", domain="local"),
    ]
    model = _model(nodes, [vi("a")], [vi("y")], initializers=[helper.make_tensor("zero", T.INT64, [], [0])], functions=[fn])
    model.opset_import.append(helper.make_opsetid("local", 1))
    assert check_model(model, "ok.onnx") == []
    # the same axis from a graph input is computed at run time: rejected, naming the node
    model.graph.input.append(vi("runtime_axis", T.INT64, ()))
    model.graph.node[3].input[1] = "runtime_axis"
    findings = check_model(model, "ok.onnx")
    assert [(f.node, f.severity) for f in findings] == [("cumsum", "error")]
    assert "expected input axis ('runtime_axis') to be a build-time constant" in findings[0].message


def test_double_output_of_a_supported_op_is_a_warning():
    model = _model([helper.make_node("Relu", ["a"], ["b"], name="relu_double")], [vi("a", T.DOUBLE)], [vi("b", T.DOUBLE)])
    findings = check_model(model, "d.onnx")
    assert [(f.node, f.severity) for f in findings] == [("relu_double", "warning")]
    assert "casts it down to FP32" in findings[0].message


def test_cli_build_checks_every_graph_fatal_for_tensorrt_warning_for_onnxruntime(engines_k0, tmp_path, monkeypatch):
    import sys

    from click.testing import CliRunner

    import clusca_trt.exporters.trt_build as trt_mod
    from clusca_trt.cli import main

    def export_with_an_unsupported_op(adapter, spec, out_dir):
        paths = {name: out_dir / src.name for name, src in engines_k0.graph_paths().items()}
        for name, src in engines_k0.graph_paths().items():
            shutil.copy(src, paths[name])
        export_with_an_unsupported_op.node = _unsupported(engines_k0.graph_path("full"), paths["full"])
        return paths

    def no_plans(*a, **k):
        raise AssertionError("no plan may be built from graphs that failed the check")

    monkeypatch.setattr("clusca_trt.exporters.build.export_all", export_with_an_unsupported_op)
    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: type(sys)("tensorrt"))  # as if TensorRT were installed
    monkeypatch.setattr(trt_mod, "build_plans", no_plans)
    # what engines_k0 was built with
    args = ["build", "--model", "dit-tiny", "--random-init", "--seed", "0", "--clusters", "0", "--order", "0", "-B", "1"]

    r = CliRunner().invoke(main, [*args, "--backend", "tensorrt", "--out", str(tmp_path / "trt")])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1, r.output
    node = export_with_an_unsupported_op.node
    assert f"full.onnx: node {node!r} (Bernoulli)" in errors[0] and "TensorRT 10.15 ONNX parser would reject" in errors[0]
    assert not (tmp_path / "trt").exists()

    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ort")])  # ONNX Runtime: a warning only
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ort" / "manifest.json").is_file()
    assert any("would reject" in ln and node in ln for ln in r.output.splitlines()), r.output
