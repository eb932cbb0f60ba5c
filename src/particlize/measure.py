"""Measuring a model as it runs: forward latency on a fixed batch, and a dynamic-int8 report beside fp32."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from .analysis._common import call
from .errors import ParticlizeError
from .tasks import Task


def latency_inputs(task: Task, tokenizer: Any, batch: int, seq: int) -> Any:
    """A fixed-shape batch to time a forward on (`Task.latency_inputs`)."""
    return task.latency_inputs(tokenizer, batch, seq)


@torch.inference_mode()
def measure_latency(model: nn.Module, inputs: Any, *, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of a forward on ``inputs`` in milliseconds."""
    was = model.training
    model.eval()
    for _ in range(warmup):
        call(model, inputs)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call(model, inputs)
        times.append((time.perf_counter() - t) * 1e3)
    model.train(was)
    return statistics.median(times)


def int8_report(model: nn.Module, task: Task, tokenizer: Any, inputs: Any, *, batch_size: int = 64,
                limit: int | None = None, max_length: int | None = 64) -> dict[str, Any]:
    """Dynamic int8 quantisation of Linear layers (CPU): test quality and latency on ``inputs`` beside fp32,
    so a compressed model's last factor of speed can be weighed against what it costs."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:  # pragma: no cover
        raise ParticlizeError("this torch build has no dynamic quantisation; drop --quantize int8") from None
    q = quantize_dynamic(copy.deepcopy(model).cpu(), {nn.Linear}, dtype=torch.qint8)
    fp32_ms, int8_ms = measure_latency(model.cpu(), inputs), measure_latency(q, inputs)
    acc = task.quality(q, "test", tokenizer=tokenizer, batch_size=batch_size, limit=limit, max_length=max_length)
    return {"test": acc, "latency_ms": int8_ms, "fp32_latency_ms": fp32_ms}


__all__ = ["int8_report", "latency_inputs", "measure_latency"]
