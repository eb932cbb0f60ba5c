"""The command line: `particlize inspect`, its outputs and its errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pandas as pd
import torch
import pytest

from particlize.cli import main

FACTORY = textwrap.dedent("""
    import torch
    from transformers import BertConfig, BertModel

    def small_bert():
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=24, max_position_embeddings=16))
""")


@pytest.fixture
def factory(tmp_path):
    f = tmp_path / "models.py"
    f.write_text(FACTORY)
    return f"{f}:small_bert"


def test_inspect_prints_groups_and_writes_table(factory, tmp_path, capsys):
    csv = tmp_path / "t" / "particles.csv"
    main(["inspect", factory, "--csv", str(csv)])
    out = capsys.readouterr().out
    assert "encoder.layer.1.attention.heads" in out and "encoder.layer.blocks" in out
    df = pd.read_csv(csv)
    assert len(df) == 2 * 2 + 2 * 24 + 2
    assert {"group", "kind", "layer", "index", "params", "flops", "writer_norm", "reader_norm"} <= set(df.columns)


def test_inspect_refuses_to_overwrite(factory, tmp_path, capsys):
    csv = tmp_path / "particles.csv"
    csv.write_text("precious")
    with pytest.raises(SystemExit) as e:
        main(["inspect", factory, "--csv", str(csv)])
    assert e.value.code == 1
    assert "--force" in capsys.readouterr().err
    assert csv.read_text() == "precious"
    main(["inspect", factory, "--csv", str(csv), "--force"])
    assert csv.read_text().startswith("group,")


@pytest.mark.parametrize(
    "spec, message",
    [("does-not-exist", "not found"), ("missing.py:f", "no such file")],
)
def test_bad_model_is_one_line_and_nonzero(spec, message):
    r = subprocess.run([sys.executable, "-m", "particlize.cli", "inspect", spec], capture_output=True, text=True)
    assert r.returncode == 1
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_factory_returning_wrong_type(tmp_path, capsys):
    f = tmp_path / "bad.py"
    f.write_text("def f():\n    return 3\n")
    with pytest.raises(SystemExit) as e:
        main(["inspect", f"{f}:f"])
    assert e.value.code == 1
    assert "not a torch.nn.Module" in capsys.readouterr().err


def test_usage_error_exit_code():
    r = subprocess.run([sys.executable, "-m", "particlize.cli", "inspect"], capture_output=True, text=True)
    assert r.returncode == 2 and "Missing argument" in r.stderr


@pytest.mark.slow
def test_inspect_minilm(tmp_path, capsys):
    csv = tmp_path / "m.csv"
    main(["inspect", "minilm", "--csv", str(csv)])
    df = pd.read_csv(csv)
    assert (df.kind == "head").sum() == 72 and (df.kind == "neuron").sum() == 9216 and (df.kind == "block").sum() == 6


# ---- train and analyze on a tiny text task ---------------------------------------------------------


@pytest.fixture
def tiny_text(tmp_path):
    """A tiny BERT encoder folder with its tokenizer, and a learnable sentiment CSV."""
    import transformers as T

    from test_train import NEUTRAL, tiny_config
    from test_tasks import tiny_tokenizer, write_csv

    tok = tiny_tokenizer(tmp_path / "tok")
    enc = tmp_path / "encoder"
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**tiny_config(len(tok)))).save_pretrained(enc)
    tok.save_pretrained(enc)
    rows = [(f"{NEUTRAL[i % len(NEUTRAL)]} {'good' if i % 2 else 'awful'}", "pos" if i % 2 else "neg") for i in range(80)]
    return enc, write_csv(tmp_path / "s.csv", rows)


def test_train_then_analyze_by_class(tiny_text, tmp_path, capsys):
    enc, csv = tiny_text
    out = tmp_path / "clf"
    main(["train", str(enc), "--task", "text-csv", "--data", str(csv), "--out", str(out), "--epochs", "1",
          "--batch-size", "16", "--lr", "1e-3"])
    assert "test accuracy" in capsys.readouterr().out
    scores = tmp_path / "scores.csv"
    main(["analyze", str(out), "--task", "text-csv", "--data", str(csv), "--method", "ablation", "--by", "class",
          "--groups", "head", "--out", str(scores)])
    df = pd.read_csv(scores)
    assert set(df.class_name) == {"neg", "pos"} and len(df) == 2 * 2 * 4
    assert {"group", "index", "score", "params", "flops"} <= set(df.columns)
    # --top K: the exact top K by ablation (screened, then a shortlist ablated) = the full sweep's top K
    full, best = tmp_path / "full.csv", tmp_path / "top.csv"
    base = ["analyze", str(out), "--task", "text-csv", "--data", str(csv), "--groups", "head", "--groups", "neuron"]
    main([*base, "--method", "ablation", "--out", str(full)])
    main([*base, "--top", "4", "--out", str(best)])
    assert "particles ablated exactly (screened by taylor-norm)" in capsys.readouterr().out
    want, got = pd.read_csv(full).nlargest(4, "score"), pd.read_csv(best)
    assert list(zip(got.group, got["index"])) == list(zip(want.group, want["index"])) and list(got["rank"]) == [1, 2, 3, 4]
    assert got.score.to_numpy() == pytest.approx(want.score.to_numpy(), abs=1e-5)
    assert got.params.tolist() == want.params.tolist() and got.flops.tolist() == want.flops.tolist()
    with pytest.raises(SystemExit) as e:  # never overwritten without --force
        main(["analyze", str(out), "--task", "text-csv", "--data", str(csv), "--out", str(scores)])
    assert e.value.code == 1
    with pytest.raises(SystemExit) as e:  # the trained folder is never overwritten either
        main(["train", str(enc), "--task", "text-csv", "--data", str(csv), "--out", str(out)])
    assert e.value.code == 1 and "force" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "text-csv"], "needs --data"),
        (["--task", "nope"], "unknown task"),
        (["--task", "text-csv", "--data", "{csv}", "--method", "bogus"], "unknown method"),
        (["--task", "nope", "--method", "bogus"], "unknown method"),  # checked before the task is even looked up
        (["--task", "text-csv", "--data", "{csv}", "--mode", "noise"], "unknown mode"),
        (["--task", "text-csv", "--data", "{csv}", "--metric", "f1"], "unknown metric"),
        (["--task", "text-csv", "--data", "{csv}", "--device", "cuda"], "no CUDA GPU"),
        (["--task", "text-csv", "--data", "{csv}", "--top", "5", "--by", "class"], "drop --by"),
        (["--task", "text-csv", "--data", "{csv}", "--top", "5", "--method", "ablation"], "names its screen"),
    ],
)
def test_analyze_errors(tiny_text, tmp_path, capsys, args, message):
    enc, csv = tiny_text
    if message == "no CUDA GPU":
        import torch as _t

        if _t.cuda.is_available():
            pytest.skip("a GPU is present")
    args = [a.replace("{csv}", str(csv)) for a in args]
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(enc), *args, "--out", str(tmp_path / "scores.csv")])
    assert e.value.code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "scores.csv").exists()


def test_compress_command_end_to_end(tiny_text, tmp_path, capsys):
    """`particlize compress` on a trained folder: meets the FLOPs target with layer-wise distillation,
    writes a loadable model and history.json, and never replaces a run folder without --force."""
    import json

    import particlize as pz

    enc, csv = tiny_text
    clf = tmp_path / "clf"
    main(["train", str(enc), "--task", "text-csv", "--data", str(csv), "--out", str(clf), "--epochs", "1",
          "--batch-size", "16", "--lr", "1e-3"])
    run = tmp_path / "run"
    args = ["compress", str(clf), "--task", "text-csv", "--data", str(csv), "--target-flops", "0.6", "--max-fraction", "0.5",
            "--min-quality", "0", "--hidden-weight", "1.0", "--val-every", "0.5", "--batch-size", "16",
            "--final-recover-epochs", "1", "--out", str(run)]
    main(args)
    printed = capsys.readouterr().out
    assert "target met; then 1 final recovery chunk" in printed and "(final recovery 1)" in printed
    h = json.loads((run / "history.json").read_text())
    assert h["done"] and h["config"]["recovery"]["hidden_weight"] == 1.0 and h["history"][-1]["flops_ratio"] <= 0.6 + 1e-9
    assert h["config"]["recovery"]["final_epochs"] == 1 and h["history"][-1]["final_recovery"] == 1
    assert h["config"]["recovery"]["val_every"] == 0.5 and all(e["recovery"]["validations"] in (1, 2) for e in h["history"][1:])
    small = pz.load(run)
    assert sum(p.numel() for p in small.parameters()) == h["history"][-1]["params"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1 and "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*args[:-2], "--hidden-weight", "-1", "--out", str(tmp_path / "other")])
    assert e.value.code == 2 and not (tmp_path / "other").exists()
    with pytest.raises(SystemExit) as e:  # a diffusion-step window means nothing to a text classifier
        main([*args[:-2], "--recover-focus", "490", "795", "--out", str(tmp_path / "other")])
    assert e.value.code == 1 and "video diffusion tasks" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_sweep_command_table_and_unreachable_targets(tmp_path, capsys):
    """`particlize sweep` prints one row per (granularity, target) and says which targets a granularity cannot
    reach alone; `particlize compress` refuses such a target before writing anything."""
    from loop_fixture import make

    make(tmp_path)
    dense, csv = tmp_path / "dense", tmp_path / "s.csv"
    out = tmp_path / "sw"
    args = ["sweep", str(dense), "--task", "text-csv", "--data", str(csv), "--granularity", "heads",
            "--granularity", "neurons", "--granularity", "channels", "--flops", "0.8,0.3", "--recover-epochs", "0.2",
            "--min-width", "0.25", "--batch-size", "16", "--out", str(out)]
    main(args)
    printed = " ".join(capsys.readouterr().out.split())  # the table wraps long notes
    assert "the least neurons alone allow" in printed and "speedup" in printed
    assert "neurons → 30% of FLOPs (the least neurons alone allow:" in printed
    assert printed.count("channels") >= 2 and "nothing to prune" in printed.replace("│", "")
    df = pd.read_csv(out / "sweep.csv")
    assert len(df) == 6 and df.error.notna().sum() == 2 and (out / "pareto.png").is_file()
    low = df[(df.granularity == "neurons") & (df.target_flops == 0.3)].iloc[0]
    assert not low.reached and low.flops_ratio > 0.3 and low.reason.startswith("ran to") and "min_width 0.25" in low.reason
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1 and "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compress", str(dense), "--task", "text-csv", "--data", str(csv), "--target-flops", "0.3",
              "--granularity", "neurons", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "target FLOPs 0.3 is below" in err and not (tmp_path / "run").exists()


def test_compress_compensate_records_the_verb_and_loads(tmp_path, capsys):
    """`--compensate merge`: the saved run's plan holds merge steps before the prunes and loads back to the
    same outputs; an unknown compensation is refused before anything is written."""
    import json

    import torch

    import particlize as pz
    from loop_fixture import make

    make(tmp_path)
    dense, csv = tmp_path / "dense", tmp_path / "s.csv"
    base = ["compress", str(dense), "--task", "text-csv", "--data", str(csv), "--target-flops", "0.6", "--max-fraction", "1",
            "--min-quality", "0", "--recover-epochs", "0", "--batch-size", "16"]
    with pytest.raises(SystemExit) as e:
        main([*base, "--compensate", "zip", "--out", str(tmp_path / "bad")])
    assert e.value.code == 1 and "compensate must be one of none, bias, merge, refit" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    main([*base, "--compensate", "merge", "--out", str(tmp_path / "run")])
    plan = json.loads((tmp_path / "run" / "particlize.json").read_text())["plan"]
    verbs = [s["verb"] for s in plan]
    assert "merge" in verbs and verbs.index("merge") < verbs.index("prune")
    small = pz.load(tmp_path / "run")
    assert [s.verb for s in pz.plan.model_plan(small)] == verbs
    x = {"input_ids": torch.randint(1, 10, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(small(**x), pz.load(tmp_path / "run")(**x))


def test_compress_says_when_the_target_is_not_met_and_exits_3(tmp_path, capsys):
    """A run that ends short of its target (here: no round meets a floor above the dense model's quality) saves the
    model it returns, says `target NOT met: stopped at … because …` and exits with status 3, apart from errors (1)
    and usage errors (2); `history.json` records the outcome."""
    import json

    import particlize as pz
    from loop_fixture import make

    make(tmp_path)
    dense, csv = tmp_path / "dense", tmp_path / "s.csv"
    args = ["compress", str(dense), "--task", "text-csv", "--data", str(csv), "--target-flops", "0.6", "--max-fraction", "1",
            "--recover-epochs", "0", "--batch-size", "16", "--min-quality", "1.5", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        main(args)
    printed = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 3
    assert "target NOT met: stopped at 100.0% of the FLOPs (target 60.0%) because round 1 (" in printed
    assert "no round met it, so the dense model (round 0) is returned" in printed and "(below the floor)" in printed
    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert h["done"] and h["outcome"]["target_met"] is False and h["outcome"]["returned_round"] == 0
    assert h["outcome"]["below_floor"] == [1] and h["reason"].startswith("target NOT met")
    assert sum(p.numel() for p in pz.load(tmp_path / "run").parameters()) == h["history"][0]["params"]
    main([*args[:-4], "--min-quality", "0", "--out", str(tmp_path / "met")])  # met: status 0, no exception
    assert "target met. Test:" in capsys.readouterr().out
