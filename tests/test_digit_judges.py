"""Independent judges of moving-digit videos (`particlize.tasks.digit_judges`, `particlize.tasks.judge_metrics`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from particlize.errors import ParticlizeError
from particlize.tasks.digit_judges import compare_to_real, crop_digits, fit_judges, judge_videos
from particlize.tasks.judge_metrics import bounce_fit, frechet_distance, motion_check
from particlize.tasks.moving_digits import moving_digits, render


@pytest.fixture(scope="module")
def task():
    return moving_digits(seed=0, n_train=8, n_eval=60)


@pytest.fixture(scope="module")
def judges(task):
    return fit_judges(task, per_image=5, steps=80, seed=0)  # small: the benchmark fits 40 and 600


# ---- who learns from which digit images --------------------------------------------------------------


def test_splits_hold_disjoint_digit_images(task):
    seen = {s: {img.tobytes() for img in task.digits[s][0]} for s in ("train", "val", "test")}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]


def test_the_generator_stream_draws_only_train_images(task):
    """With the val and test images poisoned (NaN), the training stream still renders finite videos."""
    poisoned = moving_digits(seed=0, n_train=8, n_eval=8)
    for s in ("val", "test"):
        imgs, y = poisoned.digits[s]
        poisoned.digits[s] = (np.full_like(imgs, np.nan), y)
    videos, _ = next(poisoned.stream(64, seed=3))
    assert torch.isfinite(videos).all()
    clean, _ = next(task.stream(64, seed=3))
    assert torch.equal(videos, clean)  # the same draws as the untouched task: val/test never enter them


def test_judges_refuse_the_generator_s_images(task):
    with pytest.raises(ParticlizeError, match="must not learn from the 'train'"):
        fit_judges(task, split="train")
    with pytest.raises(ParticlizeError, match="read 32x32 frames"):
        fit_judges(moving_digits(seed=0, n_train=1, n_eval=1, size=16, digit_size=8))


# ---- the readers ---------------------------------------------------------------------------------------


def test_readers_read_real_test_videos_well_above_chance(task, judges):
    v, y = task.split("test")
    out = judge_videos(judges, v, y)
    assert out["n_digit_videos"] == int((y < 10).sum()) > 30
    assert out["readers"]["crop-svc"]["frame_accuracy"] > 0.8
    assert out["readers"]["lenet"]["frame_accuracy"] > 0.2  # chance is 0.1; 0.31 after this small fit, 0.94 after the full one
    assert out["readers"]["crop-svc"]["video_accuracy"] >= out["readers"]["crop-svc"]["frame_accuracy"] - 0.1
    assert judges.info["split"] == "val"


def test_readers_fail_on_noise(task, judges):
    v, y = task.split("test")
    noise = torch.rand(v[:40].shape, generator=torch.Generator().manual_seed(0))
    assert judge_videos(judges, noise, y[:40] % 10)["readers"]["crop-svc"]["video_accuracy"] < 0.4


def test_crop_reads_the_digit_wherever_it_stands(task):
    img = torch.from_numpy(task.digits["test"][0][:5])  # [5, 16, 16]
    a, b = torch.zeros(5, 1, 32, 32), torch.zeros(5, 1, 32, 32)
    a[:, 0, 2:18, 3:19] = img
    b[:, 0, 13:29, 10:26] = img
    np.testing.assert_allclose(crop_digits(a), crop_digits(b), atol=1e-4)
    assert crop_digits(a).shape == (5, 64) and crop_digits(a).max() == pytest.approx(16, rel=0.2)
    assert (crop_digits(torch.zeros(2, 1, 32, 32)) == 0).all()


def test_judges_compare_real_with_real_as_equals(task, judges):
    v, y = task.split("test")
    one = y < 10
    v, y = v[one], y[one]
    rep = compare_to_real(judges, v[:20], y[:20], v, y)
    assert set(rep["frechet"]) == {"frame", "video"}
    for kind in ("frame", "video"):
        f = rep["frechet"][kind]
        assert f["samples"] >= 0 and f["real_halves"] > 0 and f["n_videos"] == 20
    assert rep["motion"]["bounce_share"]["samples"] == 1.0
    blurred = torch.nn.functional.avg_pool3d(v[:20], (1, 5, 5), stride=1, padding=(0, 2, 2))
    worse = compare_to_real(judges, blurred, y[:20], v, y)
    assert worse["frechet"]["frame"]["samples"] > rep["frechet"]["frame"]["samples"]


# ---- Fréchet distance ------------------------------------------------------------------------------------


def _feats(n=300, d=6, seed=0):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)) @ g.normal(size=(d, d))


@pytest.mark.parametrize("shrink", [True, False])
def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_a_perturbation(shrink):
    x = _feats()
    assert frechet_distance(x, x, shrink) == pytest.approx(0.0, abs=1e-8)
    g = np.random.default_rng(1)
    d = [frechet_distance(x, x + s * g.normal(size=x.shape), shrink) for s in (0.1, 0.5, 1.5)]
    assert 0 < d[0] < d[1] < d[2]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=4, max_size=4))
def test_frechet_of_a_shifted_set_is_the_squared_shift(shift):
    x = _feats(d=4)
    c = np.array(shift)
    assert frechet_distance(x, x + c, shrink=False) == pytest.approx(float(c @ c), rel=1e-6, abs=1e-6)


def test_frechet_trace_term_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = _feats(seed=2), _feats(seed=3)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * scipy_linalg.sqrtm(sa @ sb).real)
    assert frechet_distance(a, b, shrink=False) == pytest.approx(ref, rel=1e-6)


def test_frechet_errors_say_what_shapes_it_needs():
    with pytest.raises(ParticlizeError, match=r"same d and at least 2 rows"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ParticlizeError, match=r"same d and at least 2 rows"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ---- the motion check --------------------------------------------------------------------------------------


def _bounces(n=40, seed=0, **kw):
    img, y = moving_digits(seed=0, n_train=1, n_eval=1).digits["test"]
    v, _ = render(img, y, n, np.random.default_rng(seed), **kw)
    return torch.from_numpy(v).float() / 255


def test_motion_check_accepts_rendered_bounces_and_rejects_shuffled_frames():
    v = _bounces()
    fit = bounce_fit(v, span=16)
    assert fit["is_bounce"].all() and fit["residual"].max() < 0.05
    assert (np.abs(fit["velocity"]) <= 2).all()
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([x[:, torch.randperm(8, generator=g)] for x in v])
    m = motion_check(shuffled, span=16)
    assert m["bounce_share"] < 0.2 and m["mean_residual_px"] > 1.0


def test_motion_check_rejects_frozen_and_blank_videos():
    v = _bounces(10)
    frozen = v[:, :, :1].expand_as(v).clone()
    assert motion_check(frozen, span=16)["bounce_share"] == 0.0
    blank = v.clone()
    blank[:, :, 3] = 0
    m = motion_check(blank, span=16)
    assert m["blank_videos"] == 10 and m["bounce_share"] == 0.0


# ---- errors ---------------------------------------------------------------------------------------------------


def test_judges_say_what_input_they_need(task, judges):
    v, y = task.split("test")
    with pytest.raises(ParticlizeError, match=r"\[B, 1, T, H, W\]"):
        judge_videos(judges, v[:, 0], y)
    with pytest.raises(ParticlizeError, match=r"read 32x32 frames, got \(16, 16\)"):
        judge_videos(judges, v[..., :16, :16], y)
    with pytest.raises(ParticlizeError, match=r"got 60 videos but 3 labels"):
        judge_videos(judges, v, y[:3])
    with pytest.raises(ParticlizeError, match="labelled with the digit 0-9"):
        compare_to_real(judges, v[:4], torch.full((4,), 10), v, y)
    with pytest.raises(ParticlizeError, match="span must be between 1"):
        bounce_fit(v, span=40)
