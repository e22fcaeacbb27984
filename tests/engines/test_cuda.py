"""The device the torch and TensorRT engines share, on the CPU (its CUDA side runs in tests/gpu):
buffers, staged uploads, downloads counted as host synchronisations, no graphs without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusca_trt.engines.cuda import StagedBuffer, TorchDevice, parse_device
from clusca_trt.errors import ConfigError, EngineError


@pytest.fixture
def cpu():
    return TorchDevice(parse_device("cpu"))


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                                ("int64", torch.int64), (torch.float16, torch.float16)])
def test_alloc_gives_zeroed_buffers_of_the_type_asked_for(cpu, dtype, torch_dtype):
    buf = cpu.alloc((2, 3), dtype)
    assert buf.dtype == torch_dtype and buf.shape == (2, 3) and not buf.any()
    staged = cpu.alloc((2, 3), dtype, staged=True)
    assert isinstance(staged, StagedBuffer) and staged.host is None  # no pinned twin on the CPU
    assert cpu.address(staged) == staged.device.data_ptr() != cpu.address(buf)


def test_upload_and_download_round_trip_and_only_downloads_count(cpu):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 5), dtype=np.float32)
    staged = cpu.alloc(a.shape, "bfloat16", staged=True)
    cpu.upload(staged, a)
    assert cpu.host_syncs == 0
    back = cpu.download(staged)
    assert back.dtype == np.float32 and cpu.host_syncs == 1  # bf16 comes back as fp32
    np.testing.assert_allclose(back, a, rtol=1e-2, atol=0)  # bf16 keeps 8 bits of mantissa
    cpu.zero(staged)
    assert not cpu.download(staged).any() and cpu.host_syncs == 2
    x = cpu.to_device(a)
    a[...] = 0  # the device copy is not a view of the host array
    assert x.abs().sum() > 0 and cpu.host_syncs == 2


def test_no_stream_and_no_graphs_on_the_cpu(cpu):
    assert cpu.stream is None and not cpu.on_cuda and cpu.hardware()
    with cpu.activate():
        pass
    with pytest.raises(EngineError, match="CUDA graphs need a CUDA device, got cpu"):
        cpu.capture(lambda stream: None)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", 3.5])
def test_bad_devices_are_refused(device):
    with pytest.raises(ConfigError, match="device must be cpu, cuda or cuda:N"):
        parse_device(device)
