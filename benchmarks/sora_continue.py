"""Continue recovering an already compressed video DiT by distillation from the dense one, in chunks (issue 6).

    .venv/bin/python benchmarks/sora_continue.py MODEL_DIR --out PREFIX [--chunks 2] [--steps 2016] [--seed0 100]
        [--alpha 0.5] [--lr 3e-4] [--dense sora-tiny] [--focus LO HI [--focus-share 0.5]]

Each chunk is one `particlize.recover.dit.distill_dit` call on the model (``--steps`` steps, batch 32, a fresh cosine
schedule, a fresh stream of training videos and a fresh pool of the teacher's sampling trajectories, seed
``--seed0 + k``): the same as `compress`'s ``final_recover_epochs`` chunks (seed 100 + k there), with the
distillation weight ``--alpha`` (teacher term vs true noise) free to change. After chunk ``k`` the model is saved as
the MODEL folder ``PREFIX-k`` (``pz.load``-able) and its held-out ε-MSE printed; a folder that already exists is
loaded instead of trained again, so a killed run continues where it stopped. Measure the sample accuracy of the
folders with ``sora_accuracy.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common as C

import particlize as pz
from particlize.io import save
from particlize.tasks.moving_digits import eps_mse, moving_digits
from particlize.recover.dit import distill_dit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="compressed model folder (pz.load)")
    ap.add_argument("--out", required=True, help="prefix of the folders written after each chunk (PREFIX-1, PREFIX-2, ...)")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2016, help="distillation steps per chunk (batch 32)")
    ap.add_argument("--seed0", type=int, default=100, help="seed of the first chunk; chunk k uses seed0 + k")
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher term (1: distillation only)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--dense", default="sora-tiny")
    ap.add_argument("--focus", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                    help="spend --focus-share of every batch on diffusion steps LO..HI (distill_dit's focus)")
    ap.add_argument("--focus-share", type=float, default=0.5)
    args = ap.parse_args()
    if args.chunks < 1 or args.steps < 1:
        ap.error("--chunks and --steps must be 1 or more")
    if not 0.0 <= args.alpha <= 1.0:
        ap.error("--alpha is a weight in [0, 1]")
    C.start()
    teacher = pz.load(args.dense).eval()
    model = pz.load(args.model, trust_code=True)
    task = moving_digits(seed=0, frames=teacher.config.frames, size=teacher.config.size)
    v, y = task.split("test")
    for k in range(1, args.chunks + 1):
        folder = Path(f"{args.out}-{k}")
        if (folder / "particlize.json").is_file():
            model = pz.load(folder, trust_code=True)
            print(f"chunk {k}: {folder} exists, loaded", flush=True)
            continue
        t, seed = time.perf_counter(), args.seed0 + k - 1
        focus = tuple(args.focus) if args.focus else None
        r = distill_dit(model, teacher, task, steps=args.steps, lr=args.lr, batch_size=32, seed=seed, alpha=args.alpha,
                        focus=focus, focus_share=args.focus_share)
        model.eval()
        save(model, folder, extra={"continued_from": args.model, "chunk": k, "steps": args.steps, "seed": seed,
                                   "alpha": args.alpha, "lr": args.lr, "focus": focus, "focus_share": args.focus_share})
        print(f"chunk {k} (seed {seed}): held-out ε-MSE {eps_mse(model, v * 2 - 1, y):.5f}, "
              f"final loss {r['final_loss']:.5f}, {time.perf_counter() - t:.0f} s -> {folder}", flush=True)


if __name__ == "__main__":
    main()
