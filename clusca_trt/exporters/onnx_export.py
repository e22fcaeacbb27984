"""Adapter + ExportSpec -> static-shape ONNX graphs (``torch.onnx.export(dynamo=True)``),
each checked with ``onnx.checker``.

    full.onnx      x, t, y, taylor_coef, caches -> out, hidden_img, refreshed caches
    partial.onnx   x, t, y, forecast_coef, gamma, update, assign_img, fresh_img, caches -> out, mlp_f0
    forecast.onnx  x, t, y, forecast_coef, caches -> out
    cluster_img.onnx, select_img.onnx
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from ..engines.signature import signature_mismatch
from ..errors import ClusCaError, describe, one_line
from ..spec import ExportSpec
from ..steps import example_inputs, graph_module

log = logging.getLogger(__name__)

_NOISY_LOGGERS = ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "torch.fx")


class ExportError(ClusCaError):
    """torch.onnx.export or the ONNX checker failed on a graph."""


@contextlib.contextmanager
def _quiet():
    """torch.onnx.export talks a lot on stdout/stderr and through warnings; keep it in the log."""
    saved = {n: logging.getLogger(n).level for n in _NOISY_LOGGERS}
    buf = io.StringIO()
    try:
        for n in _NOISY_LOGGERS:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        if buf.getvalue().strip():
            log.debug("exporter output:\n%s", buf.getvalue())


def export_graph(adapter, spec: ExportSpec, name: str, path: Path) -> Path:
    """Export one graph of ``spec`` to ``path`` and check it. Large graphs keep their weights
    in a ``<path>.data`` file beside it (ONNX external data)."""
    module = graph_module(adapter, spec, name)
    args = example_inputs(spec, name)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=spec.options.opset,
                input_names=module.input_names,
                output_names=module.output_names,
                verbose=False,
            )
            program.save(str(path))
    except Exception as e:
        raise ExportError(f"exporting the {name} graph failed: {describe(e)}") from e
    check_graph(path, spec, name)
    return path


def check_graph(path: Path, spec: ExportSpec, name: str) -> None:
    """``onnx.checker`` plus the spec's contract: names, static shapes and dtypes of inputs/outputs."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:
        raise ExportError(f"ONNX checker rejected {path.name}: {one_line(e)}") from e
    mismatch = signature_mismatch(path, spec.graphs[name])
    if mismatch is not None:
        raise ExportError(mismatch)


def export_all(adapter, spec: ExportSpec, out_dir: Path) -> dict[str, Path]:
    """Every graph of ``spec`` into ``out_dir`` as ``<name>.onnx``, with progress in the log."""
    paths = {}
    names = list(spec.graphs)
    for i, name in enumerate(names, 1):
        log.info("exporting %s graph (%d/%d)", name, i, len(names))
        paths[name] = export_graph(adapter, spec, name, out_dir / f"{name}.onnx")
    return paths
