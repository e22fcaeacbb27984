"""Step contexts: how one adapter forward becomes a full, partial or forecast step.

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
rows and propagates; with no clusters it is the pure forecast step.
"""

from __future__ import annotations

import torch

from . import ops
from .spec import STATE_SUFFIX, CacheSlot


class StepContext:
    # the ClusCa operations (taylor_refresh_layers, taylor_forecast_layers, forecast_add, gather_rows,
    # propagate): the ``ops`` functions, or ``steps.ClusCaOps`` whose named submodules label every
    # exported node with the operation it belongs to
    fns = ops

    def __init__(self, slots: tuple[CacheSlot, ...]):
        self.slots = {s.name: s for s in slots}
        self._new: dict[str, list[torch.Tensor | None]] = {}
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

    def _record(self, key: str, layer: int, value: torch.Tensor) -> None:
        layers = self.slots[key.rsplit("_", 1)[0]].layers
        buf = self._new.setdefault(key, [None] * layers)
        buf[layer] = value

    def _stacked(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, per_layer in self._new.items():
            missing = [i for i, v in enumerate(per_layer) if v is None]
            if missing:
                raise RuntimeError(f"cache {key} was not written for layers {missing}")
            out[key] = torch.stack(per_layer, dim=0)
        return out

    def new_state(self) -> dict[str, torch.Tensor]:
        """The cache tensors this step wrote, stacked over layers, by output name."""
        return {key + STATE_SUFFIX: value for key, value in self._stacked().items()}


def _layer(t: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    return None if t is None else t[layer]


class PlainContext(StepContext):
    """All tokens, no caches, nothing clustered: the original model (method full)."""

    def branch(self, slot, layer, fn):
        return fn()

    def fresh_branch(self, slot, layer, h, row_fn):
        return row_fn(h)


class FullContext(StepContext):
    """All tokens; ``F_0 <- y``, ``F_{i+1} <- (F_i(new) - F_i(old)) * taylor_coef[i]``.

    The branch outputs are collected per layer and the factors refreshed once for all layers of
    a cache (``ops.taylor_refresh_layers``) when the step's state is taken.
    """

    def __init__(self, slots, caches: dict[str, torch.Tensor], taylor_coef: torch.Tensor | None):
        super().__init__(slots)
        self.caches = caches
        self.taylor_coef = taylor_coef

    def branch(self, slot, layer, fn):
        y = fn()
        self._record(f"{slot}_f0", layer, y)
        return y

    def new_state(self):
        out = {}
        for key, y in self._stacked().items():
            slot = key[: -len("_f0")]
            f0, fhi = self.fns.taylor_refresh_layers(
                y, self.caches.get(f"{slot}_f0"), self.caches.get(f"{slot}_fhi"), self.taylor_coef
            )
            out[f"{slot}_f0{STATE_SUFFIX}"] = f0
            if fhi is not None:
                out[f"{slot}_fhi{STATE_SUFFIX}"] = fhi
        return out

    def fresh_branch(self, slot, layer, h, row_fn):
        return self.branch(slot, layer, lambda: row_fn(h))

    def hidden(self, group, h):
        self.hidden_states[group] = h


class PartialContext(StepContext):
    """No attention: forecast ``sum_i F_i d^i / i!``; fresh rows refresh F_0 with propagation.

    With ``fresh`` empty (K = 0) this is the TaylorSeer / FORA forecast step. ``gamma`` is one
    ratio [1] for every token group, or a ratio per group (``{"img": [1], "txt": [1]}``).
    A forecast-only cache is forecast for all its layers at once, and a fresh cache's higher
    orders likewise (``ops.taylor_forecast_layers``), the first time a layer asks.
    """

    def __init__(
        self,
        slots,
        caches: dict[str, torch.Tensor],
        forecast_coef: torch.Tensor,
        gamma: torch.Tensor | dict[str, torch.Tensor] | None = None,
        assign: dict[str, torch.Tensor] | None = None,
        fresh: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__(slots)
        self.caches = caches
        self.coef = forecast_coef
        self.gamma = gamma
        self.assign = assign or {}
        self.fresh = fresh or {}
        self._forecasts: dict[tuple[str, bool], torch.Tensor | None] = {}

    def _forecast(self, slot: str, with_f0: bool) -> torch.Tensor | None:
        """sum_i F_i c_i over every layer of ``slot`` (from order 1 on without ``with_f0``)."""
        key = (slot, with_f0)
        if key not in self._forecasts:
            f0 = self.caches[f"{slot}_f0"] if with_f0 else None
            self._forecasts[key] = self.fns.taylor_forecast_layers(f0, self.caches.get(f"{slot}_fhi"), self.coef)
        return self._forecasts[key]

    def branch(self, slot, layer, fn):
        return self._forecast(slot, with_f0=True)[layer]

    def fresh_branch(self, slot, layer, h, row_fn):
        group = self.slots[slot].fresh_group
        if group not in self.fresh:
            return self.branch(slot, layer, None)
        index = self.fresh[group][layer]  # [B, K]
        values = row_fn(self.fns.gather_rows(h, index))  # the MLP on exactly K rows per batch element
        gamma = self.gamma[group] if isinstance(self.gamma, dict) else self.gamma
        f0 = self.fns.propagate(self.caches[f"{slot}_f0"][layer], values, index, self.assign[group], gamma)
        self._record(f"{slot}_f0", layer, f0)
        return self.fns.forecast_add(f0, _layer(self._forecast(slot, with_f0=False), layer))
