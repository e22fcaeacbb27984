"""ONNX graphs -> runnable engines (ONNX Runtime sessions, the torch reference; TensorRT plans
in a later module), the engine directory's manifest and its content-keyed build cache."""
