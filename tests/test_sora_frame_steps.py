"""A step per frame (diffusion forcing) for the spacetime DiT: the model, the noise, the loss, the training batches,
the staggered sampler in every mode, distillation and surgery. Equal steps everywhere must give exactly what one
step per video gives, so models trained without it are untouched."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import particlize as pz
from particlize.models.sora_sampler import FastSampler, ddim_plan, ddim_timesteps
from strategies import removal_sets
from test_sora import _model  # 4 frames of 16x16, a token per frame, every weight drawn

SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _x(b: int = 3, frames: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn((b, 1, frames, 16, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("patch", [(1, 4, 4), (2, 4, 4)])
def test_equal_steps_per_token_are_one_step_per_video(patch):
    model, x, y = _model(patch=patch), _x(), torch.tensor([0, 7, 10])
    t = torch.tensor([999, 400, 3])
    tokens = 4 // patch[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x, t[:, None].expand(-1, tokens), y), model(x, t, y), atol=1e-6, rtol=0)
    noise = _x(seed=2)
    d = model.diffusion
    torch.testing.assert_close(d.add_noise(x, t[:, None].expand(-1, tokens), noise), d.add_noise(x, t, noise))
    pred = _x(seed=3)
    for gamma in (None, 5.0):
        torch.testing.assert_close(model.weighted_mse(pred, noise, t[:, None].expand(-1, tokens), gamma),
                                   model.weighted_mse(pred, noise, t, gamma))


def test_each_frame_is_noised_and_weighted_at_its_own_step():
    model, x, noise = _model(), _x(), _x(seed=2)
    d = model.diffusion
    t = torch.tensor([[999, 500, 20, 0]] * 3)
    xt = d.add_noise(x, t, noise)
    for k in range(4):
        alone = d.add_noise(x, t[:, k], noise)
        torch.testing.assert_close(xt[:, :, k], alone[:, :, k])
    pred = _x(seed=3)
    w = d.loss_weight(t[0], 5.0)
    by_hand = sum(((pred[:, :, k] - noise[:, :, k]) ** 2).mean() * w[k] for k in range(4)) / 4
    torch.testing.assert_close(model.weighted_mse(pred, noise, t, 5.0), by_hand)
    with torch.no_grad():  # a frame's own step changes what the model predicts there
        assert not torch.allclose(model(xt, t, torch.zeros(3, dtype=torch.long)),
                                  model(xt, t[:, :1].expand(-1, 4), torch.zeros(3, dtype=torch.long)))


@pytest.mark.parametrize("lag", [1, 3])
def test_the_staggered_plan_moves_every_token_through_every_step_once(lag):
    ab = _model().diffusion.alpha_bar
    steps, tokens = 5, 4
    ts = ddim_timesteps(1000, steps)
    flat = ddim_plan(ab, steps)
    assert [t for t, _, _ in flat] == ts and float(flat[-1][2]) == 1.0
    plan = ddim_plan(ab, steps, tokens=tokens, pt=2, lag=lag)
    assert len(plan) == steps + (tokens - 1) * lag
    for k in range(tokens):
        moving = [i for i, (_, a, a_prev) in enumerate(plan) if a[0, 0, 2 * k] != a_prev[0, 0, 2 * k]]
        assert moving == list(range(k * lag, k * lag + steps))  # starts lag later than the token before
        assert [int(plan[i][0][k]) for i in moving] == ts
        assert int(plan[0][0][k]) == ts[0] and int(plan[-1][0][k]) == (0 if k < tokens - 1 else ts[-1])
        assert float(plan[moving[-1]][2][0, 0, 2 * k]) == 1.0  # its last step ends clean
    a = torch.stack([a[0, 0, :, 0, 0] for _, a, _ in plan])
    assert torch.equal(a[:, 0::2], a[:, 1::2])  # a token's frames share its step


def test_staggered_sampling_draws_frames_in_turn_and_fast_samplers_agree():
    model = _model(frame_steps=0.5, frame_lag=2)
    states: list = []
    videos = model.sample([1, 2], steps=4, seed=3, trajectory=states)
    assert videos.shape == (2, 1, 4, 16, 16) and 0 <= videos.min() and videos.max() <= 1
    assert len(states) == 4 + 3 * 2 and states[0][1].tolist() == [999, 999, 999, 999]
    assert states[2][1].tolist() == [333, 999, 999, 999]  # frame 0 two steps ahead of frame 1
    eager = FastSampler(model, batch=2, mode="eager")([1, 2], steps=4, seed=3)
    torch.testing.assert_close(eager, videos, atol=0, rtol=0)
    flat = copy.deepcopy(model)
    flat.config.frame_lag = 0
    assert not torch.allclose(flat.sample([1, 2], steps=4, seed=3), videos)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler for inductor")
def test_compiled_staggered_sampling_equals_eager():
    """Within a quarter of a grey level (fused kernels round differently, and the frames feed each other), with
    rotary frame positions."""
    model = _model(frame_steps=0.5, frame_lag=1, rope=True)  # the shipped configuration
    fast = FastSampler(model, batch=2, mode="compile")([3, 4], steps=3, seed=0)
    torch.testing.assert_close(fast, model.sample([3, 4], steps=3, seed=0), atol=1e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graph_staggered_sampling_equals_eager_on_cuda():
    model = _model(frame_steps=0.5, frame_lag=1, rope=True).cuda()
    fast = FastSampler(model, batch=2, mode="graph")([3, 4], steps=3, seed=0)
    torch.testing.assert_close(fast, model.sample([3, 4], steps=3, seed=0), atol=1e-4, rtol=0)


def test_training_batches_draw_steps_per_frame_for_their_share_only():
    from particlize.recover.dit import draw_batch
    from particlize.tasks.moving_digits import moving_digits

    task = moving_digits(seed=0, n_train=4, n_eval=4, frames=4, size=16, digit_size=8)
    draws = {}
    for share in (0.0, 0.5, 1.0):
        model = _model(frame_steps=share)
        draws[share] = draw_batch(model, task.stream(64, seed=1), torch.Generator().manual_seed(2), 64, "cpu")
    x0, y, t, noise = draws[0.0]
    assert t.shape == (64,)
    for share in (0.5, 1.0):  # videos, labels and noise are the draws of a model without it
        for a, b in zip((x0, y, noise), (draws[share][0], draws[share][1], draws[share][3])):
            assert torch.equal(a, b)
    t_half, t_all = draws[0.5][2], draws[1.0][2]
    assert t_half.shape == t_all.shape == (64, 4)
    own = (t_half != t_half[:, :1]).any(1)
    assert 15 < own.sum() < 50 and (t_all != t_all[:, :1]).any(1).sum() > 60
    assert torch.equal(t_half[~own][:, 0], t[~own])  # the rest keep the one step a model without it draws


def test_a_run_with_steps_per_frame_trains_resumes_and_carries_weights(tmp_path):
    from particlize.train_sora import train_sora

    small = dict(frames=4, size=16, dim=16, depth=1, heads=2, batch_size=2, seed=3)
    base = train_sora("tiny", steps=2, out=tmp_path / "base", **small)
    df = pz.load(train_sora("tiny", steps=2, out=tmp_path / "df", init=base, frame_steps=0.5, frame_lag=3, **small))
    assert (df.config.frame_steps, df.config.frame_lag) == (0.5, 3)
    with pytest.raises(pz.ParticlizeError, match="frame_steps is a share"):
        train_sora("tiny", steps=1, out=tmp_path / "bad", frame_steps=1.5, **small)


def test_distilling_a_staggered_student_mixes_fresh_and_trajectory_steps():
    from particlize.recover.dit import distill_dit, per_token_steps
    from particlize.tasks.moving_digits import moving_digits

    task = moving_digits(seed=0, n_train=8, n_eval=4, frames=4, size=16, digit_size=8)
    teacher = _model(frame_steps=0.5, frame_lag=1)
    student = copy.deepcopy(teacher)
    seen: list[torch.Tensor] = []
    student.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()) if m.training else None)
    res = distill_dit(student, teacher, task, steps=2, batch_size=8, alpha=1.0, trajectory_videos=3, sampler_steps=3,
                      focus=(300, 700))
    assert res["final_loss"] == 0.0 and all(t.ndim == 2 and t.shape[1] == 4 for t in seen)
    a, b = per_token_steps(torch.tensor([5, 6]), torch.tensor([[1, 2, 3, 4]]))
    assert a.tolist() == [[5, 5, 5, 5], [6, 6, 6, 6]] and b.shape == (1, 4)


@SETTINGS
@given(data=st.data())
def test_masked_equals_pruned_with_a_step_per_frame(data):
    model = _model(frame_steps=1.0)
    x, y = _x(), torch.tensor([0, 7, 10])
    t = torch.randint(0, 1000, (3, 4), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    pm = pz.decompose(model)
    remove = data.draw(removal_sets(pm))
    with torch.no_grad():
        with pm.ablate(remove):
            masked = model(x, t, y)
        torch.testing.assert_close(pm.prune(remove)(x, t, y), masked, atol=1e-5, rtol=0)


def test_the_module_cli_reports_a_bad_setting_in_one_line(tmp_path, capsys):
    from particlize.train_sora import _main

    with pytest.raises(SystemExit) as e:
        _main(["--out", str(tmp_path / "bad"), "--steps", "1", "--frame-lag", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith("error: frame_lag counts sampler steps: 0 or more, got -1")
    assert not (tmp_path / "bad").exists()
