"""Device plumbing and device policies, checked on the CPU: data reaches the model where the model is (compress,
sweep, moefy), the timer a device gets, the ablation engine's work shape, ``round_to`` by device and dtype,
and first-order scores of a half-precision model accumulated in fp32."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from loop_fixture import OPTIONS  # noqa: E402
from particlize import loop as loop_mod  # noqa: E402
from particlize.analysis._common import Batch, map_tensors  # noqa: E402
from particlize.loop import compress  # noqa: E402
from particlize.measure import Clock, measure_latency, on_device  # noqa: E402

# ---- data reaches the model where the model is ---------------------------------------------------------------
# On a CPU ``t.to("cpu")`` is ``t`` itself, so a forgotten move cannot be seen by running; here ``Tensor.to`` tags
# what it returns with the device it was asked for, and the checks below look for the tag where data arrives.


def _tag(t: torch.Tensor) -> str | None:
    return getattr(t, "_pz_device", None)


@pytest.fixture
def tagging_to(monkeypatch):
    real = torch.Tensor.to

    def to(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        dev = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if dev is not None and not isinstance(out, torch.nn.Parameter):
            out = out.view_as(out)  # a new tensor object (same storage) to carry the tag
            out._pz_device = torch.device(dev).type
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)


def _tensors(x) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensors(x, lambda t: out.append(t) or t)
    return out


class _Seen:
    """Root-model calls and scorer batches whose tensors did not come through ``.to(<the model's device>)``."""

    def __init__(self, model):
        self.calls, self.unmoved = 0, []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        self.calls += 1
        self.unmoved += [t.shape for t in _tensors((args, kwargs)) if _tag(t) != "cpu"]

    def scorer(self, pm, batches, kinds):
        self.unmoved += [("calibration", t.shape) for t in _tensors(batches) if _tag(t) != "cpu"]
        return {g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(0)) for g in pm.groups if g.kind in kinds}


def _run(setup):
    work, model, task, tok = setup
    model = copy.deepcopy(model)
    seen = _Seen(model)
    opts = {**OPTIONS, "max_rounds": 1, "recover_epochs": 0.25, "quantize": None}
    compress(model, task, tokenizer=tok, scorer=seen.scorer, device="cpu", **opts)
    return seen


def test_compress_moves_every_batch_to_the_models_device(trained_text, tagging_to):
    seen = _run(trained_text)
    assert seen.calls > 0 and seen.unmoved == []


def test_a_forgotten_move_is_caught(trained_text, tagging_to, monkeypatch):
    monkeypatch.setattr(loop_mod, "on_device", lambda data, device: data)  # the bug: calibration data left where it was
    seen = _run(trained_text)
    assert any(u[0] == "calibration" for u in seen.unmoved if isinstance(u, tuple) and isinstance(u[0], str))


def test_measure_latency_moves_its_inputs(tagging_to):
    model = torch.nn.Linear(4, 2)
    seen = _Seen(model)
    measure_latency(model, torch.randn(3, 4), warmup=1, reps=2)
    assert seen.calls == 3 and seen.unmoved == []


def test_on_device_moves_batches_pairs_and_dicts(tagging_to):
    data = [Batch({"input_ids": torch.ones(2, 3)}, torch.zeros(2)), ({"x": torch.ones(1)}, torch.zeros(1))]
    moved = on_device(data, "cpu")
    assert isinstance(moved[0], Batch) and isinstance(moved[1], tuple)
    assert all(_tag(t) == "cpu" for t in _tensors(moved)) and len(_tensors(moved)) == 4
