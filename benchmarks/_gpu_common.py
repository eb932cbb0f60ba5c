"""Shared parts of `gpu_check.py`: the run's settings, timing (CUDA events or perf_counter), interleaved
rounds, the models built from configs with seeded random weights, the synthetic VADER-like data, the
optional peers (Captum, Torch-Pruning) and the adapters for APIs that the issue needs and the library does
not have yet (each names the missing API in a ``TODO``).
"""

from __future__ import annotations

import glob
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

ARCH = HERE / "minilm_architectures.json"

# Token lengths (with [CLS]/[SEP], truncated at 64) of the 1,056 VADER movie-review test sentences under
# MiniLM's WordPiece tokenizer, counted once on 2026-12-04: {length: sentences}. Mean 26.6, median 25.5.
VADER_LENGTHS: dict[int, int] = {
    5: 2, 6: 2, 7: 10, 8: 15, 9: 11, 10: 17, 11: 24, 12: 23, 13: 29, 14: 26, 15: 30, 16: 26, 17: 26, 18: 27,
    19: 36, 20: 35, 21: 35, 22: 43, 23: 35, 24: 44, 25: 32, 26: 34, 27: 40, 28: 43, 29: 32, 30: 22, 31: 28,
    32: 31, 33: 29, 34: 24, 35: 23, 36: 28, 37: 19, 38: 12, 39: 21, 40: 21, 41: 13, 42: 12, 43: 9, 44: 14,
    45: 10, 46: 5, 47: 7, 48: 3, 49: 5, 50: 7, 51: 1, 52: 8, 53: 9, 54: 3, 57: 4, 58: 3, 59: 1, 60: 1, 61: 1,
    62: 1, 63: 2, 64: 2,
}


class MissingAPI(RuntimeError):
    """An API the issue needs that the library does not have yet (the row records it as its error)."""


@dataclass
class Settings:
    """Sizes of one run: the full GPU run of issue 29, or ``--small`` (tiny configs, a CPU smoke run)."""

    small: bool
    examples: int = 512
    batch_size: int = 64
    max_len: int = 64
    rounds: int = 2
    neuron_sample: int = 8  # neurons per layer the naive loop and Captum run (their cost is extrapolated)
    top_k: int = 50
    cut_shapes: dict[str, tuple[int, int]] = field(default_factory=lambda: {"fp32": (256, 128), "bf16": (32, 64)})
    cut_rounds: int = 7
    cut_reps: int = 20
    budgets: tuple[float, ...] = (0.5, 0.25, 0.125)
    multiples: tuple[int, ...] = (8, 64, 128)
    llama_shape: tuple[int, int] = (8, 512)
    taylor_shape: tuple[int, int] = (4, 256)
    llama_rounds: int = 7
    llama_reps: int = 10
    videos: int = 100
    steps: int = 50
    dit_rounds: int = 3

    @classmethod
    def make(cls, small: bool) -> "Settings":
        if not small:
            return cls(small=False)
        return cls(small=True, examples=16, batch_size=8, max_len=24, rounds=1, neuron_sample=2, top_k=5,
                   cut_shapes={"fp32": (4, 16), "bf16": (2, 16)}, cut_rounds=2, cut_reps=2, budgets=(0.5, 0.25),
                   multiples=(8, 64), llama_shape=(2, 32), taylor_shape=(2, 16), llama_rounds=2, llama_reps=2,
                   videos=2, steps=3, dit_rounds=2)


@dataclass
class Ctx:
    """What every row gets: the device, the sizes, and a cache for work shared by rows (the sweep)."""

    device: torch.device
    cfg: Settings
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed once per run (rows that share work read it from here); a failure is kept too, so
        the rows after it fail at once instead of repeating a long step that timed out."""
        if key not in self.cache:
            try:
                self.cache[key] = fn()
            except Exception as e:
                self.cache[key] = e
                raise
        got = self.cache[key]
        if isinstance(got, Exception):
            raise RuntimeError(f"shared step {key!r} failed in an earlier row: {type(got).__name__}: {got}")
        return got


# ---- timing --------------------------------------------------------------------------------------


def timed(ctx: Ctx, fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, fn())``: CUDA events after a synchronize on a GPU (the host work inside ``fn`` counts
    too: the end event is waited for), ``time.perf_counter`` on a CPU."""
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def interleaved(ctx: Ctx, sides: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every side, ``rounds`` rounds, the order rotated each round (a, b, c; b, c, a; ...)."""
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n].append(timed(ctx, sides[n])[0])
    return out


def paired(times: dict[str, list[float]], base: str, other: str) -> float:
    """Median over rounds of ``base / other`` (> 1: ``other`` is faster)."""
    return statistics.median(b / o for b, o in zip(times[base], times[other]))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_gib(ctx: Ctx) -> float | None:
    return torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None


def reset_peak(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


class ForwardTimer:
    """Seconds per forward of ``model`` on ``inputs``: eager, or replayed as a CUDA graph (``graph=True``)."""

    def __init__(self, ctx: Ctx, model: nn.Module, inputs: Any, graph: bool = False):
        self.ctx, self.model, self.x, self.graph = ctx, model, inputs, None
        with torch.inference_mode():
            for _ in range(3):
                self._eager()
            if graph:
                self.graph = capture(ctx.device, self._eager)

    def _eager(self) -> Any:
        return self.model(**self.x) if isinstance(self.x, dict) else self.model(self.x)

    def __call__(self, reps: int) -> float:
        def run() -> None:
            with torch.inference_mode():
                for _ in range(reps):
                    self.graph.replay() if self.graph is not None else self._eager()

        return timed(self.ctx, run)[0] / reps


def capture(device: torch.device, fn: Callable[[], Any]) -> Any:
    """A CUDA graph of ``fn`` on ``device`` (warmed up on a side stream first, as CUDA graph capture wants)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


# ---- models built from configs (seeded random weights) ------------------------------------------


def minilm_recipe(small: bool) -> dict[str, Any]:
    """The `TextClassifier` recipe of the project's MiniLM classifier (all-MiniLM-L6-v2's encoder config, as
    recorded in ``minilm_architectures.json``: 6 layers, 12 heads of 32, FFN 1536); ``small``: the same family
    at 2 layers, 4 heads of 16, FFN 128."""
    import json

    recipe = json.loads(ARCH.read_text())["recipe"]
    if small:
        enc = dict(recipe["encoder_config"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, vocab_size=1000, max_position_embeddings=64)
        recipe = dict(recipe, encoder_config=enc)
    return recipe


def build_classifier(small: bool, seed: int = 0) -> nn.Module:
    from particlize.models.text import TextClassifier

    torch.manual_seed(seed)
    return TextClassifier(**minilm_recipe(small)).eval()


def llama_config(small: bool) -> Any:
    from transformers import LlamaConfig

    if small:  # 16 query heads in 4 kv groups (smaller GQA shapes can hang Torch-Pruning: BENCHMARKING.md)
        return LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                           intermediate_size=704, vocab_size=1000, max_position_embeddings=256, use_cache=False)
    return LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                       intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, use_cache=False)


def build_llama(ctx: Ctx, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """TinyLlama-shaped LlamaForCausalLM (1.1B; ``--small``: 2 layers × 256), initialised on the device itself
    (a 1.1B random init on the host takes tens of seconds)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(ctx.device):
        model = LlamaForCausalLM(llama_config(ctx.cfg.small))
    return model.to(dtype).eval()


def llama_ids(ctx: Ctx, batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(ctx.device)


# ---- synthetic VADER-like data ------------------------------------------------------------------


def vader_like_batches(ctx: Ctx, vocab: int, seed: int = 0, sort: bool = False) -> list[Any]:
    """``Batch`` objects like the benchmark's VADER test batches: ``examples`` sentences whose token lengths are
    drawn from `VADER_LENGTHS` (clipped to ``max_len``), random WordPiece ids between [CLS] and [SEP], random
    binary labels, ``batch_size`` per batch in draw order ("split order") padded to the longest; ``sort``: the
    same sentences sorted by length first (the naive loop's best case)."""
    from particlize.analysis._common import as_batches

    cfg = ctx.cfg
    g = torch.Generator().manual_seed(seed)
    lens_all = torch.tensor([n for n, c in VADER_LENGTHS.items() for _ in range(c)])
    lens = lens_all[torch.randint(len(lens_all), (cfg.examples,), generator=g)]
    lens = (lens * cfg.max_len / 64).round().long().clamp(3, cfg.max_len).tolist()  # --small: the same shape, shorter
    ids = [torch.randint(min(1000, vocab // 2), vocab - 1, (n,), generator=g) for n in lens]
    labels = torch.randint(0, 2, (cfg.examples,), generator=g)
    order = sorted(range(cfg.examples), key=lambda i: (lens[i], i)) if sort else list(range(cfg.examples))
    out = []
    for s in range(0, cfg.examples, cfg.batch_size):
        idx = order[s:s + cfg.batch_size]
        T = max(lens[i] for i in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        m = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :lens[i]] = ids[i]
            x[r, 0], x[r, lens[i] - 1] = 101 % vocab, 102 % vocab  # [CLS] ... [SEP]
            m[r, :lens[i]] = 1
        out.append(({"input_ids": x, "attention_mask": m}, labels[torch.tensor(idx)]))
    return as_batches(out, device=ctx.device)


def length_stats(batches: list[Any]) -> dict[str, Any]:
    pad = sum(int(b.inputs["input_ids"].numel()) for b in batches)
    real = sum(int(b.inputs["attention_mask"].sum()) for b in batches)
    return {"batches": len(batches), "padded_tokens": pad, "real_tokens": real, "padding_overhead": pad / real}


# ---- peers ---------------------------------------------------------------------------------------


def add_wheels(folder: str | None) -> list[str]:
    """Put every ``*.whl`` in ``folder`` on ``sys.path`` (pure-Python wheels import from the zip: carry the
    Captum and Torch-Pruning wheels to a machine without pip access)."""
    if not folder:
        return []
    wheels = sorted(glob.glob(str(Path(folder) / "*.whl")))
    missing = [p for p in ("captum", "torch_pruning") if not any(Path(w).name.startswith(p + "-") for w in wheels)]
    if missing:  # asked for the peers and would silently run without them: say so before any GPU time is spent
        raise SystemExit(f"--wheels {folder}: no {' or '.join(missing)} wheel there; run `make gpu-wheels` first "
                         f"(or leave --wheels out to run without the peers)")
    for w in wheels:
        if w not in sys.path:
            sys.path.append(w)
    return wheels


def peer(name: str) -> tuple[Any, str | None]:
    """``(module, None)`` or ``(None, why not)`` for ``"captum"`` / ``"torch_pruning"``."""
    try:
        mod = __import__(name)
        if name == "captum":
            import captum.attr  # noqa: F401
        return mod, None
    except Exception as e:  # an absent or broken peer leaves its column empty, with the reason
        return None, f"{name} not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def version(mod: Any) -> str | None:
    return getattr(mod, "__version__", None) if mod is not None else None


# ---- adapters: APIs issue 29 needs that are not in the library yet -------------------------------


def device_round_to(device: torch.device, dtype: torch.dtype) -> int | None:
    """The width multiple the library chooses for ``device`` / ``dtype`` when ``round_to`` is not given
    (`particlize.allocate.default_round_to`: none on a CPU, 8 for fp32 and 64 for bf16/fp16 on CUDA; the
    ``round_to`` row measures 8 / 64 / 128 against it)."""
    from particlize.allocate import default_round_to

    return default_round_to(device.type, dtype)


def kv_head_groups(pm: Any) -> list[Any]:
    """Key/value-head groups of a decomposed GQA model (kind ``kv_head``: one particle per key/value head, with its
    k/v rows, its query heads' q rows and their o_proj columns). A model without grouped-query attention has
    none (its ``heads`` already own their key/value rows): that is an error here, the row needs GQA."""
    groups = pm.select("kv_head")
    if not groups:
        raise ValueError(f"{type(pm.model).__name__} has no key/value-head groups: it has no grouped-query attention")
    return groups


def scale_widths(widths: list[list[int]], heads: int, neurons: int, small: bool) -> list[list[int]]:
    """MiniLM's recorded ``[[heads, neurons], ...]`` (of 12 heads, 1536 neurons) scaled to a model with ``heads``
    and ``neurons`` per layer (``--small``; unchanged otherwise), each layer keeping at least one of each."""
    if not small:
        return widths
    return [[max(1, round(h * heads / 12)), max(1, round(n * neurons / 1536))] for h, n in widths][:2]


def round_widths(widths: list[list[int]], multiple: int, head_dim: int, heads: int, neurons: int) -> list[list[int]]:
    """``[[heads, neurons], ...]`` rounded up so each layer's kept features are multiples of ``multiple`` (a head
    counts ``head_dim`` features), as ``AllocationConfig.round_to`` keeps them, capped at the dense widths."""
    step_h = multiple // math.gcd(multiple, head_dim)
    up = lambda n, s, cap: min(cap, -(-n // s) * s)  # noqa: E731
    return [[up(h, step_h, heads), up(n, multiple, neurons)] for h, n in widths]
