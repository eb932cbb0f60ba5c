"""Evaluate a Sora-style video diffusion model (issue 6 metrics) and draw its samples.

    .venv/bin/python benchmarks/eval_sora.py [--model sora-tiny] [--guidance 1 3 5 7] [--per-class 5]
        [--steps 50] [--out bench-out/sora-eval]

Held-out ε-MSE (the task's test split, steps 100/500/900, noise seed 0), class-conditional sample accuracy
(the shipped frame classifier reads every generated frame; ``--per-class`` videos per digit, DDIM
``--steps`` steps, seed 0) and temporal consistency (mean |frame-to-frame change|, real test videos for
reference) at each guidance scale; a PNG grid and a GIF of one video per digit at each scale.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common as C
import torch

import particlize as pz
from particlize.report import video_gif, video_grid
from particlize.tasks.moving_digits import classify_videos, eps_mse, load_frame_classifier, moving_digits, temporal_consistency


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sora-tiny")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.0])
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="bench-out/sora-eval")
    args = ap.parse_args()
    C.start()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = pz.load(args.model).eval()
    cfg = model.config
    task = moving_digits(seed=0, frames=cfg.frames, size=cfg.size)
    clf = load_frame_classifier()
    v, y = task.split("test")
    one = y < 10
    res: dict = {"model": args.model, "eps_mse_test": eps_mse(model, v * 2 - 1, y),
                 "classifier_accuracy_real": (classify_videos(clf, v[one]) == y[one]).float().mean().item(),
                 "temporal_consistency_real": temporal_consistency(v[one]), "by_guidance": {}}
    labels = torch.arange(10).repeat_interleave(args.per_class)
    rows = []
    for g in args.guidance:
        t = time.perf_counter()
        videos = model.sample(labels, steps=args.steps, seed=0, guidance=g)
        secs = time.perf_counter() - t
        pred = classify_videos(clf, videos)
        acc = (pred == labels).float().mean().item()
        per_digit = [(pred[labels == d] == d).float().mean().item() for d in range(10)]
        res["by_guidance"][g] = {"sample_accuracy": acc, "per_digit": per_digit,
                                 "temporal_consistency": temporal_consistency(videos), "seconds": secs}
        rows.append([g, f"{acc:.3f}", " ".join(f"{a:.1f}" for a in per_digit), f"{temporal_consistency(videos):.4f}",
                     f"{secs:.1f}"])
        first = videos[:: args.per_class]
        video_grid(first, out / f"samples-g{g:g}.png", row_labels=[f"digit {d}" for d in range(10)],
                   title=f"{args.model}: DDIM {args.steps} steps, guidance {g:g}, seed 0", force=True)
        video_gif(first, out / f"samples-g{g:g}.gif", ncols=5, force=True)
    video_grid(v[one][:10], out / "real.png", row_labels=[f"digit {int(d)}" for d in y[one][:10]],
               title="real test videos", force=True)
    print(f"held-out eps-MSE {res['eps_mse_test']:.5f}; frame classifier on real test videos "
          f"{res['classifier_accuracy_real']:.3f}; temporal consistency of real videos {res['temporal_consistency_real']:.4f}")
    print(C.print_table(["guidance", f"sample accuracy ({10 * args.per_class} videos)", "per digit 0..9",
                         "temporal consistency", "sampling s"], rows))
    (out / "eval.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
