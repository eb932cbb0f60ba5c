"""The command line: `particlize inspect`, its outputs and its errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pandas as pd
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
