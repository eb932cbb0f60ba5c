"""The rough edges a new user hits in the command line (issue 28): Ctrl-C, defaults said out loud, one meaning
of MODEL, one spelling per option, --resume, help text, error wording, --json."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import particlize as pz
from particlize.analysis._progress import progress_for
from particlize.cli import COMMANDS, INTERRUPTED, app, main
from particlize.cli import _common, analyze_cmd, compress_cmd, train_cmd

FACTORY = textwrap.dedent("""
    import torch
    from transformers import BertConfig, BertModel

    def small_bert():
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=24, max_position_embeddings=16))

    def interrupted():  # what Ctrl-C does while a model loads
        import os, signal, time
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(500):  # still loading: Python raises KeyboardInterrupt at its next check, not always at once
            time.sleep(0.01)
""")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


@pytest.fixture
def factory(tmp_path):
    f = tmp_path / "models.py"
    f.write_text(FACTORY)
    return f"{f}:small_bert"


@pytest.fixture
def dense(trained_text):
    work, *_ = trained_text
    return str(work / "dense"), str(work / "s.csv")


def _exit(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


# ---- 1. Ctrl-C ------------------------------------------------------------------------------------------------


def test_a_real_sigint_exits_130_with_one_line_and_no_output(tmp_path, capsys):
    """SIGINT sent to this process while the model loads (in-process: the suite stays fast)."""
    (tmp_path / "models.py").write_text(FACTORY)
    out = tmp_path / "table.csv"
    assert _exit(["inspect", f"{tmp_path / 'models.py'}:interrupted", "--out", str(out)]) == INTERRUPTED == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted"]
    assert not out.exists() and not list(tmp_path.glob(".table.csv*"))


@pytest.mark.slow
def test_sigint_exits_130_with_one_line_and_no_output(tmp_path):
    """A real SIGINT (sent while the model loads): exit status 130, one line, no output file."""
    (tmp_path / "models.py").write_text(FACTORY)
    out = tmp_path / "table.csv"
    r = subprocess.run([sys.executable, "-m", "particlize", "inspect", f"{tmp_path / 'models.py'}:interrupted",
                        "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == INTERRUPTED == 130
    assert r.stderr.strip() == "interrupted" and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".table.csv*"))


@pytest.mark.parametrize("command, module, target", [
    ("train", train_cmd, "fine_tune"), ("compress", compress_cmd, "run_compress"), ("sweep", compress_cmd, "run_sweep"),
])
def test_ctrl_c_leaves_no_half_written_folder(dense, tmp_path, monkeypatch, capsys, command, module, target):
    folder, csv = dense
    out = tmp_path / "out"

    def half_written(*args, **kwargs):
        out.mkdir()
        (out / "part.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(module, target, half_written)
    assert _exit([command, folder, "--task", "text-csv", "--data", csv, "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted"]
    assert not out.exists()


def test_ctrl_c_keeps_a_resumable_compress_run(dense, tmp_path, monkeypatch, capsys):
    folder, csv = dense
    out = tmp_path / "run"

    def one_round_done(*args, **kwargs):
        out.mkdir()
        (out / "history.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(compress_cmd, "run_compress", one_round_done)
    assert _exit(["compress", folder, "--task", "text-csv", "--data", csv, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted;") and "--resume" in err[0]
    assert (out / "history.json").is_file()


# ---- 3. the default target, said ------------------------------------------------------------------------------


def test_compress_says_its_default_target(tmp_path, capsys):
    res = CliRunner().invoke(app, ["compress", "--help"], terminal_width=400)
    assert "(default: 50% of the FLOPs)" in " ".join(res.output.split())
    assert _exit(["compress", "minilm", "--task", "text-csv", "--out", str(tmp_path / "r")]) == 1  # no --data
    out = " ".join(capsys.readouterr().out.split())
    assert "no target given: aiming at 50% of the dense model's FLOPs (--target-flops 0.5" in out
    assert not (tmp_path / "r").exists()


# ---- 4. MODEL means the same everywhere -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickle_files_are_refused_by_name(tmp_path, capsys, suffix):
    f = tmp_path / f"weights{suffix}"
    f.write_bytes(b"\x80\x04")
    assert _exit(["inspect", str(f)]) == 1
    err = capsys.readouterr().err
    assert "pickle files are refused" in err and "convert to safetensors" in err and "not found" not in err


def test_reference_cnns_resolve_in_every_command(capsys):
    from particlize.sources import load_model

    assert type(load_model("simple-cnn")).__name__ == "SimpleCNN" and type(load_model("resnet")).__name__ == "ResNet"
    main(["inspect", "simple-cnn", "--json"])
    assert json.loads(capsys.readouterr().out)["model"] == "SimpleCNN"


def test_train_fine_tunes_a_particlize_folder(dense, tmp_path, capsys):
    """A compressed (here: pruned) model saved by particlize is a MODEL `train` fine-tunes as it is."""
    folder, csv = dense
    model = pz.load(folder)
    pm = pz.decompose(model)
    heads = next(g for g in pm.groups if g.kind == "head")
    pz.save(pm.prune({heads.name: [0]}), tmp_path / "small", tokenizer=None, force=True)
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if os.path.exists(os.path.join(folder, f)):
            (tmp_path / "small" / f).write_bytes(open(os.path.join(folder, f), "rb").read())
    main(["train", str(tmp_path / "small"), "--task", "text-csv", "--data", csv, "--epochs", "1", "--limit", "32",
          "--batch-size", "16", "--out", str(tmp_path / "tuned")])
    assert "test accuracy" in capsys.readouterr().out
    tuned = pz.load(tmp_path / "tuned")
    assert pz.decompose(tuned)[heads.name].size == heads.size - 1


# ---- 5. one spelling per option -------------------------------------------------------------------------------


def test_old_spellings_still_work_and_say_so(factory, tmp_path, capsys):
    main(["inspect", factory, "--csv", str(tmp_path / "a.csv")])
    assert "--csv is now --out" in capsys.readouterr().err
    main(["inspect", factory, "--out", str(tmp_path / "b.csv")])
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert _exit(["inspect", factory, "--csv", "x.csv", "--out", "y.csv"]) == 1
    assert "give only --out" in capsys.readouterr().err


def test_granularity_comma_or_repeated_singular_or_plural():
    assert _common.kinds_list(["heads,neuron"]) == _common.kinds_list(["head", "neurons"]) == ("heads", "neurons")
    with pytest.raises(pz.ParticlizeError, match="unknown granularity 'layers'"):
        _common.kinds_list(["layers"])
    assert analyze_cmd._groups(["heads,neurons"]) == analyze_cmd._groups(["head", "neuron"]) == ["head", "neuron"]


def test_every_model_command_has_device_out_and_the_same_scorer_set():
    runner = CliRunner()
    helps = {c: " ".join(runner.invoke(app, [c, "--help"], terminal_width=400).output.split()) for c in COMMANDS}
    for c in ("analyze", "train", "compress", "sweep", "train-sora", "moefy"):  # inspect only counts, runs nothing
        assert "--device" in helps[c], c
    for c in ("inspect", "analyze", "train", "compress", "sweep", "train-sora", "moefy"):
        assert "--out PATH" in helps[c], c
    assert "--csv" not in helps["inspect"] and "--method" not in helps["analyze"]  # hidden old names
    scorers = [s for s in pz.analysis.scorers()]
    for c in ("analyze", "compress", "sweep"):
        assert all(f"{s}:" in helps[c] for s in scorers), c
    assert "loss, accuracy, logit_diff, kl or mse" in helps["analyze"]


# ---- 6. --resume ----------------------------------------------------------------------------------------------


def test_resume_force_finished_run_and_changed_settings(dense, tmp_path, capsys):
    folder, csv = dense
    base = ["compress", folder, "--task", "text-csv", "--data", csv, "--target-flops", "0.8", "--max-fraction", "1",
            "--recover-epochs", "0", "--min-quality", "0", "--batch-size", "16", "--out", str(tmp_path / "run")]
    assert _exit([*base, "--resume", "--force"]) == 1
    assert "pass only one of them" in capsys.readouterr().err and not (tmp_path / "run").exists()
    main(base)
    first = capsys.readouterr().out
    main([*base, "--resume"])  # finished already: the same summary, every round in the table
    again = capsys.readouterr().out
    rows = [ln for ln in again.splitlines() if ln.startswith("│")]
    assert len(rows) >= 2 and rows == [ln for ln in first.splitlines() if ln.startswith("│")]
    assert "target met. Test:" in again
    assert _exit([*base[:-4], "--batch-size", "8", "--out", str(tmp_path / "run"), "--resume"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "--batch-size was 16, now 8" in err and "other settings" in err


# ---- 7. help --------------------------------------------------------------------------------------------------


def test_help_reads_like_a_cli():
    runner = CliRunner()
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"particlize {pz.__version__}"
    assert runner.invoke(app, ["-h"]).output == runner.invoke(app, ["--help"]).output
    for c in COMMANDS:
        res = runner.invoke(app, [c, "-h"], terminal_width=200)
        assert res.exit_code == 0, c
        text = res.output
        assert "{" not in text.splitlines()[0] and "(1/3)" not in text, (c, text)
        assert not re.search(r"<[a-z\[\], ]+>", text), (c, text)  # no "<list[str]>" / "<path>" type labels


# ---- 8. CLI words in errors -----------------------------------------------------------------------------------


def test_errors_speak_in_flags():
    from typer.main import get_command

    cmd = get_command(app).commands["compress"]
    assert _common.cli_spelling("out exists; pass force=True (CLI: --force) to replace it", cmd.params) == \
        "out exists; pass --force to replace it"
    assert _common.cli_spelling("give a target: target_flops, target_params (fractions)", cmd.params) == \
        "give a target: --target-flops, --target-params (fractions)"
    assert _common.cli_spelling("method 'x' has no per-example scores; use by=None", []) == \
        "method 'x' has no per-example scores; use no --by"
    assert _common.cli_spelling("select such groups (groups='head')", []) == "select such groups (--groups head)"


def test_by_is_validated_before_anything_runs(tmp_path, capsys):
    assert _exit(["analyze", "minilm", "--task", "nope", "--by", "bogus", "--out", str(tmp_path / "s.csv")]) == 1
    assert "--by takes example or class, not 'bogus'" in capsys.readouterr().err


def test_a_failed_step_leaves_no_progress_line(capsys):
    with pytest.raises(pz.ParticlizeError):
        with _common.progress_bar("scoring") as bar:
            bar(1, 4, "batch 1")
            raise pz.ParticlizeError("bad data")
    assert "scoring" not in capsys.readouterr().err
    with _common.progress_bar("scoring") as bar:  # a step that ends well keeps its line
        bar(4, 4)
    assert "scoring" in capsys.readouterr().err


# ---- 9. clear errors from the Python API ----------------------------------------------------------------------


def test_python_api_errors_are_particlize_errors():
    import torch
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=16)
    with torch.device("meta"):
        meta = BertModel(cfg)
    with pytest.raises(pz.ParticlizeError, match="meta device"):
        pz.decompose(meta).table()
    with pytest.raises(pz.ParticlizeError, match="takes a torch.nn.Module, got int"):
        pz.decompose(42)
    torch.manual_seed(0)
    pm = pz.decompose(BertModel(cfg))
    blocks = next(g for g in pm.groups if g.kind == "block")
    with pytest.raises(pz.PlanError, match="no layers; keep at least one block"):
        pm.prune({blocks.name: list(range(blocks.size))})
    assert len(pm.prune({blocks.name: [0]}).encoder.layer) == 1
    from particlize.models.vision import ResNet  # a stage may lose all its residual blocks: its downsampling one stays

    net = ResNet(num_classes=3, widths=(4, 8), blocks_per_stage=(2, 2)).eval()
    x = torch.randn(2, 1, 8, 8)
    pm = pz.decompose(net, example_inputs=x)
    stage = next(g for g in pm.groups if g.kind == "block")
    small = pm.prune({stage.name: list(range(stage.size))})
    with torch.no_grad(), pm.ablate({stage.name: list(range(stage.size))}):
        torch.testing.assert_close(small(x), net(x))


# ---- 10. progress and --json ----------------------------------------------------------------------------------


def test_analyze_progress_is_optional(capsys):
    import torch

    from conftest import hf_model

    model, x = hf_model("bert")
    data = [(x, torch.tensor([0, 1, 2]))]
    calls = []
    with_cb = pz.analyze(model, data, "ablation", groups="head", progress=lambda d, t, w: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1]
    quiet = pz.analyze(model, data, "ablation", groups="head")  # stderr is not a terminal here: silent
    assert capsys.readouterr().err == ""
    shown = pz.analyze(model, data, "ablation", groups="head", progress=True)
    assert capsys.readouterr().err.strip() == ""  # the bar is transient: gone once done
    with progress_for(None, "x") as none, progress_for(False, "x") as off, progress_for(True, "x") as on:
        assert none is None and off is None and callable(on)
    pd.testing.assert_frame_equal(with_cb, quiet)
    pd.testing.assert_frame_equal(quiet, shown)


def test_json_output(factory, dense, tmp_path, capsys):
    main(["inspect", factory, "--json", "--out", str(tmp_path / "t.csv")])
    data = json.loads(capsys.readouterr().out)  # stdout is one JSON document, nothing else
    assert data["params"] == 5312 and {g["kind"] for g in data["groups"]} == {"head", "neuron", "block"}
    assert sum(g["count"] for g in data["groups"]) == len(pd.read_csv(tmp_path / "t.csv"))
    folder, csv = dense
    main(["analyze", folder, "--task", "text-csv", "--data", csv, "--top", "3", "--groups", "heads", "--json",
          "--limit", "64", "--out", str(tmp_path / "top.csv")])
    got = json.loads(capsys.readouterr().out)
    table = pd.read_csv(tmp_path / "top.csv")
    assert [r["index"] for r in got["top"]] == table["index"].tolist() and got["scorer"] == "ablation"
    main(["compress", folder, "--task", "text-csv", "--data", csv, "--target-flops", "0.8", "--max-fraction", "1",
          "--recover-epochs", "0", "--min-quality", "0", "--batch-size", "16", "--json", "--out", str(tmp_path / "run")])
    summary = json.loads(capsys.readouterr().out)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert summary["target_met"] and [r["round"] for r in summary["rounds"]] == [e["round"] for e in history["history"]]
    assert summary["test"] == {k: v for k, v in history["test"].items() if isinstance(v, (int, float))}


# ---- issue 27: analyze --nproc --------------------------------------------------------------------------------


def _same_table(one: pd.DataFrame, two: pd.DataFrame) -> None:
    assert len(one) > 0 and set(one.kind) == {"head", "neuron", "block"}
    pd.testing.assert_frame_equal(one.drop(columns="score"), two.drop(columns="score"))
    assert two.score.to_numpy() == pytest.approx(one.score.to_numpy(), abs=1e-5)


ARGS = ["--scorer", "ablation", "--limit", "48", "--batch-size", "16"]


def test_the_ranks_of_analyze_nproc_gather_the_single_process_table(dense, tmp_path):
    """`analyze --nproc 2`'s rank function on 2 gloo processes (forked here, to keep the suite fast) gathers the
    table one process writes."""
    from particlize.parallel import launch

    folder, csv = dense
    main(["analyze", folder, "--task", "text-csv", "--data", csv, *ARGS, "--out", str(tmp_path / "one.csv")])
    setting = (folder, "text-csv", csv, "text", "label", "val", 48, 16, 64, False)
    options = {"metric": "loss", "mode": "zero", "by": None}
    rows = launch(analyze_cmd._analyze_rank, 2, setting, "ablation", None, options, timeout=120, start_method="fork")
    assert rows[1] is None
    rows[0][0].to_csv(tmp_path / "two.csv", index=False)  # as the command writes it
    _same_table(pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv"))


@pytest.mark.slow
def test_analyze_nproc_command_writes_the_single_process_table(dense, tmp_path):
    folder, csv = dense
    args = ["analyze", folder, "--task", "text-csv", "--data", csv, *ARGS]
    main([*args, "--out", str(tmp_path / "one.csv")])
    r = subprocess.run([sys.executable, "-m", "particlize", *args, "--nproc", "2", "--out", str(tmp_path / "two.csv")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    _same_table(pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv"))


@pytest.mark.parametrize("args, message", [
    pytest.param(["compress", "minilm", "--task", "nope", "--device", "cuda", "--out", "{out}"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")),
    (["analyze", "minilm", "--task", "nope", "--top", "3", "--nproc", "2", "--out", "{out}"], "drop --nproc"),
])
def test_options_that_cannot_go_together_say_so_first(tmp_path, capsys, args, message):
    assert _exit([a.replace("{out}", str(tmp_path / "o")) for a in args]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()
