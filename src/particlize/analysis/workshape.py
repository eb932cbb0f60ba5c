"""How the exact-ablation engine shapes its work on a device: which batches it runs and how many rows go into
one forward.

On a CPU a forward costs about what its arithmetic costs, so padding is work thrown away: padded batches are
split into one sub-batch per real length, and forwards stay small enough for their activations to stay in
cache (`CPU_ROWS`). On a GPU a small forward costs its kernel launches, whatever its size: splitting a
batch of 64 sentences by length turned 72 heads into 2,105 forwards (issue 29's profile) and ran slower than
the naive loop. There the engine keeps few, large length buckets (one per `GPU_BUCKET_EXAMPLES` examples, at
most `GPU_MAX_BUCKETS`; none for small batches) and sizes the rows of a forward to the free memory.

`work_shape` is the policy, a pure function of what it is told; `shape_for` asks a model and its batches
those questions. ``ablation_effects`` uses them when the caller leaves ``split`` / ``max_rows`` unset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._common import Batch, call, device_of, map_tensors, per_example_metric

CPU_ROWS = 128  # measured on MiniLM: 64–128 rows ran ~25% faster per particle than 1024 (cache)
GPU_MIN_ROWS, GPU_MAX_ROWS = 256, 16384  # rows per forward on an accelerator, whatever the memory says
GPU_DEFAULT_ROWS = 1024  # when the free memory is not known
GPU_BUCKET_EXAMPLES = 32  # one length bucket per this many examples of a batch ...
GPU_MAX_BUCKETS = 4  # ... and at most this many
GPU_MEMORY_SHARE = 0.25  # of the free memory, for the activations of one forward


@dataclass(frozen=True)
class WorkShape:
    """``split``: True (one sub-batch per real length), an int ``k`` > 1 (at most ``k`` length buckets, each
    padded to its longest example) or False (batches as they are); ``rows``: rows (example × particle) of
    one ablation forward."""

    split: bool | int
    rows: int


def work_shape(device_type: str, dtype: torch.dtype, batch: int, seq: int, *, free_bytes: int | None = None,
               floats_per_token: int = 4096) -> WorkShape:
    """The engine's work shape for batches of ``batch`` examples of ``seq`` positions (tokens, pixels) on a
    ``device_type`` device running ``dtype``, with ``free_bytes`` of free device memory (None: unknown) and
    about ``floats_per_token`` activation values per position in one forward (the sum of the layers' widths
    is a safe bound). CPU: split by every length, `CPU_ROWS`. Accelerators: ``batch // GPU_BUCKET_EXAMPLES``
    buckets (at most `GPU_MAX_BUCKETS`; under two: no split) and as many rows as `GPU_MEMORY_SHARE` of the free
    memory holds, within [`GPU_MIN_ROWS`, `GPU_MAX_ROWS`] and never under one batch."""
    if device_type == "cpu":
        return WorkShape(True, CPU_ROWS)
    buckets = min(GPU_MAX_BUCKETS, max(1, batch // GPU_BUCKET_EXAMPLES))
    split: bool | int = buckets if buckets > 1 else False
    if free_bytes is None:
        rows = GPU_DEFAULT_ROWS
    else:
        elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
        per_row = max(1, elem * max(1, seq) * max(1, floats_per_token))
        rows = min(GPU_MAX_ROWS, max(GPU_MIN_ROWS, int(GPU_MEMORY_SHARE * free_bytes) // per_row))
    return WorkShape(split, max(rows, batch))


def shape_for(model: nn.Module, batches: Sequence[Batch]) -> WorkShape:
    """`work_shape` for ``model`` where it is, on ``batches`` (their largest batch and length; the free memory
    of a CUDA device; the sum of the widths of the model's linear and conv layers per position)."""
    device = device_of(model)
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    widths = sum(m.out_features if isinstance(m, nn.Linear) else m.out_channels
                 for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)))
    batch = max((b.size for b in batches), default=1)
    seq = max((_positions(b) for b in batches), default=1)
    return work_shape(device.type, dtype, batch, seq, free_bytes=free, floats_per_token=widths or 4096)


def _positions(batch: Batch) -> int:
    """Positions per example: a padded batch's length, else the largest per-example size of its input tensors."""
    x = batch.inputs
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    if isinstance(mask, Tensor) and mask.ndim == 2:
        return int(mask.shape[1])
    sizes = [1]
    map_tensors(x, lambda t: sizes.append(t[0].numel() if t.ndim >= 2 and t.is_floating_point()
                                          else t.shape[1] if t.ndim >= 2 else 1) or t)
    return max(sizes)


# ---- length buckets --------------------------------------------------------------------------------------


def _buckets(lengths: Sequence[int], counts: Sequence[int], k: int) -> list[int]:
    """Split sorted distinct ``lengths`` (with ``counts`` examples each) into at most ``k`` runs, each padded to
    its longest, with the fewest positions in all; returns each run's last index (exact, by dynamic programming)."""
    m = len(lengths)
    if m <= k:
        return list(range(m))
    pre = [0]
    for c in counts:
        pre.append(pre[-1] + c)
    INF = float("inf")
    best = [[INF] * m for _ in range(k)]  # best[b][j]: lengths[:j + 1] in b + 1 runs
    cut = [[0] * m for _ in range(k)]
    for j in range(m):
        best[0][j] = pre[j + 1] * lengths[j]
    for b in range(1, k):
        for j in range(m):
            for i in range(1, j + 1):  # the last run is lengths[i:j + 1]
                c = best[b - 1][i - 1] + (pre[j + 1] - pre[i]) * lengths[j]
                if c < best[b][j]:
                    best[b][j], cut[b][j] = c, i
    ends, j, b = [], m - 1, k - 1
    while b >= 0 and j >= 0:
        ends.append(j)
        if b == 0:
            break
        j, b = cut[b][j] - 1, b - 1
    return sorted(ends)


def by_length(batch: Batch, buckets: int | None = None) -> list[tuple[Batch, Tensor]] | None:
    """``[(sub-batch, positions in batch)]``: the examples of one real length each (``buckets`` None), or of
    at most ``buckets`` runs of lengths (`_buckets`), trailing padding cut off; None when ``batch`` is not a dict
    of right-padded sequences (2-D 0/1 ``attention_mask``) or nothing would be cut."""
    x = batch.inputs
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape[0] != batch.size:
        return None
    B, T = mask.shape
    lens = mask.ne(0).sum(1)
    if not torch.equal(mask.ne(0), torch.arange(T, device=mask.device) < lens[:, None]):
        return None  # left padding or holes: keep the batch as it is
    lens_cpu = lens.cpu()
    if bool((lens_cpu == T).all()):
        return None
    distinct, counts = torch.unique(lens_cpu, return_counts=True)
    ends = _buckets(distinct.tolist(), counts.tolist(), buckets) if buckets else list(range(len(distinct)))
    if buckets and len(ends) == 1 and int(distinct[-1]) == T:
        return None  # one bucket as long as the batch: nothing to cut

    def cut(t: Tensor, rows: Tensor, n: int) -> Tensor:
        if t.ndim and t.shape[0] == B:
            t = t.index_select(0, rows.to(t.device))
            return t[:, :n] if t.ndim >= 2 and t.shape[1] == T else t
        return t

    subs, lo = [], 0
    for e in ends:
        n = int(distinct[e])
        rows = torch.nonzero((lens_cpu >= int(distinct[lo])) & (lens_cpu <= n)).flatten()
        subs.append((Batch(map_tensors(x, lambda t: cut(t, rows, n)), cut(batch.targets, rows, n)), rows))
        lo = e + 1
    return subs


def work_batches(model: nn.Module, batches: Sequence[Batch], metric: str, split: bool | int) -> list[tuple[Batch, Tensor]]:
    """The batches the engine runs, with each example's position among all examples (CPU tensors): padded
    batches split by length (`by_length`; ``split`` True: every length, an int: that many buckets) where that
    leaves every clean per-example metric unchanged (checked per batch: models whose output depends on padding
    keep whole batches)."""
    out: list[tuple[Batch, Tensor]] = []
    start = 0
    buckets = None if split is True else int(split)
    for batch in batches:
        whole = torch.arange(start, start + batch.size)
        subs = by_length(batch, buckets) if split else None
        if subs is not None:
            with torch.no_grad():
                clean = call(model, batch.inputs)
                base = per_example_metric(metric, clean, batch.targets, clean)
                same = True
                for sub, rows in subs:
                    c = call(model, sub.inputs)
                    m = per_example_metric(metric, c, sub.targets, c)
                    same &= bool(torch.allclose(m, base[rows.to(base.device)], rtol=1e-4, atol=1e-5))
            if same:
                out += [(sub, whole[rows]) for sub, rows in subs]
                start += batch.size
                continue
        out.append((batch, whole))
        start += batch.size
    return out


__all__ = ["CPU_ROWS", "GPU_BUCKET_EXAMPLES", "GPU_MAX_BUCKETS", "WorkShape", "by_length", "shape_for", "work_batches",
           "work_shape"]
