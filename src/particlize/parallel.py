"""Particle-parallel execution on ``torch.distributed``: shard a model's particles across processes, gather
it back, launch local process groups, check a sharded model against the whole one, score particles on
several processes.

    # under torchrun, or in processes started by `launch`
    dist.init_process_group("gloo")              # NCCL on GPUs: one process per GPU
    part = shard(model)                          # this rank's heads and neurons; outputs equal model's
    whole = unshard(part)                        # every rank: the original weights, exactly

Grouped-query attention: whole key/value groups per rank (their key/value projections cut too) when the world
size divides the number of key/value heads, otherwise the rule in `particlize.surgery.shard`.

Which engine does what:

- **plain collectives** (``torch.distributed.all_reduce`` as a forward hook on each reader, the `shard` verb
  cutting writers and readers like `prune`) carry every layout: widths that do not divide the world size (a
  pruned model: 7 heads here, 5 there, split 3 + 2 + 2), query heads split inside each key/value group with
  replicated key/value rows, GPT-2's fused ``Conv1D`` ``c_attn``, a DiT's heads. Each rank's share is an ordinary
  smaller dense module whose head counts the adapter fixes, so the shard runs, is counted and is gathered
  (`unshard`) like any particlize model. The communication is Megatron's: one all-reduce of the hidden state
  after ``o_proj`` and one after ``down_proj``/``fc2`` per layer.
- **DTensor** (``torch.distributed.tensor.parallel.parallelize_module`` with ``ColwiseParallel`` on the
  writers and ``RowwiseParallel`` on the reader) shards a Linear into equal contiguous pieces on a
  ``DeviceMesh``; it cannot express uneven widths, interleaved shares of each key/value group or ``Conv1D``.
  ``shard(..., engine="dtensor")`` uses it for the groups where the layout is exactly that (every rank the
  same contiguous range, ``nn.Linear`` writers and reader, whole key/value groups) and plain collectives for
  the rest; it runs on gloo/CPU in torch 2.13 and gives the same outputs (tested).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import resource
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from .adapters import decompose
from .analysis import analyze as _analyze
from .batches import batch_inputs, run_batch
from .errors import ParticlizeError
from .particles import ParticleMap
from .plan import Plan, model_plan, provenance, set_provenance
from .sources import load_model, load_tokenizer
from .surgery import is_sharded, layout, shard_model
from .surgery._tensors import refresh_shapes, set_tensor
from .surgery.shard import SHARDED, _all_reduce_output, full_slice, set_head_counts
from .tasks import get_task


class ParallelError(ParticlizeError):
    """A process group could not start, or one of its processes failed or timed out."""


def _need_group(process_group: Any = None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError("no torch.distributed process group: run under torchrun, in particlize.parallel.launch, "
                            "or call torch.distributed.init_process_group first")
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def shard(model: nn.Module, pm: ParticleMap | None = None, *, process_group: Any = None) -> nn.Module:
    """This rank's share of ``model``: each head/neuron group split across the ranks by cost, its writers
    and reader cut to this rank's particles, the reader's partial output all-reduced (bias on rank 0 only);
    everything else replicated. Needs an initialised process group; ``model`` is left as it is. The layout
    is recorded as ``shard`` steps in the model's plan (``particlize.plan.model_plan``)."""
    world, rank = _need_group(process_group)
    pm = decompose(model) if pm is None else pm
    return shard_model(pm, rank, world, process_group=process_group).model


def unshard(model: nn.Module) -> nn.Module:
    """The whole model back from every rank's shard (a collective: call it on every rank): each split
    tensor all-gathered and put back at its particles' indices, the reader biases from rank 0, the
    all-reduce hooks removed. A new model; its weights equal the original's exactly."""
    info = getattr(model, SHARDED, None)
    if info is None:
        raise ParallelError("this model is not a shard; unshard takes what particlize.parallel.shard returned")
    pg = info.get("process_group")
    _need_group(pg)
    whole = copy.deepcopy(model)
    for name, parts in info["layout"].items():
        g = info["groups"][name]
        for s in (*g.writers, *g.readers):
            _gather(whole, full_slice(s, g.size), parts, info["rank"], g.size, pg)
        kv, heads = info.get("kv", {}).get(name, ((), None))
        for s in kv:  # whole key/value groups: their key/value rows too
            _gather(whole, s, heads, info["rank"], g.balanced, pg)
        if heads is not None:
            set_head_counts(whole, g, g.size, g.balanced)
        reader = whole.get_submodule(g.gate.module)
        bias = getattr(reader, "bias", None)
        if isinstance(bias, torch.Tensor):
            b = bias.detach().clone()
            dist.broadcast(b, src=dist.get_global_rank(pg, 0) if pg is not None else 0, group=pg)
            set_tensor(whole, f"{g.gate.module}.bias", b)
        for k, hook in list(reader._forward_hooks.items()):
            if hook is _all_reduce_output:
                del reader._forward_hooks[k]
        if g.on_prune is not None:
            g.on_prune(whole, list(range(g.size)))
    if info.get("after_prune") is not None:
        info["after_prune"](whole)
    delattr(whole, SHARDED)
    plan = model_plan(whole)
    set_provenance(whole, provenance(whole).get("recipe"), Plan(tuple(s for s in plan if s.verb != "shard")))
    return whole


def _gather(whole: nn.Module, s: Any, parts: Sequence[Sequence[int]], rank: int, count: int, pg: Any) -> None:
    """Put back the whole tensor of slice ``s`` (``count`` particles in all) from every rank's cut of it."""
    t = _tensor(whole, s.name).detach()
    pieces: list[Any] = [None] * len(parts)
    dist.all_gather_object(pieces, t.cpu(), group=pg)
    dim = s.dim % t.ndim
    shape = list(t.shape)
    shape[dim] += (count - len(parts[rank])) * s.width * s.repeat
    full = t.new_empty(shape)
    for p, piece in zip(parts, pieces):
        full.index_copy_(dim, s.indices(p).to(t.device), piece.to(t.device))
    set_tensor(whole, s.name, full)
    refresh_shapes(whole.get_submodule(s.name.rpartition(".")[0]))


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    mpath, _, tname = name.rpartition(".")
    return getattr(model.get_submodule(mpath) if mpath else model, tname)


# --------------------------------------------------------------------------------------------------
# Launching local process groups


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], args: tuple, world: int, port: int, timeout: float, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    try:
        queue.put((rank, fn(*args)))
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, *args: Any, port: int | None = None, timeout: float = 60.0,
           start_method: str = "spawn") -> list[Any]:
    """Run ``fn(*args)`` in ``nproc`` local processes joined in a gloo process group (torchrun's environment:
    MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE) and return each rank's result, by rank. A process that
    fails, a port in use, or a run past ``timeout`` seconds stops all of them and raises `ParallelError`."""
    if nproc < 1:
        raise ParallelError(f"--nproc must be at least 1, got {nproc}")
    queue = mp.get_context(start_method).SimpleQueue()
    port = free_port() if port is None else port
    ctx = mp.start_processes(_worker, args=(fn, args, nproc, port, timeout, queue), nprocs=nproc, join=False,
                             start_method=start_method)
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout + 10
    try:
        while True:
            while not queue.empty():
                r, v = queue.get()
                results[r] = v
            if ctx.join(timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise ParallelError(f"the {nproc} processes did not finish within {timeout:.0f} s; "
                                    "a rank is stuck (raise timeout= for bigger models)")
    except mp.ProcessRaisedException as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise ParallelError(f"a rank failed: {lines[-1].strip() if lines else e}"[:300]) from None
    except mp.ProcessExitedException as e:
        raise ParallelError(f"rank {e.error_index} died (exit code {e.exit_code}); the others were stopped") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    while not queue.empty():
        r, v = queue.get()
        results[r] = v
    return [results[r] for r in range(nproc)]


# --------------------------------------------------------------------------------------------------
# Checking a sharded model; distributed analysis


def main_output(out: Any) -> torch.Tensor:
    """The main output tensor of a model call (``logits``, ``last_hidden_state``, ``sample`` or the first item)."""
    for key in ("logits", "last_hidden_state", "sample"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0] if isinstance(out, (tuple, list)) else out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def check_shard(model: nn.Module, batch: Any, iters: int = 5) -> dict[str, Any]:
    """On each rank: the whole model's and the sharded model's outputs on ``batch``, compared; the sharded
    forward's throughput; the shard's parameter count and the process's peak resident memory."""
    world, rank = _need_group()
    model.eval()
    with torch.no_grad():
        ref = main_output(run_batch(model, batch))
        part = shard(model)
        out = main_output(run_batch(part, batch))
        t0 = time.perf_counter()
        for _ in range(iters):
            run_batch(part, batch)
        dt = (time.perf_counter() - t0) / iters
    n = _batch_size(batch)
    return {"rank": rank, "world_size": world, "max_abs_diff": float((out - ref).abs().max()),
            "examples_per_s": n / dt, "params": sum(p.numel() for p in part.parameters()),
            "peak_rss_mb": _peak_rss_mb(), "sharded_groups": len(getattr(part, SHARDED)["layout"])}


def _batch_size(batch: Any) -> int:
    x = batch_inputs(batch)
    t = next(iter(x.values())) if isinstance(x, dict) else x
    return int(t.shape[0])


def example_batch(model: nn.Module, spec: str, task: str | None, batch_size: int = 8, max_length: int = 64) -> Any:
    """A batch to check ``model`` on: the task's first calibration batch, or random token ids for a Hugging
    Face text model when no task is named."""
    if task is not None:
        t = get_task(task)
        return t.calibration(model, load_tokenizer(spec), batch_size=batch_size, max_length=max_length,
                             limit=batch_size)[0]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ParallelError("cannot make an input for this model; pass --task (its data gives the batch)")
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (batch_size, max_length), generator=gen)}


def check_rank(spec: str, task: str | None, batch_size: int = 8, max_length: int = 64, iters: int = 5,
               trust_code: bool = False) -> dict[str, Any]:
    """`check_shard` of model ``spec`` (as `particlize.sources.load_model` reads it) on `example_batch`."""
    model = load_model(spec, trust_code=trust_code).eval()
    return check_shard(model, example_batch(model, spec, task, batch_size, max_length), iters)


def analyze(model_or_pm: nn.Module | ParticleMap, data: Any, method: str = "ablation", *,
            world_size: int | None = None, process_group: Any = None, **kw: Any) -> pd.DataFrame:
    """`particlize.analyze` with the particles to score split across the ranks (a collective: call it on
    every rank with the same arguments): each rank runs the exact engine on its share of the groups, and
    every rank gets the one table the single-process call returns."""
    world, rank = _need_group(process_group)
    if world_size is not None and world_size != world:
        raise ParallelError(f"world_size={world_size} but the process group has {world} ranks")
    pm = decompose(model_or_pm) if isinstance(model_or_pm, nn.Module) else model_or_pm
    table = kw.pop("table", True)
    groups = kw.pop("groups", None)
    names = [g.name for g in pm.groups] if groups is None else groups
    names = [names] if isinstance(names, str) else list(names)
    if len(names) == 1 and names[0] not in pm:  # a kind
        names = [g.name for g in pm.select(names[0])]
    mine = _split_groups(pm, names, world)[rank]
    part = _analyze(pm, data, method, groups=mine, table=False, **kw) if mine else None
    frames: list[Any] = [None] * world
    dist.all_gather_object(frames, part, group=process_group)
    df = pd.concat([f for f in frames if f is not None], ignore_index=True)
    order = {n: i for i, n in enumerate(g.name for g in pm.groups)}
    df = df.sort_values(["group", "index"], key=lambda c: c.map(order) if c.name == "group" else c,
                        kind="stable").reset_index(drop=True)
    if table:
        df = df.merge(pm.table(), on=["group", "index"], how="left")
    return df


def _split_groups(pm: ParticleMap, names: Sequence[str], world: int) -> list[list[str]]:
    """Groups dealt to ranks by particle count, largest first (each rank scores whole groups)."""
    load, out = [0] * world, [[] for _ in range(world)]
    for n in sorted(names, key=lambda n: -pm[n].size):
        k = min(range(world), key=lambda r: (load[r], r))
        out[k].append(n)
        load[k] += pm[n].size
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``torchrun --nproc-per-node N -m particlize.parallel MODEL [--task TASK]``: check the sharded model
    on every rank; rank 0 prints one line per rank."""
    ap = argparse.ArgumentParser(prog="python -m particlize.parallel")
    ap.add_argument("model")
    ap.add_argument("--task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    a = ap.parse_args(argv)
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    try:
        res = check_rank(a.model, a.task, a.batch_size, a.max_length)
        rows: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(rows, res)
        if dist.get_rank() == 0:
            for r in rows:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()


__all__ = ["ParallelError", "analyze", "check_rank", "check_shard", "example_batch", "free_port", "is_sharded",
           "launch", "layout", "main", "main_output", "shard", "unshard"]
