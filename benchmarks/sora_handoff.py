"""Where along the sampler does a compressed video DiT lose its digits? Hand-off sampling (issue 6).

    .venv/bin/python benchmarks/sora_handoff.py MODEL_DIR [--dense sora-tiny] [--switch 10 25] [--per-class 50]
        [--steps 50] [--guidance 5] [--json FILE]

For every switch point k, the same guided DDIM sampler is run twice on the videos of `sora_accuracy.py` (the same
labels and starting noise): once with the dense model for the first k of ``--steps`` steps and the compressed one
for the rest ("dense first"), once the other way round ("compressed first"). Each run's sample accuracy is paired
with the dense model's own. A compressed model that loses nothing while it takes only the first k steps, and all
of its loss while it takes only the steps after k', loses its digits between those noise levels: that is where its
recovery should spend its batches (`particlize.recover.dit.distill_dit(focus=...)`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common as C
import torch
from sora_accuracy import cached_trials, format_paired, paired, sample_trials

import particlize as pz
from particlize.models.sora import SpacetimeDiT
from particlize.tasks.moving_digits import load_frame_classifier


class Handoff(torch.nn.Module):
    """A denoiser that is ``first`` at diffusion steps above ``t_switch`` and ``second`` at and below it."""

    sample = SpacetimeDiT.sample

    def __init__(self, first: torch.nn.Module, second: torch.nn.Module, t_switch: int) -> None:
        super().__init__()
        self.first, self.second, self.t_switch = first, second, t_switch
        self.config, self.diffusion, self.null_label = first.config, first.diffusion, first.null_label

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.first if int(t[0]) > self.t_switch else self.second)(x, t, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="compressed model folder (pz.load)")
    ap.add_argument("--dense", default="sora-tiny")
    ap.add_argument("--switch", type=int, nargs="+", default=[10, 25], help="sampler steps taken by the first model")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=Path("bench-out/sora-accuracy-cache"),
                    help="sora_accuracy.py's cache of the two models' own samples")
    args = ap.parse_args()
    if any(not 0 < k < args.steps for k in args.switch):
        ap.error(f"--switch points must be between 1 and {args.steps - 1} sampler steps")
    C.start()
    clf = load_frame_classifier()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    dense = pz.load(args.dense).eval()
    small = pz.load(args.model, trust_code=True).eval()
    ts = torch.linspace(dense.diffusion.steps - 1, 0, args.steps).round().long().tolist()
    base = cached_trials(dense, clf, labels, args.steps, args.guidance, 100, args.cache)
    own = cached_trials(small, clf, labels, args.steps, args.guidance, 100, args.cache)
    rows = [["compressed throughout", "—", f"{own.mean().item():.3f}", format_paired(paired(base, own))]]
    res: dict = {"videos": len(labels), "dense": base.mean().item(), "compressed": own.mean().item(), "runs": []}
    for k in args.switch:
        for order, (a, b) in (("dense first", (dense, small)), ("compressed first", (small, dense))):
            hits = sample_trials(Handoff(a, b, ts[k]), clf, labels, args.steps, args.guidance)[0]
            p = paired(base, hits)
            first = f"steps 1–{k} (t > {ts[k]})"
            rows.append([order, first, f"{hits.mean().item():.3f}", format_paired(p)])
            print(" | ".join(rows[-1]), flush=True)
            res["runs"].append({"order": order, "first_steps": k, "t_switch": ts[k], "accuracy": hits.mean().item(),
                                "paired_vs_dense": p,
                                "per_digit": [hits[labels == d].mean().item() for d in range(10)]})
    C.print_table(["sampler", "first model takes", f"sample accuracy ({len(labels)} videos)", "paired vs dense [95%]"],
                  rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
