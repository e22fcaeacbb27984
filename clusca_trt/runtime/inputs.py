"""The check of what comes out of a run: the final latents and images (a non-finite model output
already stops the run at its step, ``denoiser.ScheduledDenoiser``), so no NaN image is ever written.
What goes in is checked by the family's input schema (``clusca_trt.fields``) before any work.
"""

from __future__ import annotations

import numpy as np

from ..errors import NonFiniteOutputError


def check_finite_output(name: str, a: np.ndarray | None) -> None:
    """The run's result (final latents, decoded images) has only finite values."""
    if a is not None and not np.isfinite(a).all():
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise NonFiniteOutputError(
            f"{name}: expected finite values, got {bad} NaN/inf of {a.size}; nothing was written "
            f"(a NaN/inf weight, input or a too large guidance scale)"
        )
