"""The gate-gradient scorers differentiate with respect to the gates only. They keep less for the backward pass
than a weight-gradient pass over the same batch (what Torch-Pruning's Taylor importance runs), give the scores
they gave with the parameters requiring gradients, and leave every parameter's ``requires_grad`` as they found it."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import pytest
import torch

import particlize as pz
from particlize.analysis import _common
from particlize.analysis._common import call, per_example_metric

# the modules (``particlize.analysis`` exports functions of the same names)
taylor, taylor_norm, interactions = (importlib.import_module(f"particlize.analysis.{m}")
                                     for m in ("taylor", "taylor_norm", "interactions"))

sys.path.insert(0, str(Path(__file__).parent))
from test_analysis import _padded  # noqa: E402


def _saved_bytes(model: torch.nn.Module, fn) -> tuple[int, object]:
    """Bytes autograd keeps for the backward pass while ``fn`` runs (the parameters' own storage left out:
    it is there anyway), and what ``fn`` returns."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(n for ptr, n in seen.items() if ptr not in params), out


def _weight_gradient_pass(model, batches) -> None:
    for b in batches:
        model.zero_grad()
        per_example_metric("loss", call(model, b.inputs), b.targets).sum().backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", ["bert", "llama-gqa"])
@pytest.mark.parametrize("method", ["taylor", "fisher", "taylor-norm"])
def test_gate_gradients_keep_less_than_a_weight_gradient_pass(family, method):
    model, batches = _padded(family, family == "llama-gqa")
    pm = pz.decompose(model)
    weights, _ = _saved_bytes(model, lambda: _weight_gradient_pass(model, batches))
    gates, _ = _saved_bytes(model, lambda: pz.analyze(pm, batches, method, table=False, progress=False))
    assert 0 < gates < 0.9 * weights


@pytest.mark.parametrize("method", ["taylor", "taylor-norm"])
def test_scores_are_those_with_parameters_requiring_gradients(method, monkeypatch):
    model, batches = _padded("bert")
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a frozen parameter stays frozen
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    pm = pz.decompose(model)
    frozen = pz.analyze(pm, batches, method, table=False, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    for mod in (taylor, taylor_norm):
        monkeypatch.setattr(mod, "frozen", lambda m: contextlib.nullcontext())
    live = pz.analyze(pm, batches, method, table=False, progress=False)
    assert torch.allclose(torch.tensor(frozen.score.values), torch.tensor(live.score.values), rtol=1e-6, atol=1e-9)


def test_parameters_are_restored_when_scoring_fails():
    model, batches = _padded("bert")
    pm = pz.decompose(model)

    def boom(*args):
        raise RuntimeError("boom")

    model.classifier.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        taylor.gate_gradients(pm, batches, groups=[pm.groups[0].name])
    assert all(p.requires_grad for p in model.parameters())


def test_the_pair_screen_needs_no_parameter_gradient():
    model, batches = _padded("bert")
    pm = pz.decompose(model)
    names = [g.name for g in pm.groups if g.kind == "head"][:1]
    parts = [(names[0], i) for i in range(pm[names[0]].size)]
    seen = []
    hook = model.get_submodule(pm[names[0]].gate.module).register_forward_pre_hook(
        lambda mod, args: seen.append(mod.weight.requires_grad) if torch.is_grad_enabled() else None)
    try:
        grads = interactions._gate_grads(pm, batches, parts, "loss", "zero")
    finally:
        hook.remove()
    assert seen and not any(seen) and all(p.requires_grad for p in model.parameters())
    assert grads[names[0]].abs().sum() > 0
    assert _common.frozen is interactions.frozen
