"""Images: a DiTPipeline folder with a VAE decodes latents; .png grids are written."""

import numpy as np
import torch
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.runtime.decode import to_images
from tests.conftest import make_diffusers_dit


def test_pipeline_folder_with_vae_gives_images(tmp_path):
    from diffusers import AutoencoderKL

    folder = tmp_path / "DiT-pipe"
    make_diffusers_dit(folder / "transformer")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(folder / "vae")
    eng = tmp_path / "eng"
    r = CliRunner().invoke(main, ["-q", "build", "--model", "dit", "--checkpoint", str(folder), "--clusters", "4",
                                  "--order", "1", "--out", str(eng)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "grid.png"
    r = CliRunner().invoke(main, ["-q", "generate", str(eng), "--class-labels", "1,2", "--steps", "6", "--out", str(out)])
    assert r.exit_code == 0, r.output
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.shape == (16, 32, 3)  # 2 samples of 16x16 (8x8 latents, VAE x2) side by side
    npz = tmp_path / "s.npz"
    CliRunner().invoke(main, ["-q", "generate", str(eng), "--class-labels", "1,2", "--steps", "6", "--out", str(npz)])
    data = np.load(npz)
    assert data["images"].shape == (2, 16, 16, 3) and data["images"].dtype == np.float32
    assert 0.0 <= data["images"].min() and data["images"].max() <= 1.0


def test_to_images_range_and_layout():
    x = np.array([[[[-1.0, 0.0], [1.0, 3.0]]]], np.float32)
    img = to_images(x)
    assert img.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(img[0, :, :, 0], [[0.0, 0.5], [1.0, 1.0]])
