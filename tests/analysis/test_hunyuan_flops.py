"""The real HunyuanVideo's FLOPs come from small exports carried to the real size: the two rules
(affine in the block counts, quadratic in the head count) checked against directly counted graphs."""

import pytest

from clusca_trt.analysis.flops import GraphFlops
from clusca_trt.analysis.flops import at_depth, at_heads, lagrange_weights, probe_counts
from clusca_trt.errors import ConfigError
from clusca_trt.spec import BuildOptions
from tests.hunyuan_helpers import TINY


@pytest.mark.parametrize(
    "nodes, x, want", [((1, 2, 3), 24, [231, -483, 253]), ((1, 2, 3), 2, [0, 1, 0]), ((1, 2), 5, [-3, 4])]
)
def test_lagrange_weights(nodes, x, want):
    assert lagrange_weights(nodes, x) == want
    poly = (lambda n: 3 * n * n - n + 7) if len(nodes) == 3 else (lambda n: 2 * n + 5)  # degree < len(nodes)
    assert sum(w * poly(n) for w, n in zip(want, nodes)) == poly(x)


def test_carrying_rules_equal_direct_counts(tmp_path):
    """The partial graph (ClusCa ops, fresh-row MLPs, refiner attention, forecasts) at head width 8:
    heads 1, 2, 3 predict 4 heads; blocks (1, 1), (2, 1), (1, 2) predict (2, 2); every component exact."""
    cfg = TINY.replace(num_layers=1, num_single_layers=1)
    options = BuildOptions(clusters=4, text_clusters=3, order=1)

    def count(h, d, s):
        return probe_counts(cfg, options, h, d, s, ("partial",), tmp_path)["partial"]

    heads = {h: count(h, 1, 1) for h in (1, 2, 3, 4)}
    predicted = at_heads({h: heads[h] for h in (1, 2, 3)}, 4)
    assert predicted.total == heads[4].total and predicted.by_component == heads[4].by_component
    blocks = {(1, 1): heads[1], (2, 1): count(1, 2, 1), (1, 2): count(1, 1, 2)}
    direct = count(1, 2, 2)
    predicted = at_depth(blocks, 2, 2)
    assert predicted.total == direct.total and predicted.by_category == direct.by_category
    assert predicted.bytes_written == direct.bytes_written  # (weight bytes are not: the exporter dedups constants)
    assert heads[2].total > heads[1].total and direct.total > blocks[1, 1].total  # the probes really differ


def test_at_depth_is_affine():
    g = {k: GraphFlops("g", t, {"matmul": t}, {"mlp": t}) for k, t in (((1, 1), 10), ((2, 1), 17), ((1, 2), 13))}
    assert at_depth(g, 20, 40).total == 10 + 19 * 7 + 39 * 3


def test_probe_shape_errors_are_typed():
    from clusca_trt.analysis.flops import hunyuan_video_flops

    with pytest.raises(ConfigError, match="expected 3 head probes"):
        hunyuan_video_flops(BuildOptions(clusters=4), TINY, head_probes=(1, 2))
