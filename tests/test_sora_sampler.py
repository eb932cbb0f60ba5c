"""Fast DiT sampling (`particlize.models.sora_sampler`): compiled and CUDA-graph steps equal the eager sampler."""

from __future__ import annotations

import shutil

import pytest
import torch

from particlize.errors import ParticlizeError
from particlize.models import sora_sampler
from particlize.models.sora import SoraConfig, SpacetimeDiT
from particlize.models.sora_sampler import FastSampler, ddim_timesteps

CFG = dict(frames=2, size=8, patch=(1, 4, 4), dim=16, depth=1, heads=2, mlp_ratio=2.0, schedule="cosine")
LABELS = [3, 10, 7]  # 10: the null label (unconditional)


def _model(seed: int = 0) -> SpacetimeDiT:
    torch.manual_seed(seed)
    m = SpacetimeDiT(SoraConfig(**CFG))
    with torch.no_grad():  # adaLN-Zero starts as the identity and outputs zero; give every weight a value
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def test_eager_sampler_equals_sample_and_keeps_noise_order():
    """The sampler's eager mode is `sample` exactly (same noise, same steps, same trajectory), for guided and
    unguided sampling; another seed gives other videos."""
    m = _model()
    ref_states: list[tuple[torch.Tensor, int]] = []
    ref = m.sample(LABELS, steps=5, seed=2, trajectory=ref_states)
    states: list[tuple[torch.Tensor, int]] = []
    out = FastSampler(m, 3, mode="eager")(LABELS, steps=5, seed=2, trajectory=states)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert [t for _, t in states] == [t for _, t in ref_states] == ddim_timesteps(1000, 5)
    for (a, _), (b, _) in zip(states, ref_states):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    unguided = FastSampler(m, 3, mode="eager", guidance=1.0)(LABELS, steps=3, seed=2)
    torch.testing.assert_close(unguided, m.sample(LABELS, steps=3, seed=2, guidance=1.0), atol=0, rtol=0)
    assert not torch.equal(unguided, m.sample(LABELS, steps=3, seed=2))
    assert not torch.equal(m.sample(LABELS, steps=5, seed=3, mode="eager"), ref)


def test_bad_mode_batch_and_device_are_refused():
    m = _model()
    with pytest.raises(ParticlizeError, match="unknown sampling mode 'fast'"):
        m.sample(LABELS, steps=2, mode="fast")
    with pytest.raises(ParticlizeError, match="unknown sampling mode"):
        FastSampler(m, 3, mode="cudagraph")
    with pytest.raises(ParticlizeError, match="2 labels for a sampler built for batch=3"):
        FastSampler(m, 3, mode="eager")([1, 2], steps=2)
    with pytest.raises(ParticlizeError, match="at least one step"):
        FastSampler(m, 3, mode="eager")(LABELS, steps=0)
    if not torch.cuda.is_available():
        with pytest.raises(ParticlizeError, match="mode='graph' replays CUDA graphs: the model is on cpu"):
            m.sample(LABELS, steps=2, mode="graph")


def test_compile_without_a_toolchain_or_failing_says_so(monkeypatch):
    """No C++ compiler on a CPU: refused at construction with what to do; a compile failure on the first call is
    one ParticlizeError naming torch.compile, not an inductor trace."""
    m = _model()
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(sora_sampler.shutil, "which", lambda name: None)
    with pytest.raises(ParticlizeError, match="needs a C\\+\\+ compiler .* use mode='eager'"):
        FastSampler(m, 3, mode="compile")
    monkeypatch.undo()

    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("inductor: cc1plus not found\nlong trace")
        return run

    monkeypatch.setattr(sora_sampler.torch, "compile", broken)
    with pytest.raises(ParticlizeError,
                       match=r"torch.compile could not build .*RuntimeError: inductor: cc1plus not found\): use"):
        m.sample(LABELS, steps=2, mode="compile")


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler for inductor")
def test_compiled_sampler_equals_eager_on_cpu():
    """``mode="compile"``: the same seed gives the same videos as eager sampling (float tolerance), the
    sampler is reused across seeds, and the model's training flag is restored."""
    m = _model()
    sampler = FastSampler(m, 3, mode="compile")
    for seed in (0, 1):
        torch.testing.assert_close(sampler(LABELS, steps=4, seed=seed), m.sample(LABELS, steps=4, seed=seed),
                                   atol=1e-5, rtol=1e-5)
    m.train()
    torch.testing.assert_close(m.sample(LABELS, steps=2, seed=5, mode="compile"), m.sample(LABELS, steps=2, seed=5),
                               atol=1e-5, rtol=1e-5)
    assert m.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graph_sampler_equals_eager_on_cuda():
    """``mode="graph"``: one captured step replayed per step gives the eager videos and trajectory; the captured
    buffers are reset per call (two seeds, in either order)."""
    m = _model().cuda()
    sampler = FastSampler(m, 3, mode="graph")
    for seed in (1, 0, 1):
        states: list[tuple[torch.Tensor, int]] = []
        ref_states: list[tuple[torch.Tensor, int]] = []
        out = sampler(LABELS, steps=6, seed=seed, trajectory=states)
        ref = m.sample(LABELS, steps=6, seed=seed, trajectory=ref_states)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(states[-1][0], ref_states[-1][0], atol=1e-4, rtol=1e-4)
    unguided = FastSampler(m, 3, mode="graph", guidance=1.0)(LABELS, steps=3, seed=0)
    torch.testing.assert_close(unguided, m.sample(LABELS, steps=3, seed=0, guidance=1.0), atol=1e-4, rtol=1e-4)


def test_a_models_own_guidance_is_the_samplers_default():
    """``SoraConfig.guidance`` (what a model was tuned to sample with) is the default of `sample`, of the fast
    sampler and of the sample metrics; an explicit scale still wins, and a scale below 1 is refused."""
    m = _model()
    tuned = SpacetimeDiT(SoraConfig(**CFG, guidance=3.0)).eval()
    tuned.load_state_dict(m.state_dict())
    want = m.sample(LABELS, steps=3, seed=0, guidance=3.0)
    torch.testing.assert_close(tuned.sample(LABELS, steps=3, seed=0), want, atol=0, rtol=0)
    assert not torch.allclose(m.sample(LABELS, steps=3, seed=0), want)  # the usual default is another scale
    torch.testing.assert_close(tuned.sample(LABELS, steps=3, seed=0, guidance=5.0), m.sample(LABELS, steps=3, seed=0))
    assert FastSampler(tuned, 3, mode="eager").guidance == 3.0 and FastSampler(m, 3, mode="eager").guidance == 5.0
    with pytest.raises(ValueError, match="1 \\(none\\) or more"):
        SoraConfig(**CFG, guidance=0.5)
