"""The exported FLUX graphs, read back: the partial graph runs each double block's image MLP on
K_img rows and its text MLP on K_txt rows, and no attention anywhere."""

from tests.conftest import FLUX_OPTIONS
from tests.exporters.test_export import _graph, _mlp_inputs


def test_partial_graph_runs_k_img_plus_k_txt_mlp_rows_per_double_block_and_no_attention(flux_engines):
    spec = flux_engines.spec
    B, D = spec.graph_batch, spec.slots[0].dim
    double, single = spec.slots[0].layers, spec.slots[-1].layers
    k_img, k_txt = FLUX_OPTIONS.clusters, FLUX_OPTIONS.text_clusters
    assert (B, D, double, single, k_img, k_txt) == (2, 32, 2, 2, 4, 3)

    partial = _graph(flux_engines, "partial")
    assert sorted(_mlp_inputs(partial, D)) == sorted([(B, k_img, D)] * double + [(B, k_txt, D)] * double)
    assert "Softmax" not in {n.op_type for n in partial.graph.node}

    full = _graph(flux_engines, "full")  # image MLP, text MLP per double block; the MLP input of each single block
    want = [(B, 64, D)] * double + [(B, 16, D)] * double + [(B, 80, D)] * single
    assert sorted(_mlp_inputs(full, D)) == sorted(want)
    assert sum(n.op_type == "Softmax" for n in full.graph.node) == double + single  # one joint attention per block

    forecast = _graph(flux_engines, "forecast")
    assert _mlp_inputs(forecast, D) == [] and "Softmax" not in {n.op_type for n in forecast.graph.node}
