"""`particlize compress` with its other options run to the end (params and latency targets, a named scorer,
--round-to, --quantize int8, --cost latency, --resume), and `particlize train-sora`."""

from __future__ import annotations

import json

import pytest
import torch

import particlize as pz
from particlize.cli import main
from particlize.loop import CompressConfig, compress


@pytest.fixture
def dense(trained_text):
    """(dense model folder, CSV, model, task, tokenizer) of the loop tests' trained text classifier."""
    work, model, task, tok = trained_text
    return work / "dense", work / "s.csv", model, task, tok


def _stable(history):
    return [{k: v for k, v in e.items() if k not in ("latency_ms", "seconds", "recovery")} for e in history]


def test_params_target_scorer_round_to_int8_and_resume(dense, tmp_path, capsys):
    """--target-params with --scorer magnitude, --round-to 4 and --quantize int8: the run meets the params target
    with every kept width a multiple of 4 features, reports the int8 copy, and a run killed after round 1 and
    continued with --resume ends where the uninterrupted one did."""
    folder, csv, model, task, tok = dense
    base = ["compress", str(folder), "--task", "text-csv", "--data", str(csv), "--target-params", "0.6",
            "--scorer", "magnitude", "--round-to", "4", "--quantize", "int8", "--recover-epochs", "0",
            "--min-quality", "0", "--max-fraction", "0.25", "--batch-size", "16"]
    main([*base, "--out", str(tmp_path / "ref")])
    printed = " ".join(capsys.readouterr().out.split())
    h = json.loads((tmp_path / "ref" / "history.json").read_text())
    cfg = h["config"]
    assert cfg["target"]["params"] == 0.6 and cfg["target"]["flops"] is None and cfg["quantize"] == "int8"
    assert cfg["allocation"]["scorer"] == "magnitude" and cfg["allocation"]["round_to"] == 4
    assert h["done"] and h["outcome"]["target_met"] and h["history"][-1]["params_ratio"] <= 0.6 and len(h["history"]) >= 3
    small = pz.load(tmp_path / "ref")
    for g in pz.decompose(small).groups:
        if g.kind in ("head", "neuron"):
            assert g.size * g.readers[0].width % 4 == 0, g.name
    int8 = pz.io.read_meta(tmp_path / "ref")["extra"]["compress"]["int8"]
    assert f"int8 dynamic: test accuracy {int8['test']['accuracy']:.4f}" in printed and "target met. Test:" in printed

    def killed_after_round_1(event, info):
        if event == "pruned" and info["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the same settings, read back from the finished run
        compress(model, task, tokenizer=tok, config=CompressConfig.from_dict(cfg), out=tmp_path / "killed",
                 progress=killed_after_round_1)
    assert [e["round"] for e in json.loads((tmp_path / "killed" / "history.json").read_text())["history"]] == [0, 1]
    main([*base, "--out", str(tmp_path / "killed"), "--resume"])
    again = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert _stable(again["history"]) == _stable(h["history"]) and again["test"] == h["test"]
    plans = [json.loads((tmp_path / d / "particlize.json").read_text())["plan"] for d in ("ref", "killed")]
    assert plans[0] == plans[1]
    with pytest.raises(SystemExit) as e:  # other settings do not resume it
        main([*base[:-2], "--batch-size", "8", "--out", str(tmp_path / "killed"), "--resume"])
    assert e.value.code == 1 and "other settings" in capsys.readouterr().err


def test_latency_target_and_latency_costs(dense, tmp_path, capsys):
    """--target-latency-ms beside --target-flops (both must be met) with --cost latency: the prices are measured
    once, at round 0, for the kinds pruned, and the run meets both targets."""
    folder, csv, *_ = dense
    main(["compress", str(folder), "--task", "text-csv", "--data", str(csv), "--target-flops", "0.6",
          "--target-latency-ms", "100000", "--cost", "latency", "--recover-epochs", "0", "--min-quality", "0",
          "--batch-size", "16", "--out", str(tmp_path / "run")])
    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert h["config"]["allocation"]["cost"] == "latency" and h["config"]["target"]["latency_ms"] == 100000
    prices = h["history"][0]["latency_prices"]
    assert set(prices) == {"head", "neuron"} and all(v > 0 for v in prices.values())
    assert all("latency_prices" not in e for e in h["history"][1:])
    assert h["outcome"]["target_met"] and h["history"][-1]["flops_ratio"] <= 0.6
    assert h["history"][-1]["latency_ms"] <= 100000 and "target met. Test:" in capsys.readouterr().out


def test_train_sora_command_saves_what_the_library_trains(tmp_path, capsys):
    """`particlize train-sora` (one step of the tiny preset) saves a loadable model whose weights are those of
    `train_sora` called with the same settings, and refuses to replace its folder without --force."""
    from particlize.models.sora import SpacetimeDiT
    from particlize.train_sora import train_sora

    args = ["train-sora", "--steps", "1", "--batch-size", "1", "--seed", "0", "--out", str(tmp_path / "cli")]
    main(args)
    assert "saved to" in capsys.readouterr().out
    got = pz.load(tmp_path / "cli")
    assert isinstance(got, SpacetimeDiT) and pz.io.read_meta(tmp_path / "cli")["extra"]["steps_done"] == 1
    want = pz.load(train_sora("tiny", 1, tmp_path / "lib", batch_size=1, seed=0))
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1 and "--force" in capsys.readouterr().err


def test_train_sora_command_overrides_the_preset_and_refuses_a_bad_patch(tmp_path, capsys):
    """``--patch/--dim/--depth/--heads`` reach the model; a patch that does not tile the video (or a ``--stop-at``
    past ``--steps``) is one clear line and exit 1, before anything is written; ``--stop-at`` cuts the schedule."""
    main(["train-sora", "--steps", "1", "--batch-size", "1", "--out", str(tmp_path / "p8"), "--patch", "1", "8", "8",
          "--dim", "32", "--depth", "1", "--heads", "2"])
    cfg = pz.load(tmp_path / "p8").config
    assert (cfg.patch, cfg.dim, cfg.depth, cfg.heads) == ((1, 8, 8), 32, 1, 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train-sora", "--steps", "1", "--out", str(tmp_path / "bad"), "--patch", "3", "4", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "does not tile" in err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as e:
        main(["train-sora", "--steps", "2", "--stop-at", "3", "--out", str(tmp_path / "late")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "--stop-at must be a step between 1 and steps (2), got 3" in err
    assert not (tmp_path / "late").exists()
    main(["train-sora", "--steps", "3", "--stop-at", "1", "--batch-size", "1", "--out", str(tmp_path / "cut"),
          "--dim", "16", "--depth", "1", "--heads", "2"])
    extra = pz.io.read_meta(tmp_path / "cut")["extra"]
    assert extra["steps_done"] == 1 and extra["stopped_early"] is True
