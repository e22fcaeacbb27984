"""The built-in trained model ``dit-digits``: its shipped weights load through the loader users
use for their checkpoints, give the named config, and really denoise digits."""

import numpy as np
import pytest
import torch

from clusca_trt.errors import CheckpointError
from clusca_trt.hashing import file_sha256
from clusca_trt.models import DEFAULT_MODEL, dit, load_model

WEIGHTS = dit.DATA_DIR / dit.BUILTIN_WEIGHTS["dit-digits"]


@pytest.fixture(scope="module")
def builtin():
    return load_model("dit-digits")


def test_the_default_model_is_the_trained_digits_model():
    assert DEFAULT_MODEL == "dit-digits"
    cfg = dit.NAMED_CONFIGS["dit-digits"]
    assert (cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.num_classes, cfg.learn_sigma) == (32, 2, 1, 10, False)
    assert cfg.tokens == 256  # DiT-XL/2's token grid at 256 px


def test_builtin_weights_load_through_the_checkpoint_loader(builtin):
    assert builtin.source == {"kind": "builtin", "path": str(WEIGHTS), "sha256": file_sha256(WEIGHTS)}
    assert builtin.model_config == dit.NAMED_CONFIGS["dit-digits"].to_dict()
    assert builtin.decoder == {"kind": "pixels"}
    # the same file given as a user's checkpoint: same weights, same content hash
    user = load_model("dit-digits", checkpoint=WEIGHTS)
    assert user.source["kind"] == "original" and user.source["sha256"] == builtin.source["sha256"]
    ours, theirs = builtin.adapter.model.state_dict(), user.adapter.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_builtin_weights_are_a_few_megabytes_of_float32():
    from safetensors import safe_open

    with safe_open(str(WEIGHTS), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"} and 0.2e6 < WEIGHTS.stat().st_size < 20e6


def test_trained_weights_denoise_real_digits(builtin):
    """eps-prediction error on noised held-out digits: the trained model is far below the
    error of predicting zero (1.0); random weights are not."""
    pytest.importorskip("sklearn")
    from clusca_trt.digits.data import load_split
    from clusca_trt.digits.training import alphas_cumprod, q_sample

    ref = load_split("reference")
    g = torch.Generator().manual_seed(0)
    x0 = torch.from_numpy(ref.images[:40])
    y = torch.from_numpy(ref.labels[:40])
    t = torch.tensor([100, 300, 500, 700] * 10)
    eps = torch.randn(x0.shape, generator=g)
    xt = q_sample(x0, t, eps, alphas_cumprod())
    random = load_model("dit-digits", random_init=True, seed=0).adapter.model
    with torch.no_grad():
        trained_mse = torch.mean((builtin.adapter.model(xt, t.float(), y) - eps) ** 2).item()
        random_mse = torch.mean((random(xt, t.float(), y) - eps) ** 2).item()
    assert trained_mse < 0.25 < random_mse


def test_safetensors_checkpoints_load_like_pt_files(tmp_path):
    from safetensors.torch import save_file

    model = dit.init_random(dit.DiT(dit.NAMED_CONFIGS["dit-tiny"]), seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    loaded = load_model("dit-tiny", checkpoint=tmp_path / "tiny.safetensors")
    assert loaded.source["kind"] == "original" and loaded.decoder is None
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10.0, 900.0]), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(loaded.adapter.model(x, t, y), model(x, t, y), atol=0, rtol=0)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("garbage", "cannot read DiT checkpoint"),
        ("wrong-config", "does not match the config: expected pos_embed of shape [1, 256, 64]"),
        ("no-builtin", "built-in weights of dit-digits not found"),
    ],
)
def test_bad_safetensors_and_missing_builtin_are_one_line_errors(tmp_path, monkeypatch, setup, message):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    kwargs = {"checkpoint": path}
    if setup == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif setup == "wrong-config":
        save_file(dit.DiT(dit.NAMED_CONFIGS["dit-tiny"]).state_dict(), str(path))
    else:
        monkeypatch.setattr(dit, "DATA_DIR", tmp_path / "nowhere")
        kwargs = {}
    with pytest.raises(CheckpointError) as e:
        load_model("dit-digits", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_training_forward_process_matches_the_sampler():
    """x_t from the training forward process, mapped back by the sampler's own x0 formula at
    the respaced index that sees timestep t, gives x0 again (so DDIM is exact for the model)."""
    from clusca_trt.runtime.samplers import GaussianDiffusion
    from clusca_trt.digits.training import alphas_cumprod, q_sample

    abar = alphas_cumprod()
    np.testing.assert_allclose(abar.numpy(), GaussianDiffusion(1000, "ddim").acp, rtol=1e-12)
    d = GaussianDiffusion(50, "ddim")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    for i in (0, 17, 49):
        t = torch.full((3,), int(d.timestep_map[i]))
        xt = q_sample(x0, t, eps, abar)
        np.testing.assert_allclose(d._xstart(xt.numpy(), eps.numpy(), i), x0.numpy(), atol=1e-9)


def _tiny_training_set():
    """A one-block 8x8 DiT config and 20 random labelled images for training tests."""
    cfg = dit.DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                        num_classes=10, learn_sigma=False)
    rng = np.random.default_rng(0)
    return cfg, rng.uniform(-1, 1, (20, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 20)


def test_train_dit_is_seeded():
    from clusca_trt.digits.training import DiTTrainOptions, train_dit

    cfg, images, labels = _tiny_training_set()
    opt = DiTTrainOptions(steps=3, batch=8, warmup=1, threads=1)
    a, losses = train_dit(cfg, images, labels, opt, progress=False)
    b, _ = train_dit(cfg, images, labels, opt, progress=False)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # adaLN-Zero: training moved the zero-initialised output layer
    assert a.final_layer.linear.weight.abs().sum() > 0


def test_shipped_weights_draw_the_digit_they_are_asked_for(builtin):
    """Class-conditional DDIM samples (20 steps, guidance 1.5, two per class) from the shipped
    weights are read as their class by the shipped classifier (the old, undertrained weights
    scored chance level here)."""
    pytest.importorskip("sklearn")
    from clusca_trt.digits import quality
    from clusca_trt.runtime.samplers import GaussianDiffusion

    model, steps = builtin.adapter.model, 20
    labels = np.tile(np.arange(10), 2)
    n = len(labels)
    d = GaussianDiffusion(steps, "ddim")
    x = np.random.default_rng(0).standard_normal((n, 1, 32, 32)).astype(np.float32)
    y = torch.from_numpy(np.concatenate([labels, np.full(n, 10)]))
    for i in reversed(range(steps)):
        with torch.no_grad():
            e = model(torch.from_numpy(np.concatenate([x, x])), torch.full((2 * n,), d.model_timestep(i)), y).numpy()
        x = d.step(x, e[n:] + 1.5 * (e[:n] - e[n:]), i, None)
    images = np.clip((x + 1) / 2, 0, 1).transpose(0, 2, 3, 1)
    assert quality.class_accuracy(images, labels) >= 0.85


@pytest.mark.parametrize(
    "abar, cap, weight",
    [
        (0.99, 20.0, 1.0),  # low noise: SNR 99, weight floor 1 (plain eps-MSE)
        (0.5, 20.0, 1.0),  # SNR 1
        (0.2, 20.0, 4.0),  # 1 / SNR = 0.8 / 0.2
        (0.01, 20.0, 20.0),  # 1 / SNR = 99, capped
        (0.01, 1.0, 1.0),  # cap 1: plain eps-MSE everywhere
    ],
)
def test_loss_weights_are_capped_inverse_snr(abar, cap, weight):
    from clusca_trt.digits.training import loss_weights

    w = loss_weights(torch.tensor([abar], dtype=torch.float64), cap)
    assert w.dtype == torch.float32 and w.item() == pytest.approx(weight, rel=1e-6)


def test_snr_cap_below_one_is_a_config_error():
    from clusca_trt.errors import ConfigError
    from clusca_trt.digits.training import DiTTrainOptions

    with pytest.raises(ConfigError, match="snr_cap must be >= 1, got 0.5"):
        DiTTrainOptions(snr_cap=0.5)


def test_train_dit_second_stage_starts_from_the_given_weights():
    from clusca_trt.errors import ConfigError
    from clusca_trt.digits.training import DiTTrainOptions, train_dit

    cfg, images, labels = _tiny_training_set()
    start = dit.init_random(dit.DiT(cfg), seed=3).state_dict()
    opt = DiTTrainOptions(steps=2, batch=8, warmup=1, lr=1e-6, threads=1)
    model, _ = train_dit(cfg, images, labels, opt, progress=False, init=start)
    # two steps at lr 1e-6 move nothing far: the result is the given weights, not a fresh init
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, start[k], atol=1e-4, rtol=0)
    wrong = dit.init_random(dit.DiT(dit.NAMED_CONFIGS["dit-tiny"]), seed=3).state_dict()
    with pytest.raises(ConfigError, match="init weights do not match the config") as e:
        train_dit(cfg, images, labels, opt, progress=False, init=wrong)
    assert "\n" not in str(e.value)
