"""Step contexts: how one adapter forward becomes a plain, full, partial or forecast step.

A model adapter writes its forward once, calling

* ``ctx.branch(slot, layer, fn)`` for a branch that is only forecast in a partial step
  (attention; FLUX single-stream output): ``fn()`` returns the branch output before gating;
* ``ctx.branches(slots, layer, fn)`` for several such branches computed by one call (FLUX's
  joint attention gives the image and the text stream's outputs at once): ``fn()`` returns
  one output per slot, and is called once in a full step and never in a partial step;
* ``ctx.fresh_branch(slot, layer, h, row_fn)`` for a branch computed on fresh rows in a
  partial step (the MLP): ``row_fn(rows)`` maps residual-stream rows ``[B, R, D]`` to the
  branch output for those rows;
* ``ctx.hidden(group, h)`` for the hidden states that are clustered after a full step.

``PlainContext`` computes every branch and keeps nothing (the model alone); ``FullContext``
computes every branch and refreshes the Taylor factors; ``PartialContext`` forecasts, runs fresh
rows and propagates; with no clusters it is the pure forecast step. Every block's cache factors
are their own state tensors (``spec.cache_name``): a step reads and writes each in place.
"""

from __future__ import annotations

import torch

from . import ops
from .spec import STATE_SUFFIX, CacheSlot, cache_name


class StepContext:
    # the ClusCa operations (taylor_refresh, taylor_forecast, forecast_add, fresh_rows, gather_rows,
    # fresh_weights, spread, propagate): the ``ops`` functions, or ``steps.ClusCaOps`` whose named
    # submodules label every exported node with the operation it belongs to
    fns = ops.NAMED

    def __init__(self, slots: tuple[CacheSlot, ...], caches: dict[str, torch.Tensor] | None = None):
        self.slots = {s.name: s for s in slots}
        self.caches = caches or {}
        self._new: dict[str, torch.Tensor] = {}
        self.hidden_states: dict[str, torch.Tensor] = {}

    def branch(self, slot: str, layer: int, fn) -> torch.Tensor:
        raise NotImplementedError

    def fresh_branch(self, slot: str, layer: int, h: torch.Tensor, row_fn) -> torch.Tensor:
        raise NotImplementedError

    def branches(self, slots: tuple[str, ...], layer: int, fn) -> tuple[torch.Tensor, ...]:
        """``branch`` for several slots whose outputs come from one computation ``fn()``."""
        computed: list[tuple[torch.Tensor, ...]] = []

        def output(i: int) -> torch.Tensor:
            if not computed:
                ys = tuple(fn())
                if len(ys) != len(slots):
                    raise ValueError(f"expected {len(slots)} branch outputs for {slots}, got {len(ys)}")
                computed.append(ys)
            return computed[0][i]

        return tuple(self.branch(s, layer, lambda i=i: output(i)) for i, s in enumerate(slots))

    def hidden(self, group: str, h: torch.Tensor) -> None:
        """Hidden states of a token group to cluster (recorded by the full step only)."""

    def cache(self, slot: str, factor: str, layer: int) -> torch.Tensor | None:
        return self.caches.get(cache_name(slot, factor, layer))

    def write(self, slot: str, factor: str, layer: int, value: torch.Tensor) -> None:
        self._new[cache_name(slot, factor, layer) + STATE_SUFFIX] = value

    def new_state(self) -> dict[str, torch.Tensor]:
        """The cache tensors this step wrote, by output name."""
        for name in self._expected():
            if name not in self._new:
                raise RuntimeError(f"cache {name} was not written")
        return dict(self._new)

    def _expected(self) -> list[str]:
        return []


class PlainContext(StepContext):
    """All tokens, no caches, nothing clustered: the original model (method full)."""

    def branch(self, slot, layer, fn):
        return fn()

    def fresh_branch(self, slot, layer, h, row_fn):
        return row_fn(h)


class FullContext(StepContext):
    """All tokens; per block ``F_0 <- y``, ``F_{i+1} <- (F_i(new) - F_i(old)) * taylor_coef[i]``."""

    def __init__(self, slots, caches: dict[str, torch.Tensor], taylor_coef: torch.Tensor | None):
        super().__init__(slots, caches)
        self.taylor_coef = taylor_coef

    def branch(self, slot, layer, fn):
        y = fn()
        f0, fhi = self.fns.taylor_refresh(y, self.cache(slot, "f0", layer), self.cache(slot, "fhi", layer),
                                          self.taylor_coef)
        self.write(slot, "f0", layer, f0)
        if fhi is not None:
            self.write(slot, "fhi", layer, fhi)
        return y

    def fresh_branch(self, slot, layer, h, row_fn):
        return self.branch(slot, layer, lambda: row_fn(h))

    def hidden(self, group, h):
        self.hidden_states[group] = h

    def _expected(self):
        return [cache_name(s.name, "f0", i) + STATE_SUFFIX for s in self.slots.values() for i in range(s.layers)]


class PartialContext(StepContext):
    """No attention: forecast ``sum_i F_i d^i / i!``; fresh rows update F_0 with propagation.

    With ``fresh`` empty (K = 0) this is the TaylorSeer / FORA forecast step. ``gamma`` is one
    ratio [1] for every token group, or a ratio per group (``{"img": [1], "txt": [1]}``).
    ``update`` [L, 3] is the update rule of every block (``ops.partial_update``: residual, keep,
    correction); None: the paper's (propagate the fresh values into F_0 and keep them). What every
    block of a token group shares (the flat indices of the cluster members, the per-token weights
    of every block) is computed once, at the group's first block.
    """

    def __init__(
        self,
        slots,
        caches: dict[str, torch.Tensor],
        forecast_coef: torch.Tensor,
        gamma: torch.Tensor | dict[str, torch.Tensor] | None = None,
        assign: dict[str, torch.Tensor] | None = None,
        fresh: dict[str, torch.Tensor] | None = None,
        update: torch.Tensor | None = None,
    ):
        super().__init__(slots, caches)
        self.coef = forecast_coef
        self.gamma = gamma
        self.update = update
        self.assign = assign or {}
        self.fresh = fresh or {}
        self._shared: dict[str, tuple[torch.Tensor, ...]] = {}

    def branch(self, slot, layer, fn):
        return self.fns.taylor_forecast(self.cache(slot, "f0", layer), self.cache(slot, "fhi", layer), self.coef)

    def _group(self, group: str, tokens: int) -> tuple[torch.Tensor, ...]:
        """(flat indices of every block's fresh rows [L, B * K], of every token's cluster [B * T],
        the fresh / old weights of every block [L, B, T, 1])."""
        if group not in self._shared:
            fresh, assign = self.fresh[group], self.assign[group]
            gamma = self.gamma[group] if isinstance(self.gamma, dict) else self.gamma
            w_fresh, w_old = self.fns.fresh_weights(fresh, assign, gamma)
            if self.update is not None:  # the rule of each of the group's blocks
                w_fresh, w_old = self.fns.update_weights(w_fresh, w_old, self.update[: fresh.shape[0]])
            self._shared[group] = (self.fns.fresh_rows(fresh, tokens), self.fns.spread_index(assign, fresh.shape[-1]),
                                   w_fresh, w_old)
        return self._shared[group]

    def fresh_branch(self, slot, layer, h, row_fn):
        group = self.slots[slot].fresh_group
        if group not in self.fresh:
            return self.branch(slot, layer, None)
        rows, members, w_fresh, w_old = self._group(group, h.shape[1])
        old = self.cache(slot, "f0", layer)
        hi = self.fns.taylor_forecast(None, self.cache(slot, "fhi", layer), self.coef)
        values = row_fn(self.fns.gather_rows(h, rows[layer]))  # the MLP on exactly K rows per batch element
        rule = None if self.update is None else self.update[layer]
        if rule is not None:  # what a fresh row spreads: f_j, or its forecast's error f_j - forecast_j
            values = self.fns.fresh_residual(values, self.fns.fresh_forecast(old, hi, rows[layer]), rule)
        per_token = self.fns.spread(values, members)  # each token's cluster's fresh value
        f0 = self.fns.propagate(old, per_token, w_fresh[layer], w_old[layer])
        self.write(slot, "f0", layer, f0 if rule is None else self.fns.keep_state(f0, old, rule))
        return self.fns.forecast_add(f0, hi)

    def _expected(self):
        return [cache_name(s.name, "f0", i) + STATE_SUFFIX for s in self.slots.values()
                if s.fresh_group in self.fresh for i in range(s.layers)]
