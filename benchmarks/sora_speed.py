"""Sampling speed of compressed video DiTs against the dense one, at several batch sizes (issue 6).

    .venv/bin/python benchmarks/sora_speed.py MODEL_DIR [MODEL_DIR ...] [--dense sora-tiny]
        [--videos 4 20 100] [--steps 50] [--rounds 5]

Times ``model.sample`` (DDIM, classifier-free guidance at the model's own scale: two rows per video and step) of the dense
model and of every given compressed model, the same labels, seed and number of steps, in interleaved
rounds, and prints the median paired speedup (dense time / model time, per round) with its range for
every batch size. Run it on a quiet machine: `compress_sora.py` times its models right after a long
compression run, often beside another job, and contention reads lower speedups than a quiet machine
(see RESULTS.md). The matmul probe before and after says how quiet the run was.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C
import torch

import particlize as pz


def sampling_times(models: dict[str, torch.nn.Module], n_videos: int, steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per ``model.sample`` call (``n_videos`` videos, labels 0-9 in turn, seed 0) of every model,
    ``rounds`` times, interleaved (a, b, c, a, b, c, ...), after a small warm-up call each."""
    labels = torch.arange(n_videos) % 10
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():
            m.sample(labels[:2], steps=2, seed=0)
        for _ in range(rounds):
            for name, m in models.items():
                t = time.perf_counter()
                m.sample(labels, steps=steps, seed=0)
                times[name].append(time.perf_counter() - t)
    return times


def paired_speedup(times: dict[str, list[float]], name: str, base: str = "dense") -> str:
    """Median of the per-round ratios ``base`` time / ``name`` time, with their range: ``"1.90× (1.72–1.99)"``."""
    ratio = [b / t for b, t in zip(times[base], times[name])]
    return f"{statistics.median(ratio):.2f}× ({min(ratio):.2f}–{max(ratio):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="compressed model folders (pz.load)")
    ap.add_argument("--dense", default="sora-tiny")
    ap.add_argument("--videos", type=int, nargs="+", default=[4, 20, 100], help="videos per model.sample call")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    C.start()
    print(f"matmul probe before: {C.matmul_probe():.0f} GFLOP/s", flush=True)
    models = {"dense": pz.load(args.dense).eval()}
    for path in args.models:
        models[path] = pz.load(path, trust_code=True).eval()
    rows = []
    for n_videos in args.videos:
        times = sampling_times(models, n_videos, args.steps, args.rounds)
        rows += [[str(n_videos), name, f"{statistics.median(times[name]):.2f}", paired_speedup(times, name)]
                 for name in models]
    C.print_table(["videos", "model", f"sample, {args.steps} steps, s (median)", "speedup (paired)"], rows)
    print(f"matmul probe after: {C.matmul_probe():.0f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
