"""The GPU tests compare GPU results with CPU ones at 1e-3 or tighter: TF32 off everywhere.

``NVIDIA_TF32_OVERRIDE=0`` makes cuBLAS, cuDNN and TensorRT compute fp32 as fp32 whatever a
library asks for (ONNX Runtime's CUDA and TensorRT providers included); it is read when those
libraries start, so it is set here, before any test touches CUDA. torch's own switches too.
"""

import os

os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
