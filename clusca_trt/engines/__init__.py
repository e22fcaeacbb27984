"""Built engine directories -> runnable engines: one ``StepEngine`` contract (``base``) and one file
per backend (``ort``: ONNX Runtime sessions; ``torch_backend``: the PyTorch modules; ``tensorrt``:
TensorRT plans, with ``trt_plan``: what a plan is valid for), the device the torch and TensorRT
engines share (``cuda``; ``cuda_graph`` decides capture and replay), the engine directory's manifest
and its content-keyed build cache (``manifest``), and ``open.open_engine``."""
