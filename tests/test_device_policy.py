"""Device plumbing and device policies, checked on the CPU: data reaches the model where the model is (compress,
sweep, moefy), the timer a device gets, the ablation engine's work shape, ``round_to`` by device and dtype,
and first-order scores of a half-precision model accumulated in fp32."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from loop_fixture import OPTIONS  # noqa: E402
from particlize import loop as loop_mod  # noqa: E402
from particlize.analysis._common import Batch, map_tensors  # noqa: E402
from particlize.loop import compress  # noqa: E402
from particlize.measure import Clock, measure_latency, on_device  # noqa: E402

# ---- data reaches the model where the model is ---------------------------------------------------------------
# On a CPU ``t.to("cpu")`` is ``t`` itself, so a forgotten move cannot be seen by running; here ``Tensor.to`` tags
# what it returns with the device it was asked for, and the checks below look for the tag where data arrives.


def _tag(t: torch.Tensor) -> str | None:
    return getattr(t, "_pz_device", None)


@pytest.fixture
def tagging_to(monkeypatch):
    real = torch.Tensor.to

    def to(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        dev = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if dev is not None and not isinstance(out, torch.nn.Parameter):
            out = out.view_as(out)  # a new tensor object (same storage) to carry the tag
            out._pz_device = torch.device(dev).type
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)


def _tensors(x) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensors(x, lambda t: out.append(t) or t)
    return out


class _Seen:
    """Root-model calls and scorer batches whose tensors did not come through ``.to(<the model's device>)``."""

    def __init__(self, model):
        self.calls, self.unmoved = 0, []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        self.calls += 1
        self.unmoved += [t.shape for t in _tensors((args, kwargs)) if _tag(t) != "cpu"]

    def scorer(self, pm, batches, kinds):
        self.unmoved += [("calibration", t.shape) for t in _tensors(batches) if _tag(t) != "cpu"]
        return {g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(0)) for g in pm.groups if g.kind in kinds}


def _run(setup):
    work, model, task, tok = setup
    model = copy.deepcopy(model)
    seen = _Seen(model)
    opts = {**OPTIONS, "max_rounds": 1, "recover_epochs": 0.25, "quantize": None}
    compress(model, task, tokenizer=tok, scorer=seen.scorer, device="cpu", **opts)
    return seen


def test_compress_moves_every_batch_to_the_models_device(trained_text, tagging_to):
    seen = _run(trained_text)
    assert seen.calls > 0 and seen.unmoved == []


def test_a_forgotten_move_is_caught(trained_text, tagging_to, monkeypatch):
    monkeypatch.setattr(loop_mod, "on_device", lambda data, device: data)  # the bug: calibration data left where it was
    seen = _run(trained_text)
    assert any(u[0] == "calibration" for u in seen.unmoved if isinstance(u, tuple) and isinstance(u[0], str))


def test_measure_latency_moves_its_inputs(tagging_to):
    model = torch.nn.Linear(4, 2)
    seen = _Seen(model)
    measure_latency(model, torch.randn(3, 4), warmup=1, reps=2)
    assert seen.calls == 3 and seen.unmoved == []


def test_on_device_moves_batches_pairs_and_dicts(tagging_to):
    data = [Batch({"input_ids": torch.ones(2, 3)}, torch.zeros(2)), ({"x": torch.ones(1)}, torch.zeros(1))]
    moved = on_device(data, "cpu")
    assert isinstance(moved[0], Batch) and isinstance(moved[1], tuple)
    assert all(_tag(t) == "cpu" for t in _tensors(moved)) and len(_tensors(moved)) == 4


# ---- the ablation engine's work shape ------------------------------------------------------------------------

import itertools  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.analysis import ablation  # noqa: E402
from particlize.analysis._common import as_batches  # noqa: E402
from particlize.analysis.workshape import (CPU_ROWS, GPU_MAX_BUCKETS, GPU_MAX_ROWS, WorkShape, _buckets,  # noqa: E402
                                           by_length, work_shape)
from test_analysis import _padded  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("free", [None, 1 << 20, 1 << 40])
def test_cpu_work_shape_is_todays_whatever_the_rest(dtype, free):
    assert work_shape("cpu", dtype, 64, 128, free_bytes=free) == WorkShape(True, CPU_ROWS)


@pytest.mark.parametrize("batch, split", [(8, False), (31, False), (64, 2), (100, 3), (128, 4), (1024, GPU_MAX_BUCKETS)])
def test_gpu_keeps_few_large_length_buckets(batch, split):
    assert work_shape("cuda", torch.float32, batch, 64).split == split


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 512), st.integers(1, 2048), st.integers(1 << 20, 1 << 38), st.integers(64, 200_000))
def test_gpu_rows_grow_with_free_memory_and_stay_in_bounds(batch, seq, free, width):
    small = work_shape("cuda", torch.float32, batch, seq, free_bytes=free, floats_per_token=width).rows
    big = work_shape("cuda", torch.float32, batch, seq, free_bytes=2 * free, floats_per_token=width).rows
    half = work_shape("cuda", torch.bfloat16, batch, seq, free_bytes=free, floats_per_token=width).rows
    assert batch <= small <= big and small <= half  # bf16 rows are half the bytes
    assert min(small, big, half) >= batch and max(small, big, half) <= max(GPU_MAX_ROWS, batch)


def _padded_positions(lengths, counts, ends):
    out, lo = 0, 0
    for e in ends:
        out += sum(counts[lo:e + 1]) * lengths[e]
        lo = e + 1
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=7, unique=True), st.data(), st.integers(1, 4))
def test_length_buckets_pad_the_fewest_positions(lengths, data, k):
    lengths = sorted(lengths)
    counts = data.draw(st.lists(st.integers(1, 9), min_size=len(lengths), max_size=len(lengths)))
    ends = _buckets(lengths, counts, k)
    assert ends[-1] == len(lengths) - 1 and len(ends) <= k and ends == sorted(set(ends))
    best = min(_padded_positions(lengths, counts, [*cut, len(lengths) - 1])
               for r in range(min(k, len(lengths)))
               for cut in itertools.combinations(range(len(lengths) - 1), r))
    assert _padded_positions(lengths, counts, ends) == best


def test_buckets_cover_every_example_once_and_cut_trailing_padding():
    _, batches = _padded("bert")
    for b in batches:
        subs = by_length(b, 2)
        assert len(subs) == 2
        rows = torch.cat([r for _, r in subs])
        assert sorted(rows.tolist()) == list(range(b.size))
        for sub, r in subs:  # each bucket as long as its longest example, and every example in it as it was
            mask = sub.inputs["attention_mask"]
            assert int(mask.sum(1).max()) == mask.shape[1]
            torch.testing.assert_close(sub.inputs["input_ids"], b.inputs["input_ids"][r, : mask.shape[1]])


@pytest.mark.parametrize("family", ["bert", "llama-gqa"])
@pytest.mark.parametrize("split", [1, 2, False])
def test_engine_with_buckets_equals_the_naive_loop(family, split):
    model, batches = _padded(family, family == "llama-gqa")
    pm = pz.decompose(model)
    names = [g.name for g in pm.groups]
    fast = ablation.ablation_effects(pm, batches, groups=names, split=split, max_rows=6)
    naive = ablation.ablation_effects(pm, batches, groups=names, fast=False)
    for n in names:
        torch.testing.assert_close(fast[n], naive[n], atol=1e-5, rtol=0)


def test_the_cpu_default_is_every_length_and_cpu_rows(monkeypatch):
    model, batches = _padded("bert")
    pm = pz.decompose(model)
    names = [g.name for g in pm.groups]
    asked = []
    real = ablation._work_batches
    monkeypatch.setattr(ablation, "_work_batches", lambda m, b, metric, split: asked.append(split) or real(m, b, metric, split))
    chunks = []
    monkeypatch.setattr(ablation, "_n_chunks", lambda job, B, rows, fast, pm: chunks.append(rows) or 1)
    default = ablation.ablation_effects(pm, batches, groups=names)
    assert asked == [True] and set(chunks) == {CPU_ROWS}
    by_each = ablation.ablation_effects(pm, batches, groups=names, split=True, max_rows=CPU_ROWS)
    for n in names:
        torch.testing.assert_close(default[n], by_each[n], atol=0, rtol=0)


class _HostWaits:
    """Counts what makes the host wait for a GPU when the engine's own code does it: reading a tensor's value
    (``item``, ``cpu``, ``tolist``, ``bool``/``float``/``int``, ``numpy``) or building a tensor from host data
    (``torch.tensor`` / ``torch.as_tensor`` of a list: a copy to the device)."""

    READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))
        for name in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, name, self._wrap(getattr(torch, name), host_data=True))

    def _wrap(self, fn, host_data=False):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "particlize/analysis/ablation" in caller and not (host_data and isinstance(args[0], torch.Tensor)):
                self.n += 1
            return fn(*args, **kwargs)

        return counted


def test_no_host_wait_per_particle_in_the_engine(monkeypatch):
    """The number of host waits must not grow with the number of particles ablated (one forward each here):
    effects gather on the device, chunks are slices of one device tensor."""
    model, batches = _padded("bert")
    pm = pz.decompose(model)
    group = next(g for g in pm.groups if g.kind == "neuron")
    counts = []
    for n in (2, 7):
        waits = _HostWaits(monkeypatch)
        ablation.ablation_effects(pm, batches, groups=[group.name], only={group.name: list(range(n))}, split=2,
                                  max_rows=1)
        counts.append(waits.n)
        monkeypatch.undo()
    assert counts[0] == counts[1]


# ---- round_to by device and dtype -------------------------------------------------------------------------------

from particlize import measure as measure_mod  # noqa: E402
from particlize.allocate import ROUND_TO, AllocationConfig, allocate, default_round_to  # noqa: E402


@pytest.mark.parametrize("device, dtype, expected", [
    ("cpu", torch.float32, None), ("cpu", torch.bfloat16, None), ("cuda", torch.float32, 8),
    ("cuda", torch.bfloat16, 64), ("cuda", torch.float16, 64), ("cuda", torch.float64, None),
])
def test_default_round_to_by_device_and_dtype(device, dtype, expected):
    assert default_round_to(device, dtype) == expected
    assert AllocationConfig().for_device(device, dtype).round_to == expected
    assert AllocationConfig(round_to=16).for_device(device, dtype).round_to == 16  # a given one is kept


def test_cpu_allocation_config_is_unchanged():
    cfg = AllocationConfig()
    assert cfg.for_device("cpu") is cfg and cfg.round_to is None


def _allocation_seen(trained_text, monkeypatch, table=None):
    work, model, task, tok = trained_text
    if table is not None:
        monkeypatch.setitem(ROUND_TO, *table)
    seen = []

    def spy(pm, importance, flops, cfg, *rest):
        seen.append(cfg.round_to)
        return allocate(pm, importance, flops, cfg, *rest)

    opts = {**OPTIONS, "max_rounds": 1, "recover_epochs": 0, "target_flops": 0.7, "min_width": 0.0}
    compress(copy.deepcopy(model), task, tokenizer=tok, allocator=spy, **opts)
    return seen


def test_compress_allocates_with_the_devices_round_to(trained_text, monkeypatch):
    assert _allocation_seen(trained_text, monkeypatch) == [None]  # CPU: no rounding, as before
    assert _allocation_seen(trained_text, monkeypatch, (("cpu", torch.float32), 4)) == [4]


# ---- the clock a device gets -------------------------------------------------------------------------------------


def test_clock_by_device():
    assert Clock("cpu").kind == "perf_counter"
    assert Clock(torch.device("cuda", 0)).kind == "cuda_event" and Clock("cuda").kind == "cuda_event"


def test_cuda_clock_times_with_events_after_the_queue_is_empty(monkeypatch):
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.name = "start" if not any(e.startswith("new") for e in log) else "end"
            log.append(f"new {self.name}")

        def record(self):
            log.append(f"record {self.name}")

        def synchronize(self):
            log.append(f"wait {self.name}")

        def elapsed_time(self, other):
            log.append("elapsed")
            return 2.5

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("synchronize"))
    ms = Clock("cuda")(lambda: log.append("forward"))
    assert ms == 2.5
    assert log[log.index("synchronize"):] == ["synchronize", "record start", "forward", "record end", "wait end", "elapsed"]


def test_measure_latency_takes_the_models_devices_clock(monkeypatch):
    made = []
    real = measure_mod.Clock
    monkeypatch.setattr(measure_mod, "Clock", lambda device: made.append(torch.device(device)) or real(device))
    assert measure_latency(torch.nn.Linear(3, 3), torch.randn(2, 3), warmup=0, reps=1) >= 0
    assert made == [torch.device("cpu")]


# ---- first-order scores of a half-precision model ---------------------------------------------------------------

from scipy.stats import spearmanr  # noqa: E402

from particlize.analysis import taylor as taylor_mod  # noqa: E402
from particlize.particles import ParticleMap  # noqa: E402


@pytest.mark.parametrize("family", ["bert", "llama-gqa"])
@pytest.mark.parametrize("method", ["fisher", "taylor"])
def test_bf16_scores_rank_as_fp32_and_accumulate_in_fp32(family, method, monkeypatch):
    model, batches = _padded(family, family == "llama-gqa")
    half = copy.deepcopy(model).to(torch.bfloat16)
    gate_dtypes = []
    real = ParticleMap.gates

    def gates(self, values, patch=None):
        gate_dtypes.extend((v.dtype, v.requires_grad) for v in values.values())
        return real(self, values, patch)

    monkeypatch.setattr(ParticleMap, "gates", gates)
    full = pz.analyze(model, batches, method, table=False, progress=False)
    pm = pz.decompose(half)
    raw = taylor_mod.gate_gradients(pm, as_batches(batches), groups=[g.name for g in pm.groups])
    low = pz.analyze(pm, batches, method, table=False, progress=False)
    assert set(gate_dtypes) == {(taylor_mod.GATE_DTYPE, True)} and taylor_mod.GATE_DTYPE == torch.float32
    assert all(g.dtype == torch.float64 for g in raw.values())  # per-example gradients kept in float64
    assert spearmanr(full.score, low.score).statistic > 0.9


# ---- on a GPU, where there is one (``pytest tests/test_device_policy.py -k cuda``) ---------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_engine_gives_the_cpu_numbers():
    model, batches = _padded("bert")
    names = [g.name for g in pz.decompose(model).groups]
    on_cpu = ablation.ablation_effects(pz.decompose(model), batches, groups=names)
    gpu = copy.deepcopy(model).cuda()
    on_gpu = ablation.ablation_effects(pz.decompose(gpu), on_device(batches, "cuda"), groups=names)
    for n in names:
        assert on_gpu[n].device.type == "cpu"
        torch.testing.assert_close(on_gpu[n], on_cpu[n], atol=1e-4, rtol=1e-4)


@cuda
def test_cuda_particle_loop_does_not_wait_per_particle(recwarn):
    model, batches = _padded("bert")
    pm = pz.decompose(copy.deepcopy(model).cuda())
    batches = on_device(batches, "cuda")
    group = next(g for g in pm.groups if g.kind == "neuron")
    counts = []
    for n in (2, 7):
        recwarn.clear()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ablation.ablation_effects(pm, batches, groups=[group.name], only={group.name: list(range(n))}, split=2,
                                      max_rows=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        # the engine's own waits (the model's own code may wait per forward: not counted)
        counts.append(sum("synchroniz" in str(w.message) and "particlize" in w.filename for w in recwarn))
    assert counts[0] == counts[1]


@cuda
def test_cuda_compress_runs_and_keeps_the_model_on_the_gpu(trained_text):
    work, model, task, tok = trained_text
    res = compress(copy.deepcopy(model), task, tokenizer=tok, device="cuda",
                   **{**OPTIONS, "max_rounds": 1, "recover_epochs": 0.25, "round_to": 1})
    assert len(res.history) >= 1 and next(res.model.parameters()).device.type == "cuda"


@cuda
def test_cuda_clock_and_bf16_fisher():
    model = torch.nn.Linear(64, 64).cuda()
    assert measure_latency(model, torch.randn(8, 64), warmup=1, reps=3) > 0
    m, batches = _padded("llama-gqa", True)
    low = pz.analyze(copy.deepcopy(m).cuda().to(torch.bfloat16), on_device(batches, "cuda"), "fisher", table=False,
                     progress=False)
    full = pz.analyze(m, batches, "fisher", table=False, progress=False)
    assert spearmanr(full.score, low.score).statistic > 0.9


def test_recordings_before_the_gate_are_expanded_one_at_a_time(monkeypatch):
    """Rows per forward are sized to memory: the expanded recordings of the layers before a gate must not all
    be alive at once (each is made when its layer is called and dropped when the next one returns)."""
    import weakref

    model, batches = _padded("llama-gqa", True)
    pm = pz.decompose(model)
    group = [g for g in pm.groups if g.kind == "neuron"][-1]  # the last layer's: every earlier layer is replayed
    made, starts, seen = [], [0], []
    real = ablation._expand

    def expand(x, batch, k):
        out = real(x, batch, k)
        made.extend(weakref.ref(t) for t in _tensors(out))
        return out

    monkeypatch.setattr(ablation, "_expand", expand)
    pm.model.register_forward_hook(lambda m, a, o: starts.append(len(made)))  # made since the last forward ended
    reader = pm.model.get_submodule(group.gate.module)
    reader.register_forward_pre_hook(lambda m, a: seen.append(
        (sum(r() is not None for r in made[starts[-1]:]), len(made) - starts[-1])))
    ablation.ablation_effects(pm, batches[:1], groups=[group.name], only={group.name: [0, 1, 2]}, split=False)
    alive, expanded = seen[-1]  # in the ablation forward, when the gate is reached
    assert expanded >= 6 and alive <= expanded - 3


# ---- the commands take --device ---------------------------------------------------------------------------------

from particlize.cli import main  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
@pytest.mark.parametrize("command", [["compress"], ["sweep"], ["moefy"]])
def test_commands_on_a_missing_gpu_say_so_in_one_line(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "minilm", "--task", "vader-sentiment", "--device", "cuda", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "no CUDA GPU is available; use --device cpu" in err
    assert "for now" not in err and not (tmp_path / "o").exists()
