"""Compress the Sora-style reference (`sora-tiny`) by width and by depth at equal FLOPs (issue 6).

    .venv/bin/python benchmarks/compress_sora.py [--model sora-tiny] [--target-flops 0.5]
        [--recover-epochs 4] [--final-recover-epochs 0] [--per-class 50] [--steps 50] [--out bench-out/sora]
        [--compensate none|bias|merge|refit] [--max-fraction 0.34] [--lr 3e-4] [--focus LO HI] [--judge-seeds 0 1 2]

Three models, the same sampler (DDIM, ``--steps`` steps, the input model's guidance) and the same seeds:
- dense: the input model;
- width: `particlize.compress` removing spatial/temporal attention heads and MLP neurons;
- depth: `particlize.compress` removing whole blocks (TinyFusion-style depth pruning);
- mixed (on request): heads, neurons and blocks in one global ranking;
all at ``--target-flops`` of the DiT blocks' FLOPs, with the same distillation budget per round
(``--recover-epochs`` passes over the task's 2,000 training videos) and no quality floor, so all reach
the same cost and their quality can be compared. Measured: held-out ε-MSE (fixed steps and noise),
class-conditional sample accuracy (shipped frame classifier, ``--per-class`` videos per digit; every model
samples the same videos, so the difference to the dense model is paired and comes with a 95% interval),
temporal consistency (mean frame-to-frame change; real videos for reference), and the wall time of
``model.sample`` for ``--sample-batch`` videos at once (20 by default; median of 3 interleaved rounds,
paired ratios). Sample grids (PNG) and
animations (GIF) of every model go to ``--out``. ``--judge-seeds`` then judges the input model and every variant
with readers the project never tuned with (`sora_judges.py`: per-frame and per-video readers, Fréchet distances,
the motion check; ``OUT/judges-seed<S>.json``), the same samples for every model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common as C
import torch
from sora_accuracy import format_paired, paired, sample_trials
from sora_speed import paired_speedup, sampling_times

import particlize as pz
from particlize.loop import compress
from particlize.report import video_gif, video_grid
from particlize.tasks.moving_digits import classify_videos, eps_mse, load_frame_classifier, moving_digits, temporal_consistency


VARIANTS = {"width": ("heads", "neurons"), "depth": ("blocks",), "mixed": ("heads", "neurons", "blocks")}


def log(*a: object) -> None:
    print(*a, flush=True)


def quality(model: torch.nn.Module, task, clf, per_class: int, steps: int) -> dict:
    """Held-out ε-MSE, and per-video sample hits (paired across models: same labels, same noise) with their mean."""
    v, y = task.split("test")
    hits, change = sample_trials(model, clf, torch.arange(10).repeat_interleave(per_class), steps)
    return {"eps_mse": eps_mse(model, v * 2 - 1, y), "sample_accuracy": hits.mean().item(),
            "temporal_consistency": change, "hits": hits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sora-tiny")
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--recover-epochs", type=float, default=4)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--final-recover-epochs", type=float, default=0.0,
                    help="more recovery after the last cut, in chunks of --recover-epochs (compress's final_recover_epochs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench-out/sora")
    ap.add_argument("--resume", action="store_true", help="continue killed compress runs in --out (else they are replaced)")
    ap.add_argument("--sample-batch", type=int, default=20, help="videos per timed model.sample call")
    ap.add_argument("--target-flops-width", type=float, default=None,
                    help="FLOPs target of the width and mixed variants (default: --target-flops)")
    ap.add_argument("--variants", nargs="+", default=["width", "depth"], choices=list(VARIANTS))
    ap.add_argument("--compensate", default="none", choices=["none", "bias", "merge", "refit"],
                    help="how the kept particles' readers absorb each cut (particlize.surgery.compensate)")
    ap.add_argument("--max-fraction", type=float, default=1 / 3, help="most of the remaining FLOPs removed per round")
    ap.add_argument("--allocation", default="global", choices=["global", "uniform"],
                    help="how compress spreads the cut over the blocks (uniform: the same fraction of every group)")
    ap.add_argument("--hidden-weight", type=float, default=0.0,
                    help="layer-wise distillation: weight of the blocks' output MSE to the teacher's blocks")
    ap.add_argument("--on-policy", type=int, default=0,
                    help="recovery also trains on the states the student's own sampler visits, redrawn this many times a round")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="recovery ends with an exponential moving average of the student's weights (e.g. 0.999)")
    ap.add_argument("--trajectory-videos", type=int, default=None,
                    help="videos the teacher's sampler draws for the recovery's trajectory pool (distill_dit's default if unset)")
    ap.add_argument("--lr", type=float, default=None, help="recovery learning rate (default: the task's, 3e-4)")
    ap.add_argument("--focus", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                    help="recovery spends half of every batch on diffusion steps LO..HI (compress's recover_focus)")
    ap.add_argument("--plain-distill", action="store_true",
                    help="recover by plain noise-prediction distillation (no guidance term, no sampler trajectories)")
    ap.add_argument("--judge-seeds", type=int, nargs="*", default=[],
                    help="then judge every model with sora_judges.py (independent readers, FD, motion), once per seed")
    ap.add_argument("--judge-per-class", type=int, default=10, help="judged samples per digit (sora_judges.py)")
    args = ap.parse_args()
    if args.per_class < 1:
        ap.error("--per-class must be 1 or more (videos sampled per digit)")
    C.start()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = pz.load(args.model).eval()
    cfg = dense.config
    task = moving_digits(seed=0, frames=cfg.frames, size=cfg.size)
    if args.plain_distill:
        task.distill_options = {"guidance": None, "trajectory_fraction": 0.0}
    if args.on_policy:
        task.distill_options["on_policy"] = args.on_policy
    if args.ema:
        task.distill_options["ema"] = args.ema
    if args.trajectory_videos:
        task.distill_options["trajectory_videos"] = args.trajectory_videos
    clf = load_frame_classifier()
    models = {"dense": dense}
    runs = {}
    for name in args.variants:
        gran = VARIANTS[name]
        t = time.perf_counter()
        flops = args.target_flops_width if name != "depth" and args.target_flops_width else args.target_flops
        res = compress(dense, task, target_flops=flops, granularity=gran, min_quality=0.0, compensate=args.compensate,
                       max_fraction=args.max_fraction, allocation=args.allocation, hidden_weight=args.hidden_weight,
                       recover_epochs=args.recover_epochs, final_recover_epochs=args.final_recover_epochs,
                       lr=args.lr, batch_size=32, recover_focus=tuple(args.focus) if args.focus else None,
                       out=out / name, resume=args.resume, force=not args.resume)
        runs[name] = {"seconds": time.perf_counter() - t, "reason": res.reason, "history": res.history}
        models[name] = res.model.eval()
        h = res.history[-1]
        log(f"{name}: {res.reason} in {runs[name]['seconds']:.0f} s; FLOPs {h['flops_ratio']:.1%}, params {h['params']:,}, "
            f"particles {h['particles']}")
    real_v, real_y = task.split("test")
    labels = torch.arange(10)
    for name, m in models.items():
        videos = m.sample(labels, steps=args.steps, seed=0)
        video_grid(videos, out / f"{name}.png", row_labels=[f"digit {i}" for i in range(10)],
                   title=f"{args.model} {name}: DDIM {args.steps} steps, guidance {dense.config.guidance:g}, seed 0",
                   force=True)
        video_gif(videos, out / f"{name}.gif", ncols=5, force=True)
    video_grid(real_v[:10], out / "real.png", row_labels=[f"label {int(i)}" for i in real_y[:10]],
               title="real test videos", force=True)

    q = {name: quality(m, task, clf, args.per_class, args.steps) for name, m in models.items()}
    times = sampling_times(models, args.sample_batch, args.steps, args.rounds)  # interleaved rounds
    pms = {n: pz.decompose(m) for n, m in models.items()}
    dense_flops = pms["dense"].cost().flops
    rows = []
    for n in models:
        rows.append([n, f"{sum(p.numel() for p in models[n].parameters()):,}", f"{pms[n].cost().flops / dense_flops:.1%}",
                     f"{q[n]['eps_mse']:.5f} ({q[n]['eps_mse'] / q['dense']['eps_mse'] - 1:+.1%})",
                     f"{q[n]['sample_accuracy']:.3f} ({format_paired(paired(q['dense']['hits'], q[n]['hits']))})",
                     f"{q[n]['temporal_consistency']:.4f}",
                     f"{statistics.median(times[n]):.2f}", paired_speedup(times, n)])
    table = C.print_table(["model", "params", "block FLOPs", "held-out ε-MSE (vs dense)", "sample accuracy (vs dense)",
                           "temporal consistency", f"sample {args.sample_batch} videos, s", "speedup (paired)"], rows)
    log(f"real test videos: temporal consistency {temporal_consistency(real_v):.4f}; frame classifier on real test "
        f"videos: {(classify_videos(clf, real_v[real_y < 10]) == real_y[real_y < 10]).float().mean().item():.3f}")
    for v in q.values():
        v["hits"] = v["hits"].tolist()
    (out / "results.json").write_text(json.dumps({"quality": q, "times": times, "runs": runs, "table": table}, indent=1, default=str))
    for seed in args.judge_seeds:  # a process of its own: the judges' runs are what sora_judges.py prints alone
        judge = [sys.executable, str(Path(__file__).with_name("sora_judges.py")), "--model", args.model,
                 *(str(out / n) for n in args.variants), "--guidance", f"{dense.config.guidance:g}",
                 "--per-class", str(args.judge_per_class),
                 "--steps", str(args.steps), "--seed", str(seed), "--json", str(out / f"judges-seed{seed}.json")]
        if subprocess.run(judge, check=False).returncode:
            raise SystemExit(f"compress_sora: the judges failed on seed {seed}: run `{' '.join(judge)}` to see why")


if __name__ == "__main__":
    main()
