"""PyTorch / diffusers models -> static ONNX graphs (full, partial, forecast, cluster, select) in an
engine directory (``build``); for TensorRT, those graphs -> fp16 / bf16 graphs (``precision``) ->
plans beside them (``trt_build``)."""

from .onnx_export import ExportError, check_graph, export_all, export_graph

__all__ = ["ExportError", "check_graph", "export_all", "export_graph"]
