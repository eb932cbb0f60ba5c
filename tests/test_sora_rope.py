"""Rotary frame positions in the DiT's temporal attention (`SoraConfig.rope`): relative time in every block."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import particlize as pz
from particlize.models.sora import ROPE_BASE, SoraConfig, SpacetimeDiT, inflate_time, rotate
from particlize.train_sora import _adapted
from strategies import removal_sets
from test_sora import _batch, _model

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.integers(-5, 5), hd=st.sampled_from([2, 8, 16, 24]))
def test_rotated_scores_depend_only_on_how_far_apart_two_frames_are(seed, shift, hd):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(3, 2, 6, hd, generator=g), torch.randn(3, 2, 6, hd, generator=g)
    pos = torch.arange(6)
    scores = rotate(q, pos) @ rotate(k, pos).transpose(-1, -2)
    torch.testing.assert_close(rotate(q, pos + shift) @ rotate(k, pos + shift).transpose(-1, -2), scores,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rotate(q, pos).norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)  # a rotation
    torch.testing.assert_close(rotate(q, torch.zeros(6, dtype=torch.long)), q)
    assert not torch.allclose(scores, q @ k.transpose(-1, -2), atol=1e-3)  # but not the plain scores


@pytest.mark.parametrize("temporal", ["position", "all"])
def test_only_a_rope_model_knows_the_order_of_its_frames(temporal):
    """Without positions a model is blind to frame order: shuffling the input frames shuffles its output the same
    way. Rotary positions break that, in the temporal attention alone (zero learned temporal positions)."""
    perm = torch.tensor([2, 0, 3, 1])
    b = _batch(temporal=temporal)
    outs = {}
    for rope in (False, True):
        m = _model(temporal=temporal, rope=rope)
        with torch.no_grad():
            m.pos_temporal.zero_()
            outs[rope] = (m(**b)[:, :, perm], m(**{**b, "x": b["x"][:, :, perm]}))
    torch.testing.assert_close(*outs[False], atol=1e-5, rtol=1e-5)
    assert (outs[True][0] - outs[True][1]).abs().max() > 1e-2


@SETTINGS
@given(data=st.data(), temporal=st.sampled_from(["position", "all"]))
def test_rope_model_masked_equals_pruned(data, temporal, tmp_path_factory):
    model, batch = _model(temporal=temporal, rope=True, depth=1), _batch(temporal=temporal)
    pm = pz.decompose(model)
    remove = data.draw(removal_sets(pm))
    with torch.no_grad():
        with pm.ablate(remove):
            masked = model(**batch)
        small = pm.prune(remove)
        torch.testing.assert_close(small(**batch), masked, atol=1e-5, rtol=0)
        out = tmp_path_factory.mktemp("saved")
        pz.save(small, out, force=True)
        again = pz.load(out)
        assert again.config.rope
        torch.testing.assert_close(again(**batch), masked, atol=1e-5, rtol=0)


def test_a_run_can_turn_rope_on_over_trained_weights_but_not_inflate_a_rope_model():
    start = _model()
    cfg = SoraConfig(**{**start.config.__dict__, "rope": True})
    moved = _adapted(start, cfg)
    assert moved.config.rope and moved is not start
    for k, v in start.state_dict().items():
        torch.testing.assert_close(moved.state_dict()[k], v, atol=0, rtol=0)
    coarse = SpacetimeDiT(SoraConfig(frames=4, size=16, patch=(2, 4, 4), dim=16, depth=1, heads=2, rope=True))
    with pytest.raises(ValueError, match="inflate the model before turning rope on"):
        inflate_time(coarse, 1)
    fine = SoraConfig(**{**coarse.config.__dict__, "patch": (1, 4, 4)})
    assert _adapted(coarse, fine) is coarse  # so train_sora says the folder cannot start the run


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), hd=st.sampled_from([2, 5, 8, 16]))
def test_rotate_turns_each_half_pair_by_its_angle(seed, hd):
    """`rotate`'s three-pass form against the textbook rotate-half: dims i and i + hd // 2 turn together by
    position / base ** (i / (hd // 2)); an odd last dimension stays as it is."""
    g = torch.Generator().manual_seed(seed)
    t, pos = torch.randn(2, 3, 7, hd, generator=g), torch.randint(-9, 9, (7,), generator=g)
    half = hd // 2
    angle = pos[:, None].float() / ROPE_BASE ** (torch.arange(half).float() / half)
    a, b = t[..., :half], t[..., half:2 * half]
    want = torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin(), t[..., 2 * half:]], -1)
    torch.testing.assert_close(rotate(t, pos), want, atol=1e-5, rtol=1e-5)
