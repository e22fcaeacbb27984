"""What the engines cost: the analytic ONNX FLOPs counter (``flops``) and the latency benchmark (``bench``)."""
