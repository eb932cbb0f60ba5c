"""Particle-parallel execution on ``torch.distributed``: shard a model's particles across processes, gather
it back, launch local process groups, check a sharded model against the whole one, score particles on
several processes.

    # under torchrun, or in processes started by `launch`
    dist.init_process_group("gloo")              # NCCL on GPUs: one process per GPU
    part = shard(model)                          # this rank's heads and neurons; outputs equal model's
    whole = unshard(part)                        # every rank: the original weights, exactly

A model too big for one process: build it with ``empty_parameters()`` (weights on ``meta``), ``shard`` it, then
``materialize(part, seed=0)``: each rank allocates and initialises only its share (`particlize.surgery.on_meta`).

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .adapters import decompose
from .analysis import analyze as _analyze
from .analysis import get_scorer
from .analysis.work import ablation_costs, split_work
from .batches import batch_inputs, run_batch
from .errors import ParticlizeError
from .particles import ParticleMap, linear_reader_weight
from .plan import Plan, Step, model_plan, provenance, set_provenance
from .sources import load_model, load_tokenizer
from .surgery import default_init, empty_parameters, is_sharded, layout, materialize, shard_model
from .surgery._tensors import refresh_shapes, set_tensor
from .surgery.shard import SHARDED, _all_reduce_output, full_slice, kv_heads, kv_slices, set_head_counts
from .tasks import get_task


class ParallelError(ParticlizeError):
    """A process group could not start, or one of its processes failed or timed out."""


def _need_group(process_group: Any = None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError("no torch.distributed process group: run under torchrun, in particlize.parallel.launch, "
                            "or call torch.distributed.init_process_group first")
    return dist.get_world_size(process_group), dist.get_rank(process_group)


ENGINES = ("collectives", "dtensor")


def shard(model: nn.Module, pm: ParticleMap | None = None, *, process_group: Any = None,
          engine: str = "collectives") -> nn.Module:
    """This rank's share of ``model``: each head/neuron group split across the ranks by cost, its writers
    and reader cut to this rank's particles, the reader's partial output all-reduced (bias on rank 0 only);
    everything else replicated. Needs an initialised process group; ``model`` is left as it is. The layout
    is recorded as ``shard`` steps in the model's plan (``particlize.plan.model_plan``). ``engine="dtensor"``
    hands the groups whose layout is DTensor's (equal contiguous ranges of ``nn.Linear`` rows/columns) to
    ``parallelize_module`` and the rest to plain collectives (see the module doc); same layout, same outputs."""
    if engine not in ENGINES:
        raise ParallelError(f"engine must be one of {ENGINES}, got {engine!r}")
    world, rank = _need_group(process_group)
    pm = decompose(model) if pm is None else pm
    parts = layout(pm, world)
    dt = {n: p for n, p in parts.items() if engine == "dtensor" and dtensor_fits(pm, n, p)}
    plain = {n: p for n, p in parts.items() if n not in dt}
    part = shard_model(pm, rank, world, plain, process_group=process_group, share=list(dt)).model
    if dt:
        _parallelize(part, pm, dt, rank, process_group)
        steps = [Step("shard", n, {"world_size": world, "rank": rank, "parts": [list(x) for x in p], "engine": "dtensor"})
                 for n, p in dt.items()]
        set_provenance(part, pm.recipe, model_plan(part) + steps)  # replays as plain shard steps: same layout
    return part


def _modules_of(pm: ParticleMap, name: str) -> tuple[list[str], str]:
    """The modules a group's writers (with its key/value projections, when cut whole) and its reader live in."""
    g = pm[name]
    writers = [s.name.rpartition(".")[0] for s in (*g.writers, *kv_slices(pm, g))]
    return list(dict.fromkeys(writers)), g.gate.module


def dtensor_fits(pm: ParticleMap, name: str, parts: Sequence[Sequence[int]]) -> bool:
    """Whether DTensor's ``ColwiseParallel`` (writers) / ``RowwiseParallel`` (reader) expresses this group's
    layout: equal contiguous ranges per rank in rank order, whole key/value groups under grouped-query
    attention, every writer an ``nn.Linear`` whose rows are all this group's, the reader an ``nn.Linear``."""
    g, world = pm[name], len(parts)
    n = g.size // world
    if g.size % world or any(list(p) != list(range(k * n, (k + 1) * n)) for k, p in enumerate(parts)):
        return False
    if g.balanced > 1 and kv_heads(g, parts) is None:
        return False
    writers, reader = _modules_of(pm, name)
    mods = [pm.model.get_submodule(m) for m in (*writers, reader)]
    if not all(isinstance(m, nn.Linear) for m in mods) or linear_reader_weight(pm, g) is None:
        return False
    rows = {s.name.rpartition(".")[0]: s for s in g.writers}
    return all(s.dim % 2 == 0 and s.repeat == 1 and pm.model.get_submodule(m).out_features == g.size * s.width
               for m, s in rows.items())


def _parallelize(part: nn.Module, pm: ParticleMap, groups: dict[str, Any], rank: int, pg: Any) -> None:
    mesh = DeviceMesh.from_group(pg or dist.group.WORLD, next(part.parameters()).device.type)
    plan: dict[str, Any] = {}
    for name in groups:
        writers, reader = _modules_of(pm, name)
        plan.update({w: ColwiseParallel() for w in writers})
        plan[reader] = RowwiseParallel()
    before = {m: (set(part.get_submodule(m)._forward_pre_hooks), set(part.get_submodule(m)._forward_hooks)) for m in plan}
    parallelize_module(part, mesh, plan)
    hooks = {m: (set(part.get_submodule(m)._forward_pre_hooks) - a, set(part.get_submodule(m)._forward_hooks) - b)
             for m, (a, b) in before.items()}
    for m in plan:  # a Linear keeps its global in/out_features under DTensor; modules that read them need the local
        lin = part.get_submodule(m)
        lin.out_features, lin.in_features = lin.weight.to_local().shape
    for name, parts in groups.items():  # the attention modules' head counts: this rank's
        g = pm[name]
        heads = kv_heads(g, parts)
        if heads is not None:
            set_head_counts(part, g, len(parts[rank]), len(heads[rank]))
        elif g.on_prune is not None:
            g.on_prune(part, list(parts[rank]))
    info = getattr(part, SHARDED)
    info["dtensor"] = {"groups": {n: pm[n] for n in groups}, "parts": dict(groups), "hooks": hooks}


def local_numel(model: nn.Module) -> int:
    """Parameters this rank holds (a DTensor counts its local shard, not its global shape)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def local_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds (DTensors: the local shard)."""
    ts = [*model.parameters(), *model.buffers()]
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in ts)


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
    _undistribute(whole, info.get("dtensor"))
    if info.get("after_prune") is not None:
        info["after_prune"](whole)
    delattr(whole, SHARDED)
    plan = model_plan(whole)
    set_provenance(whole, provenance(whole).get("recipe"), Plan(tuple(s for s in plan if s.verb != "shard")))
    return whole


def _undistribute(whole: nn.Module, dt: dict[str, Any] | None) -> None:
    """DTensor groups back to whole tensors: each sharded parameter's ``full_tensor()``, the hooks
    ``parallelize_module`` added removed, the head counts of the whole model."""
    if not dt:
        return
    for m, (pre, post) in dt["hooks"].items():
        mod = whole.get_submodule(m)
        for k in pre:
            del mod._forward_pre_hooks[k]
        for k in post:
            del mod._forward_hooks[k]
        for tname, t in list(mod._parameters.items()):
            if isinstance(t, DTensor):
                mod._parameters[tname] = nn.Parameter(t.full_tensor().detach().clone(), requires_grad=t.requires_grad)
        refresh_shapes(mod)
    for name, g in dt["groups"].items():
        if kv_heads(g, dt["parts"][name]) is not None:
            set_head_counts(whole, g, g.size, g.balanced)
        if g.on_prune is not None:
            g.on_prune(whole, list(range(g.size)))


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


def check_shard(model: nn.Module, batch: Any, iters: int = 5, engine: str = "collectives") -> dict[str, Any]:
    """On each rank: the whole model's and the sharded model's outputs on ``batch``, compared; the sharded
    forward's throughput (examples/s); memory: ``param_mb``, the bytes of the parameters and buffers the shard
    holds (counted, not measured), and ``peak_rss_mb``, the process's peak resident set size (``getrusage``
    max RSS: it includes the whole model every rank loads before sharding, and the activations)."""
    world, rank = _need_group()
    model.eval()
    with torch.no_grad():
        ref = main_output(run_batch(model, batch))
        part = shard(model, engine=engine)
        out = main_output(run_batch(part, batch))
        t0 = time.perf_counter()
        for _ in range(iters):
            run_batch(part, batch)
        dt = (time.perf_counter() - t0) / iters
    n = _batch_size(batch)
    return {"rank": rank, "world_size": world, "max_abs_diff": float((out - ref).abs().max()),
            "examples_per_s": n / dt, "params": local_numel(part), "param_mb": local_bytes(part) / 2**20,
            "peak_rss_mb": _peak_rss_mb(), "sharded_groups": _split_count(part)}


def _split_count(part: nn.Module) -> int:
    info = getattr(part, SHARDED)
    return len(info["layout"]) + len((info.get("dtensor") or {}).get("groups", {}))


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
               trust_code: bool = False, engine: str = "collectives") -> dict[str, Any]:
    """`check_shard` of model ``spec`` (as `particlize.sources.load_model` reads it) on `example_batch`."""
    model = load_model(spec, trust_code=trust_code).eval()
    return check_shard(model, example_batch(model, spec, task, batch_size, max_length), iters, engine)


def analyze(model_or_pm: nn.Module | ParticleMap, data: Any, method: str = "ablation", *,
            world_size: int | None = None, process_group: Any = None, **kw: Any) -> pd.DataFrame:
    """`particlize.analyze` with the particles to score split across the ranks (a collective: call it on
    every rank with the same arguments): each rank runs the exact engine on its share (`work_shares`: balanced
    by the estimated work of each particle), and every rank gets the one table the single-process call returns."""
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
    mine = work_shares(pm, names, world, method, kw.pop("only", None))[rank]
    part = None
    if mine and "only" in get_scorer(method).options:  # a subset of a group's particles: the others come back NaN
        part = _analyze(pm, data, method, groups=list(mine), table=False, only=mine, **kw)
        keep = pd.MultiIndex.from_tuples([(n, i) for n, idx in mine.items() for i in idx])
        part = part[pd.MultiIndex.from_frame(part[["group", "index"]]).isin(keep)]
    elif mine:
        part = _analyze(pm, data, method, groups=list(mine), table=False, **kw)
    frames: list[Any] = [None] * world
    dist.all_gather_object(frames, part, group=process_group)
    df = pd.concat([f for f in frames if f is not None], ignore_index=True)
    order = {n: i for i, n in enumerate(g.name for g in pm.groups)}
    df = df.sort_values(["group", "index"], key=lambda c: c.map(order) if c.name == "group" else c,
                        kind="stable").reset_index(drop=True)
    if table:
        df = df.merge(pm.table(), on=["group", "index"], how="left")
    return df


def work_shares(pm: ParticleMap, names: Sequence[str], world_size: int, method: str = "ablation",
                only: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, list[int]]]:
    """Each rank's share ``{group: [particles]}`` of the particles of groups ``names`` (all of them, or those in
    ``only``) for `analyze`: balanced by `particlize.analysis.work.ablation_costs` (the forward suffix each
    ablation replays), longest first to the least-loaded rank; groups are cut into pieces when ``method`` can
    score part of a group (its ``only`` option), else dealt whole."""
    wanted = {n: sorted(set(only[n])) if only is not None else list(range(pm[n].size)) for n in names}
    wanted = {n: w for n, w in wanted.items() if w}
    full = ablation_costs(pm, list(wanted))
    costs = {n: [full[n][i] for i in w] for n, w in wanted.items()}
    shares = split_work(costs, world_size, by_particle="only" in get_scorer(method).options)
    return [{n: [wanted[n][j] for j in idx] for n, idx in s.items()} for s in shares]


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


__all__ = ["ENGINES", "ParallelError", "analyze", "default_init", "dtensor_fits", "empty_parameters", "materialize", "local_bytes", "local_numel", "check_rank", "check_shard", "example_batch", "free_port", "is_sharded",
           "launch", "layout", "main", "main_output", "shard", "unshard", "work_shares"]
