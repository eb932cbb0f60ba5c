"""Independent judges of a class-conditional video DiT (issue 33): readers it was never tuned with, a Fréchet
distance and a motion check, on real test videos and on samples side by side.

    .venv/bin/python benchmarks/sora_judges.py [--model sora-tiny [MODEL ...]] [--guidance 3 5 7] [--per-class 10]
        [--steps 50] [--seed 0] [--real-videos 260] [--frame-lag L] [--json benchmarks/results/sora-judges.json]

The judges (`particlize.tasks.digit_judges.fit_judges`) learn from the ``val`` digit images only, which the
generator never saw (it trains on ``train`` images). "Real" is every single-digit video of the moving-digits
``test`` split rendered with ``--real-videos`` videos (the default 260 gives about 200 single-digit videos, so
each half for the Fréchet baseline holds as many videos as the 100 samples). Samples: ``--per-class`` videos
per digit, DDIM ``--steps`` steps from seed ``--seed`` (the project's sampler, `SpacetimeDiT.sample`), at each
guidance scale. Two reference rows come first: videos rendered from the ``train`` digit images (what a perfect
generator of its training videos would score: the targets are reachable when these meet them) and fresh renders of
the ``test`` images (the judges' noise floor); ``--model`` with no name gives the references only. Printed per
model and scale: both readers' per-frame and per-video accuracy with the ratio samples / real, the project's own
frame classifier for reference (not independent: trained on ``train`` frames), Fréchet distances per frame and
per video as a multiple of the real-half-vs-half distance, and the motion check (centroid path vs the closest
bounce). Targets of the issue: ratio ≥ 0.90, FD ≤ 2× real.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _common as C
import numpy as np
import torch
import torch.nn.functional as F

import particlize as pz
from particlize.tasks.digit_judges import READERS, compare_to_real, fit_judges
from particlize.tasks.moving_digits import MovingDigitsTask, load_frame_classifier, moving_digits, render


@torch.no_grad()
def project_cnn(clf: torch.nn.Module, videos: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The shipped frame classifier's per-frame and per-video (summed log-probabilities) accuracy."""
    B, _, T, H, W = videos.shape
    logp = F.log_softmax(clf(videos.transpose(1, 2).reshape(B * T, 1, H, W)), -1).reshape(B, T, -1)
    return {"frame_accuracy": (logp.argmax(-1) == labels[:, None]).float().mean().item(),
            "video_accuracy": (logp.sum(1).argmax(-1) == labels).float().mean().item()}


def rendered(task: MovingDigitsTask, split: str, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` one-digit videos of each digit rendered from ``split``'s digit images, the way the task renders
    its videos: what a perfect generator of that split's videos would draw."""
    images, y = task.digits[split]
    rng = np.random.default_rng([seed, 77])
    videos = [render(images[y == d], y[y == d], per_class, rng, frames=task.frames, size=task.size)[0]
              for d in range(10)]
    return torch.from_numpy(np.concatenate(videos)).float() / 255, torch.arange(10).repeat_interleave(per_class)


def _fmt(d: dict, key: str) -> str:
    return f"{d[key]['samples']:.2f} ({d[key]['ratio']:.2f}×)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="*", default=["sora-tiny"], help="anything pz.load takes (none: references only)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0, 7.0])
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-videos", type=int, default=260,
                    help="videos rendered for the test split (about 80%% show one digit)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cpu", help="where the models sample (cuda on a GPU machine)")
    ap.add_argument("--frame-lag", type=int, default=None,
                    help="sample with this per-frame lag instead of each model's own (models trained with frame_steps)")
    args = ap.parse_args()
    if args.per_class < 1 or args.steps < 1:
        ap.error("--per-class and --steps must be 1 or more")
    C.start()
    t0 = time.time()
    models = {name: pz.load(name).eval().to(args.device) for name in args.model}
    if args.frame_lag is not None:
        for m in models.values():
            m.config.frame_lag = args.frame_lag
    frames, size = next(((m.config.frames, m.config.size) for m in models.values()), (8, 32))
    task = moving_digits(seed=0, n_train=1, n_eval=args.real_videos, frames=frames, size=size)
    judges = fit_judges(task, seed=args.seed)
    print(f"judges fitted in {time.time() - t0:.0f}s on {judges.info}", flush=True)
    real, real_y = task.split("test")
    one = real_y < 10
    clf = load_frame_classifier().eval()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    res: dict = {"machine": C.machine_line(), "command": " ".join(["python", *sys.argv]),
                 "settings": vars(args) | {"json": str(args.json)}, "judges": judges.info,
                 "real": {"n_videos": int(one.sum()), "project_cnn": project_cnn(clf, real[one], real_y[one])},
                 "runs": []}
    head = ["model", "guidance", *(f"{r} {k}" for r in READERS for k in ("frame", "video")), "project CNN video",
            "FD frame", "FD video", "motion px / bounce"]
    rows = []

    def judge(name: str, guidance: str, samples: torch.Tensor, seconds: float) -> None:
        rep = compare_to_real(judges, samples, labels, real, real_y, seed=args.seed)
        rep["project_cnn"] = project_cnn(clf, samples, labels)
        rep["model"], rep["guidance"], rep["seconds"] = name, guidance, seconds
        res["runs"].append(rep)
        if not rows:
            jr = rep["real"]
            rows.append(["real test", "—", *(f"{jr['readers'][r][k]:.2f}" for r in READERS
                                               for k in ("frame_accuracy", "video_accuracy")),
                         f"{res['real']['project_cnn']['video_accuracy']:.2f}",
                         f"{rep['frechet']['frame']['real_halves']:.3f} (half vs half)",
                         f"{rep['frechet']['video']['real_halves']:.3f} (half vs half)",
                         f"{jr['motion']['mean_residual_px']:.2f} / {jr['motion']['bounce_share']:.2f}"])
        rd, fd, mo = rep["readers"], rep["frechet"], rep["samples"]["motion"]
        rows.append([name, guidance, *(_fmt(rd[r], k) for r in READERS for k in ("frame_accuracy", "video_accuracy")),
                     f"{rep['project_cnn']['video_accuracy']:.2f}",
                     f"{fd['frame']['samples']:.3f} ({fd['frame']['ratio']:.1f}×)",
                     f"{fd['video']['samples']:.3f} ({fd['video']['ratio']:.1f}×)",
                     f"{mo['mean_residual_px']:.2f} / {mo['bounce_share']:.2f}"])
        print(" | ".join(rows[-1]), f"[{seconds:.0f}s]", flush=True)
        if args.json:  # written after every run, atomically, so a long run keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(args.json)

    # references: what a perfect generator of the training videos (train images) would score, and fresh renders
    # of the test images themselves (the judges' noise floor)
    for split in ("train", "test"):
        judge(f"{split}-image videos", "ref", rendered(task, split, args.per_class, args.seed)[0], 0.0)
    for name, model in models.items():
        if (model.config.frames, model.config.size) != (frames, size):
            raise SystemExit(f"{name}: videos of {model.config.frames}x{model.config.size} differ from {frames}x{size}")
        for g in args.guidance:
            t = time.time()
            judge(name, f"{g:g}", model.sample(labels, steps=args.steps, seed=args.seed, guidance=g).cpu(),
                  time.time() - t)
    C.print_table(head, rows)
    print(f"({len(labels)} samples per row; real = {int(one.sum())} single-digit test videos; "
          f"ratio = samples / real; FD × = FD(samples, real half B) / FD(real half A, real half B))")


if __name__ == "__main__":
    main()
