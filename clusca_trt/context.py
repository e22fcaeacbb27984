"""Step contexts: how one adapter forward becomes a full, partial or forecast step.

A model adapter writes its forward once, calling

* ``ctx.branch(slot, layer, fn)`` for a branch that is only forecast in a partial step
  (attention; FLUX single-stream output): ``fn()`` returns the branch output before gating;
* ``ctx.fresh_branch(slot, layer, h, row_fn)`` for a branch computed on fresh rows in a
  partial step (the MLP): ``row_fn(rows)`` maps residual-stream rows ``[B, R, D]`` to the
  branch output for those rows;
* ``ctx.hidden(group, h)`` for the hidden states that are clustered after a full step.

``FullContext`` computes every branch and refreshes the Taylor factors; ``PartialContext``
forecasts, runs fresh rows and propagates; with no clusters it is the pure forecast step.
"""

from __future__ import annotations

import torch

from . import ops
from .spec import STATE_SUFFIX, CacheSlot


class StepContext:
    def __init__(self, slots: tuple[CacheSlot, ...]):
        self.slots = {s.name: s for s in slots}
        self._new: dict[str, list[torch.Tensor | None]] = {}
        self.hidden_states: dict[str, torch.Tensor] = {}

    def branch(self, slot: str, layer: int, fn) -> torch.Tensor:
        raise NotImplementedError

    def fresh_branch(self, slot: str, layer: int, h: torch.Tensor, row_fn) -> torch.Tensor:
        raise NotImplementedError

    def hidden(self, group: str, h: torch.Tensor) -> None:
        """Hidden states of a token group to cluster (recorded by the full step only)."""

    def _record(self, key: str, layer: int, value: torch.Tensor) -> None:
        layers = self.slots[key.rsplit("_", 1)[0]].layers
        buf = self._new.setdefault(key, [None] * layers)
        buf[layer] = value

    def new_state(self) -> dict[str, torch.Tensor]:
        """The cache tensors this step wrote, stacked over layers, by output name."""
        out = {}
        for key, per_layer in self._new.items():
            missing = [i for i, v in enumerate(per_layer) if v is None]
            if missing:
                raise RuntimeError(f"cache {key} was not written for layers {missing}")
            out[key + STATE_SUFFIX] = torch.stack(per_layer, dim=0)
        return out


def _layer(t: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    return None if t is None else t[layer]


class FullContext(StepContext):
    """All tokens; ``F_0 <- y``, ``F_{i+1} <- (F_i(new) - F_i(old)) * taylor_coef[i]``."""

    def __init__(self, slots, caches: dict[str, torch.Tensor], taylor_coef: torch.Tensor | None):
        super().__init__(slots)
        self.caches = caches
        self.taylor_coef = taylor_coef

    def branch(self, slot, layer, fn):
        y = fn()
        f0_old = _layer(self.caches.get(f"{slot}_f0"), layer)
        fhi_old = _layer(self.caches.get(f"{slot}_fhi"), layer)
        f0, fhi = ops.taylor_refresh(y, f0_old, fhi_old, self.taylor_coef)
        self._record(f"{slot}_f0", layer, f0)
        if fhi is not None:
            self._record(f"{slot}_fhi", layer, fhi)
        return y

    def fresh_branch(self, slot, layer, h, row_fn):
        return self.branch(slot, layer, lambda: row_fn(h))

    def hidden(self, group, h):
        self.hidden_states[group] = h


class PartialContext(StepContext):
    """No attention: forecast ``sum_i F_i d^i / i!``; fresh rows refresh F_0 with propagation.

    With ``fresh`` empty (K = 0) this is the TaylorSeer / FORA forecast step.
    """

    def __init__(
        self,
        slots,
        caches: dict[str, torch.Tensor],
        forecast_coef: torch.Tensor,
        gamma: torch.Tensor | None = None,
        assign: dict[str, torch.Tensor] | None = None,
        fresh: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__(slots)
        self.caches = caches
        self.coef = forecast_coef
        self.gamma = gamma
        self.assign = assign or {}
        self.fresh = fresh or {}

    def branch(self, slot, layer, fn):
        return ops.taylor_forecast(
            self.caches[f"{slot}_f0"][layer], _layer(self.caches.get(f"{slot}_fhi"), layer), self.coef
        )

    def fresh_branch(self, slot, layer, h, row_fn):
        group = self.slots[slot].fresh_group
        if group not in self.fresh:
            return self.branch(slot, layer, None)
        index = self.fresh[group][layer]  # [B, K]
        values = row_fn(ops.gather_rows(h, index))  # the MLP on exactly K rows per batch element
        f0 = ops.propagate(self.caches[f"{slot}_f0"][layer], values, index, self.assign[group], self.gamma)
        self._record(f"{slot}_f0", layer, f0)
        return ops.taylor_forecast(f0, _layer(self.caches.get(f"{slot}_fhi"), layer), self.coef)
