"""Measuring a model as it runs: forward latency on a fixed batch (CUDA events on a GPU, the wall clock on a
CPU), a dynamic-int8 report beside fp32, and the helpers that put data where the model is."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .analysis._common import call, device_of, map_tensors
from .errors import ParticlizeError
from .tasks import Task


def on_device(data: Any, device: torch.device | str) -> Any:
    """``data`` (a tensor, a `Batch`, or dicts/tuples/lists of them, e.g. a list of ``(inputs, targets)``
    batches) with every tensor moved to ``device``: what a model on that device can be called on."""
    return map_tensors(data, lambda t: t.to(device))


class Clock:
    """Times one call of a function in milliseconds: CUDA events around it on a CUDA device (the GPU's own
    time, waited for: kernels run asynchronously, so the host's wall clock would time the launches only), the
    host's ``perf_counter`` elsewhere. ``kind`` says which (``"cuda_event"`` or ``"perf_counter"``)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind = "cuda_event" if self.device.type == "cuda" else "perf_counter"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.kind == "perf_counter":
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)  # nothing queued before counts
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))


def latency_inputs(task: Task, tokenizer: Any, batch: int, seq: int) -> Any:
    """A fixed-shape batch to time a forward on (`Task.latency_inputs`)."""
    return task.latency_inputs(tokenizer, batch, seq)


@torch.inference_mode()
def measure_latency(model: nn.Module, inputs: Any, *, warmup: int = 2, reps: int = 5) -> float:
    """Median time of a forward on ``inputs`` in milliseconds, on the model's device (``inputs`` are moved
    there first; timed by a `Clock`: CUDA events on a GPU)."""
    was = model.training
    model.eval()
    device = device_of(model)
    inputs = on_device(inputs, device)
    clock = Clock(device)
    for _ in range(warmup):
        call(model, inputs)
    times = [clock(lambda: call(model, inputs)) for _ in range(reps)]
    model.train(was)
    return statistics.median(times)


def int8_report(model: nn.Module, task: Task, tokenizer: Any, inputs: Any, *, batch_size: int = 64,
                limit: int | None = None, max_length: int | None = 64) -> dict[str, Any]:
    """Dynamic int8 quantisation of Linear layers (CPU): test quality and latency on ``inputs`` beside fp32,
    so a compressed model's last factor of speed can be weighed against what it costs. ``model`` stays where
    it is (a copy is moved to the CPU when it is elsewhere)."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:  # pragma: no cover
        raise ParticlizeError("this torch build has no dynamic quantisation; drop --quantize int8") from None
    fp32 = model if device_of(model).type == "cpu" else copy.deepcopy(model).cpu()
    q = quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
    fp32_ms, int8_ms = measure_latency(fp32, inputs), measure_latency(q, inputs)
    acc = task.quality(q, "test", tokenizer=tokenizer, batch_size=batch_size, limit=limit, max_length=max_length)
    return {"test": acc, "latency_ms": int8_ms, "fp32_latency_ms": fp32_ms}


__all__ = ["Clock", "device_of", "int8_report", "latency_inputs", "measure_latency", "on_device"]
