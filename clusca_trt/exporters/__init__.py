"""PyTorch / diffusers models -> static ONNX graphs (full, partial, forecast, cluster, select)."""

from .onnx_export import ExportError, check_graph, export_all, export_graph

__all__ = ["ExportError", "check_graph", "export_all", "export_graph"]
