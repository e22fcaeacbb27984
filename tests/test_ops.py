"""ClusCa's tensor operations against literal, per-token readings of the spec."""

import math

import numpy as np
import pytest
import torch

from clusca_trt import ops


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("gamma", [0.0, 0.005, 0.5, 1.0])
def test_propagate_matches_the_spec_token_by_token(gamma):
    g = _gen(1)
    B, T, K, D = 2, 24, 5, 3
    f0 = torch.randn(B, T, D, generator=g)
    assign = torch.randint(0, K - 1, (B, T), generator=g)  # cluster K-1 is empty
    fresh_index = torch.stack([ops.select_fresh(assign, torch.rand(1, B, T, generator=g), K)[0][b] for b in range(B)])
    values = torch.randn(B, K, D, generator=g)
    got = ops.propagate(f0, values, fresh_index, assign, torch.tensor([gamma]))
    want = f0.clone()
    for b in range(B):
        fresh = {int(fresh_index[b, c]): c for c in range(K) if (assign[b] == c).any()}
        for n in range(T):
            c = int(assign[b, n])
            members_fresh = [values[b, cc] for j, cc in fresh.items() if cc == c]
            mean = torch.stack(members_fresh).mean(0)
            want[b, n] = values[b, fresh[n]] if n in fresh else gamma * mean + (1 - gamma) * f0[b, n]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_empty_cluster_never_writes_and_never_double_counts():
    B, T, K, D = 1, 6, 4, 2
    assign = torch.tensor([[0, 0, 1, 1, 1, 0]])  # clusters 2, 3 empty
    key = torch.tensor([[[0.9, 0.1, 0.5, 0.2, 0.7, 0.3]]])
    idx = ops.select_fresh(assign, key, K)[0]
    assert idx.tolist() == [[1, 3, 0, 0]]  # empty clusters point at token 0, which is not fresh
    f0 = torch.zeros(B, T, D)
    values = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [99.0, 99.0], [77.0, 77.0]]])
    out = ops.propagate(f0, values, idx, assign, torch.tensor([0.0]))
    assert out[0, 0].tolist() == [0.0, 0.0]  # token 0 is not fresh: empty clusters' rows do not land on it
    assert out[0, 1].tolist() == [1.0, 1.0] and out[0, 3].tolist() == [2.0, 2.0]
    assert not (out == 99.0).any() and not (out == 77.0).any()


def _update_case(seed=4):
    g = _gen(seed)
    B, T, K, D = 2, 24, 5, 3
    f0, hi = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    assign = torch.randint(0, K - 1, (B, T), generator=g)  # cluster K-1 is empty
    fresh_index = ops.select_fresh(assign, torch.rand(1, B, T, generator=g), K)[0]
    values = torch.randn(B, K, D, generator=g)
    return f0, hi, values, fresh_index, assign


UPDATE_RULES = {  # rule -> (residual, keep, correction): what ``UpdateRule.fields`` feeds the partial graph
    "paper": (0.0, 1.0, 1.0), "residual": (1.0, 1.0, 1.0), "step": (1.0, 0.0, 1.0), "step-half": (1.0, 0.0, 0.5),
    "residual-none": (1.0, 1.0, 0.0),
}


@pytest.mark.parametrize("gamma", [0.0, 0.2])
@pytest.mark.parametrize("rule", list(UPDATE_RULES))
def test_partial_update_by_rule_token_by_token(rule, gamma):
    """The branch output and the written F_0 of every update rule, against a per-token reading (seed 4,
    tolerance 1e-6): paper = ``propagate`` + the forecast's higher orders; the residual rules add
    ``correction * w * (f_j - forecast_j)`` to the forecast (a fresh token's output is ``f_j`` at
    correction 1); ``keep`` 0 writes the old F_0 back unchanged."""
    f0, hi, values, fresh_index, assign = _update_case()
    residual, keep, correction = UPDATE_RULES[rule]
    out, written = ops.partial_update(f0, hi, values, fresh_index, assign, torch.tensor([gamma]),
                                      torch.tensor(UPDATE_RULES[rule]))
    forecast = f0 + hi
    want = torch.empty_like(f0)
    for b in range(f0.shape[0]):
        fresh = {int(fresh_index[b, c]): c for c in range(values.shape[1]) if (assign[b] == c).any()}
        by_cluster = {c: j for j, c in fresh.items()}
        for n in range(f0.shape[1]):
            j = by_cluster[int(assign[b, n])]
            f = values[b, assign[b, n]]
            w = 1.0 if n == j else gamma
            if residual:
                want[b, n] = forecast[b, n] + correction * w * (f - forecast[b, j])
            else:
                want[b, n] = w * f + (1 - w) * f0[b, n] + hi[b, n]
            if residual and correction == 1.0 and n == j:
                torch.testing.assert_close(out[b, n], f, atol=1e-6, rtol=1e-6)  # the fresh token's output is f_j
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    if keep:
        torch.testing.assert_close(written, out - hi, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(written, f0)  # nothing of the correction leaks into later steps


def test_paper_rule_is_propagate_bit_for_bit():
    """The paper's rule through the update parts is today's ``propagate`` exactly (not just closely)."""
    f0, hi, values, fresh_index, assign = _update_case(5)
    gamma = torch.tensor([0.005])
    out, written = ops.partial_update(f0, hi, values, fresh_index, assign, gamma, torch.tensor(UPDATE_RULES["paper"]))
    old = ops.propagate(f0, values, fresh_index, assign, gamma)
    assert torch.equal(written, old) and torch.equal(out, old + hi)


def test_residual_rule_with_no_higher_orders_and_empty_clusters():
    """O = 0 (no ``hi``): the forecast is F_0; an empty cluster's row never lands anywhere."""
    B, T, K, D = 1, 6, 4, 2
    assign = torch.tensor([[0, 0, 1, 1, 1, 0]])  # clusters 2, 3 empty
    idx = ops.select_fresh(assign, torch.tensor([[[0.9, 0.1, 0.5, 0.2, 0.7, 0.3]]]), K)[0]  # fresh 1 and 3
    f0 = torch.arange(T * D, dtype=torch.float32).reshape(B, T, D)
    values = torch.tensor([[[10.0, 10.0], [20.0, 20.0], [99.0, 99.0], [77.0, 77.0]]])
    out, written = ops.partial_update(f0, None, values, idx, assign, torch.tensor([0.5]), torch.tensor([1.0, 0.0, 1.0]))
    assert out[0, 1].tolist() == [10.0, 10.0] and out[0, 3].tolist() == [20.0, 20.0]
    assert out[0, 0].tolist() == (f0[0, 0] + 0.5 * (values[0, 0] - f0[0, 1])).tolist()
    assert not (out == 99.0).any() and not (out == 77.0).any() and torch.equal(written, f0)


def test_select_fresh_is_a_uniform_member():
    g = _gen(2)
    T, K = 12, 3
    assign = torch.tensor([[0, 1, 2] * 4])
    picks = np.zeros((K, T))
    for _ in range(3000):
        idx = ops.select_fresh(assign, torch.rand(1, 1, T, generator=g), K)[0, 0]
        for c in range(K):
            assert assign[0, idx[c]] == c
            picks[c, idx[c]] += 1
    for c in range(K):
        members = picks[c][picks[c] > 0]
        assert len(members) == 4
        assert members.min() > 0.8 * 3000 / 4  # roughly uniform over the 4 members


def test_taylor_refresh_and_forecast_literal():
    g = _gen(3)
    y, f0, f1, f2 = (torch.randn(1, 4, 2, generator=g) for _ in range(4))
    dt = 4.0
    coef = torch.tensor([1 / dt, 1 / dt])
    new0, hi = ops.taylor_refresh(y, f0, torch.stack([f1, f2]), coef)
    torch.testing.assert_close(new0, y)
    torch.testing.assert_close(hi[0], (y - f0) / dt)
    torch.testing.assert_close(hi[1], ((y - f0) / dt - f1) / dt)
    d = 3
    fc = torch.tensor([d**i / math.factorial(i) for i in range(3)])
    torch.testing.assert_close(
        ops.taylor_forecast(new0, hi, fc), new0 + hi[0] * d + hi[1] * d * d / 2, atol=1e-6, rtol=1e-6
    )
    # no history yet: higher factors are zero
    _, hi0 = ops.taylor_refresh(y, f0, torch.stack([f1, f2]), torch.zeros(2))
    assert not hi0.any()


def _kmeans_numpy(x, c, iters, metric):
    def dist(x, c):
        if metric == "l1":
            return np.abs(x[:, None] - c[None]).sum(-1)
        return ((x[:, None] - c[None]) ** 2).sum(-1)

    for _ in range(iters):
        a = dist(x, c).argmin(1)
        for k in range(len(c)):
            if (a == k).any():
                c[k] = x[a == k].mean(0)
    d = dist(x, c)
    return d.argmin(1), c


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_kmeans_matches_lloyd(metric):
    g = _gen(4)
    centers = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = (centers[torch.arange(30) % 3] + 0.3 * torch.randn(30, 2, generator=g)).unsqueeze(0)
    init = torch.tensor([[0, 1, 2]])
    assign, c, dist = ops.kmeans(x, torch.zeros(1, 3, 2), init, torch.tensor([0.0]), 5, metric)
    a_np, c_np = _kmeans_numpy(x[0].numpy().astype(np.float64), x[0, [0, 1, 2]].numpy().astype(np.float64), 5, metric)
    assert assign[0].tolist() == a_np.tolist()
    np.testing.assert_allclose(c[0].numpy(), c_np, atol=1e-5)
    assert (assign[0] == torch.arange(30) % 3).all()
    # warm start from the result changes nothing
    assign2, c2, _ = ops.kmeans(x, c, torch.tensor([[5, 6, 7]]), torch.tensor([1.0]), 3, metric)
    assert torch.equal(assign2, assign)
    torch.testing.assert_close(c2, c)
    assert dist.shape == (1, 30) and (dist >= -1e-4).all()


@pytest.mark.parametrize("D", [4, 400])  # below and above ops.L1_BROADCAST_BYTES at B, T, K = 2, 64, 32
def test_l1_distance_forms_are_the_same_sums(D):
    g = _gen(5)
    x, c = torch.randn(2, 64, D, generator=g), torch.randn(2, 32, D, generator=g)
    want = torch.stack([torch.stack([(x[b, n] - c[b, j]).abs().sum() for j in range(32)]) for b in range(2) for n in range(64)])
    torch.testing.assert_close(ops.pairwise_distance(x, c, "l1").reshape(-1, 32), want, atol=1e-4, rtol=1e-5)
