"""The partial step module (fed by the cond graph's tables) against a literal, block-by-block
reading of the spec."""

import math

import pytest
import torch

from clusca_trt.config import UpdateRule
from clusca_trt.models import dit
from clusca_trt.spec import BuildOptions
from clusca_trt.steps import graph_module
from tests.conftest import TINY
from tests.step_helpers import per_block, step_tables


@pytest.mark.parametrize("rule, correction", [("paper", 1.0), ("residual", 1.0), ("step", 1.0), ("step", 0.5),
                                              ("residual", (0.0, 0.7))])  # one per block
def test_partial_step_is_the_spec(rule, correction):
    gen = torch.Generator().manual_seed(0)
    model = dit.init_random(dit.DiT(TINY), seed=2)
    adapter = dit.DiTAdapter(model)
    K, O = 3, 2
    spec = adapter.export_spec(BuildOptions(batch=1, clusters=K, order=O))
    B, L, T, D = spec.graph_batch, TINY.depth, TINY.tokens, TINY.hidden_size
    x = torch.randn(B, 4, 8, 8, generator=gen)
    t = torch.tensor([500.0, 500.0])
    y = torch.tensor([1, 10])
    d = 2
    coef = torch.tensor([d**i / math.factorial(i) for i in range(O + 1)])
    gamma = 0.3
    assign = torch.randint(0, K, (B, T), generator=gen)
    fresh = torch.stack([torch.stack([torch.nonzero(assign[b] == c)[0, 0] for c in range(K)]) for b in range(B)])
    fresh = fresh.unsqueeze(0).repeat(L, 1, 1)
    caches = {n: torch.randn(s, generator=gen) for n, s in (
        ("attn_f0", (L, B, T, D)), ("attn_fhi", (L, O, B, T, D)), ("mlp_f0", (L, B, T, D)), ("mlp_fhi", (L, O, B, T, D)))}
    g = graph_module(adapter, spec, "partial")
    per_block_correction = correction if isinstance(correction, tuple) else (correction,) * L
    update = torch.tensor([UpdateRule(rule).fields(c) for c in per_block_correction])
    feeds = {"x": x, "forecast_coef": coef, "gamma": torch.tensor([gamma]), "update": update, "assign_img": assign,
             "fresh_img": fresh, **per_block(caches), **step_tables(adapter, spec, {"t": t, "y": y})}
    with torch.no_grad():
        out, *mlp_f0 = g(*[feeds[n] for n in g.input_names])
        mlp_f0 = torch.stack(mlp_f0)

        # literal reading
        h, c = model.embed(x, t, y)
        new_f0 = caches["mlp_f0"].clone()
        for i, blk in enumerate(model.blocks):
            s1, c1, g1, s2, c2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
            A = caches["attn_f0"][i] + caches["attn_fhi"][i, 0] * d + caches["attn_fhi"][i, 1] * d * d / 2
            h = h + g1.unsqueeze(1) * A
            hi = caches["mlp_fhi"][i, 0] * d + caches["mlp_fhi"][i, 1] * d * d / 2  # the forecast's orders >= 1
            for b in range(B):
                for n in range(T):
                    cl = int(assign[b, n])
                    j = int(fresh[i, b, cl])
                    f = blk.mlp_branch(h[b : b + 1, j : j + 1], s2[b : b + 1], c2[b : b + 1])[0, 0]
                    old = caches["mlp_f0"][i, b, n]
                    if rule == "paper":
                        new_f0[i, b, n] = f if n == j else gamma * f + (1 - gamma) * old
                    else:  # the forecast's error at the fresh token, w of it added
                        error = f - (caches["mlp_f0"][i, b, j] + hi[b, j])
                        new_f0[i, b, n] = old + per_block_correction[i] * (1.0 if n == j else gamma) * error
            M = new_f0[i] + hi
            h = h + g2.unsqueeze(1) * M
        want = model.unpatchify(model.final_layer(h, c))
        if rule == "step":  # the correction served this step only
            new_f0 = caches["mlp_f0"]
    torch.testing.assert_close(mlp_f0, new_f0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_paper_rule_is_the_old_partial_step_bit_for_bit():
    """The partial graph fed the paper's rule computes exactly what the partial step computed before
    the update rules (``PartialContext`` without ``update``): the same output and F_0, bit for bit."""
    from clusca_trt.context import PartialContext

    gen = torch.Generator().manual_seed(1)
    model = dit.init_random(dit.DiT(TINY), seed=3)
    adapter = dit.DiTAdapter(model)
    spec = adapter.export_spec(BuildOptions(batch=1, clusters=4, order=2))
    g = graph_module(adapter, spec, "partial")
    feeds = {}
    for t in spec.graphs["partial"].inputs:
        if t.dtype == "int64":
            continue
        feeds[t.name] = torch.randn(t.shape, generator=gen)
    B, T, L = spec.graph_batch, TINY.tokens, TINY.depth
    feeds["assign_img"] = torch.randint(0, 4, (B, T), generator=gen)
    feeds["fresh_img"] = torch.stack([torch.stack([torch.stack([torch.nonzero(feeds["assign_img"][b] == c)[0, 0]
                                                                for c in range(4)]) for b in range(B)])] * L)
    feeds["forecast_coef"] = torch.tensor([1.0, 2.0, 2.0])
    feeds["gamma"] = torch.tensor([0.3])
    feeds["update"] = torch.tensor([UpdateRule.PAPER.fields()] * L)
    feeds.update(step_tables(adapter, spec, {"t": torch.tensor([500.0, 500.0]), "y": torch.tensor([1, 10])}))
    with torch.no_grad():
        new = dict(zip(g.output_names, g(*[feeds[n] for n in g.input_names])))
        caches = {t.name: feeds[t.name] for t in spec.cache_tensors()}
        ctx = PartialContext(spec.slots, caches, feeds["forecast_coef"], {"img": feeds["gamma"]},
                             assign={"img": feeds["assign_img"]}, fresh={"img": feeds["fresh_img"]})
        old_out = adapter.forward_step(ctx, g.model_inputs(feeds))
    assert torch.equal(new["out"], old_out)
    for name, value in ctx.new_state().items():
        assert torch.equal(new[name], value)
