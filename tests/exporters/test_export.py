"""The exported graphs: checked, static, and the partial graph really computes K rows."""

import onnx
import pytest

from clusca_trt.exporters import ExportError, check_graph


def _graph(manifest, name):
    model = onnx.load(str(manifest.graph_path(name)))
    return onnx.shape_inference.infer_shapes(model)


def _shapes(model):
    out = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        out[v.name] = tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
    for init in model.graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _mlp_inputs(model, hidden):
    """Shapes of the activations entering an MLP's first projection (weight [D, 4D] or [4D, D])."""
    shapes = _shapes(model)
    found = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        w = shapes.get(node.input[1], ())
        if sorted(w) == sorted((hidden, 4 * hidden)) and (w[0] == hidden if node.op_type == "MatMul" else True):
            x = shapes.get(node.input[0], ())
            if len(x) == 3:  # token activations [B, rows, D] (not the [B, 256] timestep embedding)
                found.append(x)
    return found


@pytest.mark.parametrize("fixture, K, B", [("engines_k4", 4, 4), ("engines_k16", 16, 2)])
def test_partial_graph_runs_the_mlp_on_k_rows_and_no_attention(request, fixture, K, B):
    manifest = request.getfixturevalue(fixture)
    D = manifest.spec.slots[0].dim
    partial = _graph(manifest, "partial")
    mlp_in = _mlp_inputs(partial, D)
    assert len(mlp_in) == manifest.spec.slots[0].layers  # one MLP per block
    assert all(s == (B, K, D) for s in mlp_in), mlp_in
    ops = {n.op_type for n in partial.graph.node}
    assert "Softmax" not in ops  # no attention in a partial step
    full = _graph(manifest, "full")
    assert all(s == (B, 64, D) for s in _mlp_inputs(full, D))
    assert sum(n.op_type == "Softmax" for n in full.graph.node) == manifest.spec.slots[0].layers
    forecast = _graph(manifest, "forecast")
    assert _mlp_inputs(forecast, D) == [] and "Softmax" not in {n.op_type for n in forecast.graph.node}


def test_every_graph_is_static_and_checked(engines_k4):
    for name, path in engines_k4.graph_paths().items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == 20
        for v in list(model.graph.input) + list(model.graph.output):
            assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), (name, v.name)


def test_check_graph_rejects_a_graph_that_breaks_the_spec(engines_k4, tmp_path):
    model = onnx.load(str(engines_k4.graph_path("select_img")))
    model.graph.output[0].name = "renamed"
    model.graph.node[-1].output[0] = "renamed"
    bad = tmp_path / "select_img.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ExportError, match="expected output 0 fresh_img_out"):
        check_graph(bad, engines_k4.spec, "select_img")
