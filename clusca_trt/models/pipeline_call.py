"""A diffusers pipeline's call of a family's transformer, read as our step graphs take it: the
model layer's half of ``clusca_trt.diffusers`` (``enable(pipe)``).

Each family's model module has a ``PIPELINE = PipelineBinding(...)``:

* ``transformer_class``: the diffusers transformer class its pipelines run (``DiTTransformer2DModel``, ...);
* ``adapter_class``: its adapter (default ClusCa settings, classifier-free guidance multiplier);
* ``call(transformer, args, pipe) -> TransformerCall | str``: one forward call, its arguments by
  name (defaults filled), as our model and conditioning inputs; or one line saying what in it our
  graphs do not model (ControlNet residuals, attention kwargs, another position layout, ...);
* ``adapter(transformer, shape, pipe)``: its adapter over that transformer's own weights, for the
  static shape ``shape`` (``TransformerCall.shape``; FLUX and HunyuanVideo share the modules, DiT
  converts the state dict, sharing every tensor it does not concatenate);
* ``timesteps(timesteps, like)``: the timestep input the family's pipelines feed the transformer at
  each of the scheduler's timesteps, in the dtype of ``like`` (one call's timestep), so that the
  conditioning of every step can be computed ahead (and checked when each step arrives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TransformerCall:
    """One forward call of a diffusers transformer, in our names.

    rows:     the rows of the call (its batch).
    shape:    the family's build options that fix the graphs' static shapes (FLUX: height, width,
              text_length; HunyuanVideo: also frames; DiT: none): where a build is chosen by.
    model:    our model inputs ``[rows, ...]`` (the latents), torch tensors as the pipeline gave them.
    cond:     our conditioning inputs ``[rows, ...]`` (timestep, labels, text embeddings, guidance).
    timestep: which of ``cond`` is the timestep.
    guided:   the rows are the two halves ``[conditional | unconditional]`` of classifier-free
              guidance in one batch (DiT): row ``j`` and row ``rows / 2 + j`` are one sample's.
    like:     a tensor with the output's device and dtype (the latents).
    """

    rows: int
    shape: dict
    model: dict[str, torch.Tensor]
    cond: dict[str, torch.Tensor]
    timestep: str
    like: torch.Tensor
    guided: bool = False

    def key(self) -> tuple:
        """What must stay the same from one step of a pipeline call to the next."""
        return (self.rows, self.guided, tuple(sorted(self.shape.items())),
                tuple((n, tuple(t.shape)) for n, t in self.model.items()))


@dataclass(frozen=True)
class PipelineBinding:
    """How a family's diffusers transformer is called by its pipelines (see the module docstring)."""

    transformer_class: str
    adapter_class: type
    call: Callable[..., "TransformerCall | str"]
    adapter: Callable[..., object]
    timesteps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timestep_vector(t, rows: int) -> torch.Tensor | None:
    """A call's timestep (a number, a 0-d tensor, or a tensor of 1 or ``rows`` values) as ``[rows]``,
    its dtype kept; None where it is none of those."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.tensor([t])
    t = t.reshape(-1)
    if t.numel() == 1:
        return t.expand(rows)
    return t if t.numel() == rows else None


def unmodelled(args: dict, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that the call sets (not None, not an empty dict or list), as a reason."""
    for name in names:
        value = args.get(name)
        if value is None or (isinstance(value, (dict, list, tuple)) and not value):
            continue
        return f"the transformer's argument {name} is set, which ClusCa's graphs do not model"
    return None
