"""The vision application end to end: `particlize train resnet-small --task fashion-mnist`, then `compress`
to a FLOPs target with residual-stream channels in the plan. Default: synthetic IDX files of the real
shapes (tests/test_tasks.py's `write_fashion`); ``slow``: the real Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import particlize as pz
from particlize.cli import app
from particlize.loop import compress
from particlize.tasks import fashion_mnist as fm
from particlize.tasks import get_task
from test_tasks import write_fashion


def _flops(model: torch.nn.Module) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(torch.zeros(1, 1, 28, 28))
    return fc.get_total_flops()


def _train_and_compress(tmp_path: Path, extra: list[str]) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    out = tmp_path / "ref"
    r = CliRunner().invoke(app, ["train", "resnet-small", "--task", "fashion-mnist", "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output
    meta = json.loads((out / "particlize.json").read_text())["extra"]
    dense = pz.load(out).eval()
    res = compress(dense, get_task("fashion-mnist"), target_flops=0.5, granularity=("channels",), max_fraction=1.0,
                   min_quality=0.0, recover_epochs=1, limit=2048, batch_size=32, calib_examples=64, seed=0)
    return dense, res.model.eval(), {"meta": meta, "removed": res.history[-1]["removed"]}


def test_train_and_compress_synthetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fm, "DATA_DIR", write_fashion(tmp_path / "fm", n_train=200, n_test=40))
    dense, small, info = _train_and_compress(tmp_path, ["--epochs", "1", "--batch-size", "32"])
    assert info["meta"]["train"]["base"] == "resnet-small" and info["meta"]["metrics"]["test"]["n"] == 40
    assert _flops(small) <= 0.5 * _flops(dense)
    assert any(k.endswith(".stream") for k in info["removed"])  # the coupled channels were cut as well
    assert small.layers[0][0].conv2.out_channels == small.stem[0].out_channels < 8
    folder = pz.save(small, tmp_path / "small")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert (pz.load(folder)(x) - small(x)).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_fashion_mnist_end_to_end(tmp_path: Path) -> None:
    """The real data, a tenth of the benchmark reference's recipe (3 of its 30 epochs over the whole training
    split, batch 128: about 0.86 test accuracy; the reference reaches 0.90; chance is 0.10), then 50% of the FLOPs
    with a short recovery (one pass over 2,048 images: 64 steps)."""
    from particlize.tasks import fashion_mnist as fm

    if not fm.DATA_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed ({fm.APT})")
    dense, small, info = _train_and_compress(tmp_path, ["--epochs", "3", "--batch-size", "128"])
    acc = info["meta"]["metrics"]["test"]["accuracy"]
    assert info["meta"]["metrics"]["test"]["n"] == 10000 and acc > 0.82
    assert _flops(small) <= 0.5 * _flops(dense)
    small_acc = get_task("fashion-mnist").evaluate(small, "test", batch_size=500)["accuracy"]
    assert small_acc > 0.65, (acc, small_acc)
