"""FLUX FLOPs: the ONNX counter on FLUX graphs equals a hand count of their matrix products
(which is what the FLUX.1-dev numbers of benchmarks/flux_flops.py are checked against)."""

import dataclasses

from clusca_trt.analysis.flops import count_file
from clusca_trt.models.flux import analytic_matmul_flops, probe_adapter
from clusca_trt.exporters import export_graph
from tests.conftest import FLUX_OPTIONS


def test_full_graph_matmuls_equal_the_hand_count(flux_engines, flux_model):
    cfg, spec = flux_model.adapter.cfg, flux_engines.spec
    hand = analytic_matmul_flops(cfg, FLUX_OPTIONS.clusters, FLUX_OPTIONS.text_clusters)
    for graph, rows in (("full", spec.graph_batch), ("plain", spec.graph_batch), ("cond", spec.cond_rows)):
        assert count_file(flux_engines.graph_path(graph)).by_category["matmul"] == rows * hand[graph], graph


def test_partial_graph_matmuls_equal_the_hand_count(tmp_path, flux_model):
    """At O = 0 the partial graph's only matrix products are the model's (no forecast order sum)."""
    cfg = flux_model.adapter.cfg
    adapter = probe_adapter(cfg, heads=3, double=2, single=1)  # other heads and depths than the session build
    options = dataclasses.replace(FLUX_OPTIONS, batch=1, order=0)
    path = export_graph(adapter, adapter.export_spec(options), "partial", tmp_path / "partial.onnx")
    hand = analytic_matmul_flops(adapter.cfg, options.clusters, options.text_clusters)
    assert count_file(path).by_category["matmul"] == hand["partial"] < hand["full"] / 10
