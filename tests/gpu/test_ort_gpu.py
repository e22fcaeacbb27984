"""GPU checks: ONNX Runtime's CUDA provider against the CPU provider on the same engines.

Skipped, with the reason, where the CUDA provider does not load (no GPU, no CUDA libraries).
"""

import numpy as np
import pytest

from clusca_trt.engines.ort import probe_providers
from clusca_trt.runtime.pipeline import Pipeline

pytestmark = pytest.mark.skipif(
    "cuda" not in probe_providers(),
    reason="ONNX Runtime's CUDAExecutionProvider does not load here (needs an NVIDIA GPU with CUDA 13 and cuDNN 9)",
)


@pytest.mark.parametrize("method", ["full", "clusca", "taylorseer"])
def test_cuda_provider_equals_cpu(engines_k4, method):
    cpu = Pipeline.load(engines_k4.directory, provider="cpu").generate([1, 2], seed=0, method=method, steps=20)
    gpu = Pipeline.load(engines_k4.directory, provider="cuda").generate([1, 2], seed=0, method=method, steps=20)
    assert gpu.provider == "cuda"
    assert np.abs(gpu.latents - cpu.latents).max() / np.abs(cpu.latents).max() < 1e-3
