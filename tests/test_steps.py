"""The partial step module (fed by the cond graph's tables) against a literal, block-by-block
reading of the spec."""

import math

import torch

from clusca_trt.models import dit
from clusca_trt.spec import BuildOptions
from clusca_trt.steps import graph_module
from tests.conftest import TINY
from tests.step_helpers import per_block, step_tables


def test_partial_step_is_the_spec():
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
    feeds = {"x": x, "forecast_coef": coef, "gamma": torch.tensor([gamma]), "assign_img": assign,
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
            for b in range(B):
                for n in range(T):
                    cl = int(assign[b, n])
                    j = int(fresh[i, b, cl])
                    f = blk.mlp_branch(h[b : b + 1, j : j + 1], s2[b : b + 1], c2[b : b + 1])[0, 0]
                    new_f0[i, b, n] = f if n == j else gamma * f + (1 - gamma) * caches["mlp_f0"][i, b, n]
            M = new_f0[i] + caches["mlp_fhi"][i, 0] * d + caches["mlp_fhi"][i, 1] * d * d / 2
            h = h + g2.unsqueeze(1) * M
        want = model.unpatchify(model.final_layer(h, c))
    torch.testing.assert_close(mlp_f0, new_f0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
