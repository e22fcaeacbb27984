"""The FLOPs counter: node rules by table, one DiT block against a hand count, the depth
extrapolation against a directly counted graph, and schedules."""

import dataclasses

import pytest

from clusca_trt.config import ClusCaConfig
from clusca_trt.analysis.flops import (
    count_engine_dir,
    extrapolated_flops,
    flops_speedup,
    node_flops,
    schedule_flops,
)
from clusca_trt.models import dit
from clusca_trt.schedule import count_kinds, plan
from clusca_trt.spec import BuildOptions

OPTIONS = BuildOptions(batch=2, clusters=4, order=2)  # as the engines_k4 fixture: graph batch 4


@pytest.mark.parametrize(
    "op, ins, outs, attrs, want",
    [
        ("MatMul", [(4, 8, 16), (16, 32)], [(4, 8, 32)], {}, 2 * 4 * 8 * 32 * 16),
        ("MatMul", [(2, 3, 8, 16), (2, 3, 16, 8)], [(2, 3, 8, 8)], {}, 2 * 2 * 3 * 8 * 8 * 16),
        ("Gemm", [(4, 16), (32, 16), (32,)], [(4, 32)], {"transB": 1}, 2 * 4 * 32 * 16 + 4 * 32),
        ("Gemm", [(16, 4), (16, 32)], [(4, 32)], {"transA": 1}, 2 * 4 * 32 * 16),
        ("Conv", [(2, 4, 8, 8), (64, 4, 2, 2), (64,)], [(2, 64, 4, 4)], {}, 2 * 2 * 64 * 16 * 4 * 4 + 2 * 64 * 16),
        ("Conv", [(1, 8, 4, 4), (8, 2, 3, 3)], [(1, 8, 4, 4)], {"group": 4}, 2 * 8 * 16 * 2 * 9),
        ("Einsum", [(2, 3, 4)], [(4, 3, 2)], {"equation": "abc->cba"}, 0),
        ("Einsum", [(2, 3), (3, 5)], [(2, 5)], {"equation": "ij,jk->ik"}, 2 * 2 * 3 * 5),
        ("Add", [(4, 1, 8), (1, 5, 8)], [(4, 5, 8)], {}, 160),
        ("Where", [(4, 8), (4, 8), (4, 8)], [(4, 8)], {}, 32),
        ("Softmax", [(2, 8, 8)], [(2, 8, 8)], {}, 5 * 128),
        ("LayerNormalization", [(2, 8, 16), (16,)], [(2, 8, 16)], {}, 6 * 256),
        ("LayerNormalization", [(2, 8, 16), (16,), (16,)], [(2, 8, 16)], {}, 7 * 256),
        ("ReduceSum", [(2, 8, 16), (1,)], [(2, 8, 1)], {}, 256),
        ("ArgMin", [(2, 8, 16)], [(2, 8)], {}, 256),
        ("Transpose", [(2, 8, 16)], [(16, 8, 2)], {}, 0),
        ("GatherElements", [(2, 8, 16), (2, 4, 16)], [(2, 4, 16)], {}, 0),
    ],
)
def test_node_rules(op, ins, outs, attrs, want):
    assert node_flops(op, ins, outs, attrs)[0] == want


def test_unknown_op_is_reported():
    with pytest.raises(KeyError):
        node_flops("NonMaxSuppression", [(1, 4)], [(1, 4)], {})


@pytest.fixture(scope="module")
def probes(tiny_model):
    """dit-tiny's full and partial graphs exported at depth 1 and 2, extrapolated to its depth 4."""
    cfg = dit.DiTConfig(**tiny_model.model_config)

    def make(d):
        return dit.DiTAdapter(dit.init_random(dit.DiT(dataclasses.replace(cfg, depth=d)), seed=0))

    return extrapolated_flops(make, cfg.depth, OPTIONS, graphs=("cond", "full", "partial"))


def hand_count_full_block(B, T, D, H, O):
    """One DiT block in the full step, written from the model code (models/dit.py, ops.py)."""
    linear = lambda rows, i, o: 2 * rows * i * o + rows * o  # noqa: E731  (weights + bias)
    btd = B * T * D
    f = 6 * btd + B * D + 2 * btd  # norm1 (its modulation comes from the cond graph's table) (LayerNormalization with a unit scale), modulate: 1 + scale, *, +
    f += linear(B * T, D, 3 * D)  # qkv
    f += btd  # q * scale
    f += 2 * B * H * T * T * (D // H) * 2 + 5 * B * H * T * T  # q k^T, attn v, softmax
    f += linear(B * T, D, D)  # proj
    f += 2 * btd  # gate * a, residual add
    f += 6 * btd + B * D + 2 * btd  # norm2, modulate
    f += linear(B * T, D, 4 * D) + 8 * B * T * 4 * D + linear(B * T, 4 * D, D)  # fc1, tanh GELU (8 ops), fc2
    f += 2 * btd  # gate * f, residual add
    f += 2 * (2 * O) * btd  # Taylor refresh of attn and mlp: per order (F_new - F_old) * 1/dt
    return f


def hand_count_partial_block(B, T, D, K, O):
    """One DiT block in the partial step: forecast attention, MLP on K rows, the update rule's propagation,
    forecast MLP."""
    linear = lambda rows, i, o: 2 * rows * i * o + rows * o  # noqa: E731
    btd, bkd = B * T * D, B * K * D
    forecast = (1 + 2 * O) * btd  # F_0 * c_0 + sum_i F_i * c_i
    f = forecast + 2 * btd  # attention forecast, gate, residual
    f += B * K  # row offsets of the fresh indices (gather over the flattened [B * T, D])
    f += 6 * bkd + B * D + 2 * bkd  # norm2 + modulate on the K gathered rows
    f += linear(B * K, D, 4 * D) + 8 * B * K * 4 * D + linear(B * K, 4 * D, D)
    f += 3 * B * T + 3 * btd  # propagate: is-fresh compare, the two per-token weights; f * w_f + F_0 * w_0
    f += 3 * B * T + 3 * bkd  # the update rule: w_f * s, w_0 + r * w_f; f_j - r * (F_0 + hi) at the fresh rows
    f += 1 + btd  # keep > 0.5, and the F_0 written: the corrected one or the old (Where)
    f += forecast + 2 * btd  # MLP forecast from the new F_0, gate, residual
    return f


def test_one_dit_block_matches_the_hand_count(probes, tiny_model):
    cfg = dit.DiTConfig(**tiny_model.model_config)
    B, T, D, H, K, O = 4, cfg.tokens, cfg.hidden_size, cfg.num_heads, OPTIONS.clusters, OPTIONS.order
    assert probes.per_block["full"] == hand_count_full_block(B, T, D, H, O)
    assert probes.per_block["partial"] == hand_count_partial_block(B, T, D, K, O)
    # the block's adaLN modulation, once for the rows of cond_steps steps (its SiLU input is shared)
    R = OPTIONS.cond_steps * B
    assert probes.per_block["cond"] == 2 * R * D * 6 * D + R * 6 * D


def test_extrapolated_count_equals_the_direct_count(probes, engines_k4):
    direct = count_engine_dir(engines_k4)
    for name in ("full", "partial"):
        got, want = probes.per_graph[name], direct[name]
        assert got.total == want.total, name
        assert got.by_category == want.by_category, name
        assert got.by_component == want.by_component, name
        # bytes are a memory-traffic proxy: stacking one layer exports differently from stacking many
        assert got.bytes_written == pytest.approx(want.bytes_written, rel=0.05), name
    assert probes.spec.slots[0].layers == 4


def test_components_name_the_clusca_operations(engines_k4):
    counts = count_engine_dir(engines_k4)
    assert {"clusca.propagate", "clusca.taylor_forecast", "mlp"} <= set(counts["partial"].by_component)
    # the modulation is computed in the cond graph only: no step graph reads its weights
    assert "adaLN_modulation" in counts["cond"].by_component
    for name in ("plain", "full", "partial", "forecast"):
        assert not {"adaLN_modulation", "t_embedder", "y_embedder"} & set(counts[name].by_component), name
    assert "attn" not in counts["partial"].by_component
    assert {"clusca.taylor_refresh", "attn", "mlp"} <= set(counts["full"].by_component)
    for g in counts.values():
        assert sum(g.by_component.values()) == g.total == sum(g.by_category.values())
        assert not g.uncounted_ops


@pytest.fixture(scope="module")
def per_graph(engines_k4):
    return {n: g.total for n, g in count_engine_dir(engines_k4).items()}


@pytest.mark.parametrize("steps, interval, warmup", [(50, 5, 2), (20, 4, 1), (7, 3, 2), (3, 5, 2)])
def test_schedule_counts_every_graph_call(engines_k4, per_graph, steps, interval, warmup):
    spec = engines_k4.spec
    config = ClusCaConfig(interval=interval, clusters=4, warmup=warmup)
    planned = plan(steps, config, spec.options.order)
    s = schedule_flops(per_graph, spec, planned)
    kinds = count_kinds(planned)
    assert s.calls["full"] == kinds["full"] and s.calls["partial"] == s.calls["select"] == kinds["partial"]
    assert s.calls["cluster"] == sum(p.cluster for p in planned)
    assert s.calls["cond"] == -(-steps // spec.options.cond_steps) and s.calls["plain"] == 0
    assert s.total == sum(s.calls[k] * per_graph[n] for k, n in
                          [("cond", "cond"), ("full", "full"), ("partial", "partial"), ("select", "select_img"),
                           ("cluster", "cluster_img")])


def test_speedups(engines_k4, per_graph):
    spec = engines_k4.spec
    assert flops_speedup(per_graph, spec, ClusCaConfig(interval=1, clusters=0), 50) == 1.0
    clusca = flops_speedup(per_graph, spec, ClusCaConfig(interval=5, clusters=4), 50)
    taylor = flops_speedup(per_graph, spec, ClusCaConfig(interval=5, clusters=0, order=2), 50)
    fora = flops_speedup(per_graph, spec, ClusCaConfig(interval=5, clusters=0, order=0), 50)
    assert 1.0 < clusca < taylor <= fora < 5.0
    assert flops_speedup(per_graph, spec, ClusCaConfig(interval=10, clusters=4), 50) > clusca


def test_cli_flops_of_an_engine_directory(engines_k4):
    import json

    from click.testing import CliRunner

    from clusca_trt.cli import main

    r = CliRunner().invoke(main, ["flops", str(engines_k4.directory), "-N", "5", "--steps", "50", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert set(info["methods"]) == {"full", "clusca", "taylorseer", "fora"}
    assert info["methods"]["full"]["speedup"] == 1.0
    assert info["methods"]["clusca"]["schedule"]["calls"]["partial"] == 39
    r = CliRunner().invoke(main, ["flops"])
    assert r.exit_code == 2 and "give either ENGINE_DIR or --model" in r.output
