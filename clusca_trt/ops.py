"""ClusCa's tensor operations, written once for every model family and every backend.

Pure torch functions over static shapes; each traces into a small, static ONNX subgraph.

* ``taylor_refresh``:  F_0 <- y; F_{i+1} <- (F_i(new) - F_i(old)) * coef_i        (full step)
* ``taylor_forecast``: sum_i F_i * c_i, with c_i = d^i / i!                         (partial step)
  (both per block: each block's factors are their own state tensors, read and written in place)
* ``propagate``:       F_0[n] <- f_c(n) if n is its cluster's fresh token,
                       else gamma * f_c(n) + (1 - gamma) * F_0[n]                   (partial step)
  (``fresh_weights``, ``flat_rows``, ``take_rows``, ``propagate_rows``: its parts, so that a step
  computes what every block shares once)
* ``partial_update``:  the partial step's MLP-branch update under an update rule (``update``
                       [residual, keep, correction]): the paper's ``propagate``, or the correction
                       of the forecast by the fresh tokens' forecast error ``f_j - forecast_j``,
                       written back to F_0 or used for this step only                (partial step)
  (``update_weights``, ``fresh_forecast``, ``fresh_residual``, ``keep_state``: its parts)
* ``kmeans``:          warm-started Lloyd iterations, fixed count, one-hot centroid updates; squared
                       L2 distances by one MatMul per iteration (L1, the reference's, by differences)
* ``select_fresh``:    one token per cluster: the member with the smallest key
* ``pair_index``:      which row's clustering each row takes (the rows of a sample paired, or each its own)
"""

from __future__ import annotations

import torch

_BIG = 3.0e38  # larger than any key or distance; stands for "not a member"
# the L1 distances are one broadcast [B, T, K, D] difference up to this size, else one centroid at a
# time (measured with ONNX Runtime on 2 cores: broadcast 1.5x faster at B/T/K/D 2/256/16/64 = 2 MB,
# the per-centroid loop 1.9x faster at 2/256/16/768 = 25 MB)
L1_BROADCAST_BYTES = 4 << 20


def taylor_refresh(
    y: torch.Tensor, f0_old: torch.Tensor, fhi_old: torch.Tensor | None, coef: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New Taylor factors of one block's module cache after a full step.

    y: [B, T, D] the branch output; f0_old: [B, T, D]; fhi_old: [O, B, T, D] (F_1..F_O) or None;
    coef: [O], ``coef[i] = 1/dt`` when order i+1 has enough history, else 0.
    Returns (F_0 new, F_1..F_O new stacked as [O, B, T, D] or None).
    """
    if fhi_old is None:
        return y, None
    order = fhi_old.shape[0]
    new = [y]
    for i in range(order):
        old_i = f0_old if i == 0 else fhi_old[i - 1]
        new.append((new[i] - old_i) * coef[i])
    return y, torch.stack(new[1:], dim=0)


def taylor_forecast(f0: torch.Tensor | None, fhi: torch.Tensor | None, coef: torch.Tensor) -> torch.Tensor | None:
    """``sum_i F_i * coef[i]`` for one block: f0 [B, T, D] (None: the sum from order 1 on), fhi
    [O, B, T, D] or None (order 0: F_0 itself); ``coef[0] = d^0 / 0! = 1`` is not multiplied. The
    orders are summed by one MatMul ([1, O] x [O, elements]): one pass over F_1..F_O."""
    if fhi is None:
        return f0
    order = fhi.shape[0]
    hi = torch.matmul(coef[1 : order + 1].reshape(1, order), fhi.reshape(order, -1)).reshape(fhi.shape[1:])
    return hi if f0 is None else f0 + hi


def forecast_add(f0: torch.Tensor, hi: torch.Tensor | None) -> torch.Tensor:
    """F_0 plus the forecast's higher orders (``taylor_forecast(None, ...)``)."""
    return f0 if hi is None else f0 + hi


def flat_rows(index: torch.Tensor, rows: int) -> torch.Tensor:
    """index [..., B, R] of rows of ``B`` blocks of ``rows`` rows -> [..., B * R] indices into the
    flattened [B * rows] (what ``take_rows`` reads). Layer-independent parts of a step compute it once."""
    b = index.shape[-2]
    offset = torch.arange(b, device=index.device, dtype=index.dtype).unsqueeze(1) * rows
    return (index + offset).reshape(*index.shape[:-2], -1)


def take_rows(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """x [B, T, D], flat [B * R] (``flat_rows``) -> [B, R, D]: one row gather over the flattened
    [B * T, D] (no index expanded to [B, R, D])."""
    b, t, d = x.shape
    return x.reshape(b * t, d).index_select(0, flat).reshape(b, -1, d)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, D], index [B, R] -> [B, R, D]: ``x[b, index[b, r]]``."""
    return take_rows(x, flat_rows(index, x.shape[1]))


def fresh_weights(fresh_index: torch.Tensor, assign: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the weights of the cluster's fresh value and of the old F_0 in ``propagate``:
    (1, 0) for a fresh token, (gamma, 1 - gamma) for the others. fresh_index [..., B, K] (any
    leading dims: every block of a step at once), assign [B, T] -> two [..., B, T, 1].
    A token is fresh when it is the chosen token of its own cluster, so an empty cluster (whose
    row is computed but belongs to no token) never writes anywhere."""
    lead = fresh_index.shape[:-2]
    chosen = torch.gather(fresh_index, -1, assign.expand(*lead, *assign.shape))  # the fresh token of the token's cluster
    positions = torch.arange(assign.shape[1], device=assign.device, dtype=assign.dtype)
    is_fresh = (chosen == positions).unsqueeze(-1)
    w_fresh = torch.where(is_fresh, torch.ones_like(gamma), gamma)
    w_old = torch.where(is_fresh, torch.zeros_like(gamma), 1.0 - gamma)
    return w_fresh, w_old


# the update rule's fields, in the order of the last axis of the partial graph's ``update`` input
UPDATE_FIELDS = ("residual", "keep", "correction")


def update_field(update: torch.Tensor, name: str) -> torch.Tensor:
    """One field of an update rule ``update`` [..., 3] (one rule per block along the leading axes),
    shaped [..., 1, 1, 1] to scale a block's [B, T, D] (or [B, T, 1]) tensors."""
    i = UPDATE_FIELDS.index(name)
    return update[..., i : i + 1].unsqueeze(-1).unsqueeze(-1)


def update_weights(
    w_fresh: torch.Tensor, w_old: torch.Tensor, update: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fresh_weights`` (``[..., B, T, 1]``) under the update rules ``update`` [..., 3] = (residual r,
    keep, correction s), one per block along the same leading axes: ``(w_fresh * s, w_old + r *
    w_fresh)``. The paper's rule (r 0, s 1) leaves both as they are (``x * 1`` and ``x + 0 * y`` are
    ``x`` exactly); a residual rule (r 1) keeps the old value whole (``w_old`` 1: ``1 - gamma +
    gamma``, or 0 + 1 for a fresh token) and adds ``s * w`` of the correction. ``keep`` is read by
    ``keep_state``."""
    return w_fresh * update_field(update, "correction"), w_old + update_field(update, "residual") * w_fresh


def fresh_forecast(f0: torch.Tensor, hi: torch.Tensor | None, flat: torch.Tensor) -> torch.Tensor:
    """The forecast ``F_0 + sum_{i>=1} F_i d^i / i!`` at the fresh rows only (``flat``:
    ``flat_rows`` of the fresh indices): [B, K, D], two row gathers, no pass over all tokens."""
    rows = take_rows(f0, flat)
    return rows if hi is None else rows + take_rows(hi, flat)


def fresh_residual(values: torch.Tensor, forecast: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """What a fresh row spreads over its cluster: ``f_j - r * forecast_j`` ([B, K, D]; ``update``
    [3], the block's rule); the paper's rule (r 0) spreads ``f_j`` itself (``f - 0 * x`` is ``f``
    exactly)."""
    return values - update_field(update, "residual") * forecast


def keep_state(new: torch.Tensor, old: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The F_0 a partial step writes back (``update`` [3], the block's rule): ``new`` where the rule
    keeps its correction (keep > 0.5), else ``old`` (the correction served this step's output only)."""
    return torch.where(update_field(update, "keep") > 0.5, new, old)


def partial_update(
    f0: torch.Tensor,
    hi: torch.Tensor | None,
    fresh_values: torch.Tensor,
    fresh_index: torch.Tensor,
    assign: torch.Tensor,
    gamma: torch.Tensor,
    update: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's MLP-branch update in a partial step, whole (a step context computes the same
    from the parts, the shared ones once): returns (the branch output [B, T, D], the F_0 to write).

    f0 [B, T, D]; hi [B, T, D] the forecast's higher orders (``taylor_forecast(None, ...)``) or None;
    fresh_values [B, K, D] the branch at ``fresh_index`` [B, K]; assign [B, T]; gamma [1];
    update [3] = (residual r, keep, correction s). With w = 1 for a fresh token and gamma for the
    other members of its cluster c:

    * paper (r 0, keep 1, s 1): ``F_0[n] <- w f_c + (1 - w) F_0[n]``, output ``F_0 + hi``;
    * residual (r 1): ``F_0[n] <- F_0[n] + s w (f_c - forecast_c)``, output ``F_0 + hi``: a fresh
      token's output is ``f_j`` (s 1); keep 1 writes the corrected F_0, keep 0 the old one.
    """
    flat = flat_rows(fresh_index, f0.shape[1])
    w_fresh, w_old = update_weights(*fresh_weights(fresh_index, assign, gamma), update)
    spread = fresh_residual(fresh_values, fresh_forecast(f0, hi, flat), update)
    new = propagate_rows(f0, take_rows(spread, flat_rows(assign, fresh_index.shape[-1])), w_fresh, w_old)
    return forecast_add(new, hi), keep_state(new, f0, update)


def propagate_rows(f0: torch.Tensor, per_token: torch.Tensor, w_fresh: torch.Tensor, w_old: torch.Tensor) -> torch.Tensor:
    """``f * w_f + F_0 * w_0`` (``fresh_weights``): the same values as a select between ``f`` and
    the blend (``f * 1 + F_0 * 0`` is ``f`` exactly), one pass over [B, T, D] fewer."""
    return per_token * w_fresh + f0 * w_old


def propagate(
    f0: torch.Tensor,
    fresh_values: torch.Tensor,
    fresh_index: torch.Tensor,
    assign: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """Scatter one block's fresh rows into F_0 and propagate them within their clusters:
    F_0[n] <- f_c(n) if n is its cluster's fresh token, else gamma * f_c(n) + (1 - gamma) * F_0[n].

    f0 [B, T, D]; fresh_values [B, K, D] (row c computed at token fresh_index[:, c]);
    fresh_index [B, K]; assign [B, T] cluster of every token; gamma [1]. (A step computes the
    layer-independent parts once: ``fresh_weights`` for all blocks, ``flat_rows(assign, K)``.)
    """
    w_fresh, w_old = fresh_weights(fresh_index, assign, gamma)
    return propagate_rows(f0, gather_rows(fresh_values, assign), w_fresh, w_old)


def pairwise_distance(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """x [B, T, D], centroids [B, K, D] -> [B, T, K]. Squared ``l2`` (the default: ``|x|^2 + l2_scores``,
    one MatMul) or ``l1`` (the reference code's: one |difference| sum per centroid, no matrix-product form)."""
    if metric == "l1":
        b, t, d = x.shape
        k = centroids.shape[1]
        if b * t * k * d * 4 <= L1_BROADCAST_BYTES:
            # small: one [B, T, K, D] difference, three ops (on ONNX Runtime every op costs a dispatch;
            # for a small model the dispatches are most of the time)
            return (x.unsqueeze(2) - centroids.unsqueeze(1)).abs().sum(-1)
        # large: one centroid at a time, [B, T, D] intermediates that stay in cache instead of one
        # [B, T, K, D] (K times less traffic per pass), the same sums
        per_centroid = [(x - centroids[:, j : j + 1]).abs().sum(-1) for j in range(k)]
        return torch.stack(per_centroid, dim=-1)
    if metric == "l2":
        return (x * x).sum(-1, keepdim=True) + l2_scores(x, centroids)
    raise ValueError(f"distance must be 'l1' or 'l2', got {metric!r}")


def l2_scores(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``|c|^2 - 2 x.c`` [B, T, K]: the squared L2 distance less ``|x|^2``, which is the same for
    every centroid of a token, so its argmin over K is the nearest centroid's. One MatMul."""
    c2 = (centroids * centroids).sum(-1).unsqueeze(1)
    return c2 - 2.0 * torch.matmul(x, centroids.transpose(1, 2))


def kmeans(
    x: torch.Tensor,
    centroids: torch.Tensor,
    init_index: torch.Tensor,
    warm: torch.Tensor,
    iterations: int,
    metric: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means per batch element with a fixed iteration count.

    x [B, T, D]; centroids [B, K, D] from the previous full step; init_index [B, K] distinct
    token indices for a cold start; warm [1] = 1 to start from ``centroids``, 0 from ``x[init_index]``.
    Returns (assign [B, T] int64, centroids [B, K, D], distance of each token to its centroid [B, T]).
    An empty cluster keeps its previous centroid.
    """
    k = centroids.shape[1]
    c = centroids * warm + gather_rows(x, init_index) * (1.0 - warm)
    # L2: the iterations need only the argmin, so ``|x|^2`` (the same for every centroid) is left out
    nearest = (lambda c: l2_scores(x, c)) if metric == "l2" else (lambda c: pairwise_distance(x, c, metric))
    for _ in range(iterations):
        assign = nearest(c).argmin(-1)
        onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype)  # [B, T, K]
        sums = torch.matmul(onehot.transpose(1, 2), x)  # [B, K, D]
        counts = onehot.sum(1).unsqueeze(-1)  # [B, K, 1]
        c = torch.where(counts > 0, sums / counts.clamp(min=1.0), c)
    dist = pairwise_distance(x, c, metric)
    assign = dist.argmin(-1)
    own = torch.gather(dist, 2, assign.unsqueeze(-1)).squeeze(-1)
    return assign, c, own


def pair_index(pair: torch.Tensor, rows: int, samples: int) -> torch.Tensor:
    """[rows] int64: the row whose clustering each graph row takes. Row ``r`` belongs to sample
    ``r % samples`` (with classifier-free guidance: its cond and uncond rows); with ``pair`` [1]
    > 0.5 every row takes its sample's first row (``r % samples``), else its own (``r``)."""
    own = torch.arange(rows, dtype=torch.int64)
    return torch.where(pair > 0.5, own % samples, own)


def select_fresh(assign: torch.Tensor, key: torch.Tensor, clusters: int) -> torch.Tensor:
    """One token per cluster: the member with the smallest key.

    assign [B, T]; key [L, B, T] (uniform noise: a uniformly random member, anew per block;
    distance to the centroid: the nearest member). Returns [L, B, K] int64.
    An empty cluster gets index 0; ``propagate`` never lets it write.
    """
    member = torch.nn.functional.one_hot(assign, clusters).bool().unsqueeze(0)  # [1, B, T, K]
    masked = torch.where(member, key.unsqueeze(-1), torch.full_like(key.unsqueeze(-1), _BIG))
    return masked.argmin(2)


# The operations a step context calls, by the name scope their exported nodes carry
# (``clusca.<name>``: what profiles and FLOPs counts attribute by). ``fresh_rows`` + ``gather_rows``
# pick a block's fresh rows; ``fresh_weights``, ``update_weights``, ``fresh_forecast``,
# ``fresh_residual``, ``spread_index``, ``spread``, ``propagate`` and ``keep_state`` are the
# propagation (``ops.partial_update`` in parts, the shared ones computed once per step).
NAMED_FUNCTIONS = {
    "taylor_refresh": taylor_refresh,
    "taylor_forecast": taylor_forecast,
    "forecast_add": forecast_add,
    "fresh_rows": flat_rows,
    "gather_rows": take_rows,
    "fresh_weights": fresh_weights,
    "spread_index": flat_rows,
    "spread": take_rows,
    "propagate": propagate_rows,
    "update_weights": update_weights,
    "fresh_forecast": fresh_forecast,
    "fresh_residual": fresh_residual,
    "keep_state": keep_state,
}


class _Named:
    def __init__(self, functions: dict):
        self.__dict__.update(functions)


NAMED = _Named(NAMED_FUNCTIONS)
