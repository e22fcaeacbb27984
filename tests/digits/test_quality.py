"""Quality metrics on known inputs, and the shipped digits classifier on held-out real digits."""

import numpy as np
import pytest

from clusca_trt.digits import quality
from clusca_trt.errors import CheckpointError, InputError


def _images(n, seed=0):
    return np.random.default_rng(seed).random((n, 32, 32, 1), dtype=np.float32)


# -- Frechet distance -------------------------------------------------------------------------


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 8))
    mu, sigma = quality.feature_stats(a)
    assert quality.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    # diagonal: |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    want = 1.0 + 4.0 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = quality.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(want, rel=1e-12)


def test_frechet_distance_is_symmetric_for_full_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((100, 5)), rng.standard_normal((100, 5)) @ rng.standard_normal((5, 5)) + 0.3
    sa, sb = quality.feature_stats(a), quality.feature_stats(b)
    d1 = quality.frechet_distance(*sa, *sb)
    d2 = quality.frechet_distance(*sb, *sa)
    assert d1 > 0.1 and d1 == pytest.approx(d2, rel=1e-9)


def test_fid_digits_of_the_reference_statistics_is_near_zero():
    ev = quality.load_evaluator()
    images = _images(64)
    _, feats = ev.logits_and_features(images)
    mu, sigma = quality.feature_stats(feats)
    same = quality.Evaluator(ev.classifier, mu, sigma, len(feats))
    assert quality.fid_digits(images, same) == pytest.approx(0.0, abs=1e-6)
    assert quality.fid_digits(images) > 1.0  # uniform noise is far from real digits


# -- PSNR / SSIM ------------------------------------------------------------------------------


def test_psnr_formula():
    a = np.full((2, 32, 32, 1), 0.5, np.float32)
    b = a + np.array([0.1, 0.01], np.float32).reshape(2, 1, 1, 1)  # MSE 1e-2 and 1e-4: 20 dB and 40 dB
    assert quality.psnr(a, b) == pytest.approx(30.0, abs=1e-3)
    assert quality.psnr(a, a) == float("inf")


def test_ssim_identical_is_one_and_noise_lowers_it():
    a = _images(3)
    assert quality.ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    noisy = np.clip(a + np.random.default_rng(1).normal(0, 0.2, a.shape), 0, 1)
    assert quality.ssim(a, noisy) < 0.9


def test_ssim_one_window_equals_the_weighted_formula():
    rng = np.random.default_rng(2)
    x, y = rng.random((11, 11)), rng.random((11, 11))
    w = quality._gaussian_window(11, 1.5)
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    want = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = quality.ssim(x.reshape(1, 11, 11, 1), y.reshape(1, 11, 11, 1))
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: quality.psnr(_images(2), _images(3)), "expected two image stacks of one shape"),
        (lambda: quality.class_accuracy(_images(2), [1]), "expected one label per image (2), got 1"),
        (lambda: quality.fid_digits(np.zeros((2, 28, 28, 1))), "expected images of shape [n, 32, 32, 1]"),
        (lambda: quality.feature_stats(np.zeros((1, 4))), "expected features of shape [n >= 2, d]"),
    ],
)
def test_bad_inputs_are_one_line_errors(call, message):
    with pytest.raises(InputError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


# -- the shipped classifier -------------------------------------------------------------------


def test_classifier_file_loads_with_reference_statistics():
    ev = quality.load_evaluator()
    assert ev.ref_mu.shape == (quality.FEATURES,) and ev.ref_sigma.shape == (quality.FEATURES,) * 2
    assert ev.ref_count > 400
    np.testing.assert_allclose(ev.ref_sigma, ev.ref_sigma.T, atol=1e-9)


def test_missing_or_bad_classifier_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="digits classifier not found"):
        quality.load_evaluator(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read digits classifier"):
        quality.load_evaluator(bad)


def test_classifier_is_accurate_on_held_out_digits():
    pytest.importorskip("sklearn")
    from clusca_trt.digits.data import load_split

    ref = load_split("reference")
    idx = np.arange(0, len(ref), 3)  # a third of the held-out split: 150 digits
    acc = quality.class_accuracy(ref.as_unit()[idx], ref.labels[idx])
    assert acc >= 0.97


def test_shipped_reference_statistics_are_those_of_the_reference_split():
    pytest.importorskip("sklearn")
    from clusca_trt.digits.data import load_split

    ev = quality.load_evaluator()
    ref = load_split("reference")
    _, feats = ev.logits_and_features(ref.as_unit())
    mu, sigma = quality.feature_stats(feats)
    assert len(feats) == ev.ref_count
    np.testing.assert_allclose(mu, ev.ref_mu, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sigma, ev.ref_sigma, rtol=1e-4, atol=1e-4)


def test_splits_are_disjoint_and_cover_the_data():
    pytest.importorskip("sklearn")
    from clusca_trt.digits import data as digits

    _, labels = digits._load_raw()
    parts = digits.split_indices(labels)
    allidx = np.concatenate(list(parts.values()))
    assert len(allidx) == len(labels) == 1797 and len(np.unique(allidx)) == 1797
    assert [len(parts[s]) for s in digits.SPLITS] == [898, 450, 449]
    np.testing.assert_array_equal(digits.split_indices(labels)["reference"], parts["reference"])  # seeded
