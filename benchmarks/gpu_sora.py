"""Train the Sora-style reference on a GPU in a fixed time and judge it (issue 33), unattended, results to one folder.

    PYTHONPATH=src python benchmarks/gpu_sora.py --out $OUT --device cuda [--preset base] [--minutes 6]
        [--batch-size 128] [--lr 1e-3]
    PYTHONPATH=src python benchmarks/gpu_sora.py --out /tmp/gs --device cpu --small      # smoke run (a minute)

1. A short probe run (``--probe-steps``) measures this machine's optimizer steps per second for the preset.
2. The real run gets as many steps as fit in ``--minutes`` (a cosine schedule that ends when the time does,
   `particlize.train_sora.train_sora` with a ``max_seconds`` guard 10% + 30 s past it, so a busy machine still
   finishes a short run) and saves its EMA weights as the MODEL folder ``OUT/sora-<preset>`` (``pz.load``-able;
   copy it to ``src/particlize/models/weights/`` to ship).
3. `sora_judges.py` judges it beside the shipped ``sora-digits``: readers never tuned with it, Fréchet distances and
   the motion check, against real test videos (``OUT/judges.json``); sampling runs on ``--device``.

``OUT/gpu_sora.json`` holds the probe's rate, the steps, the seconds and the held-out ε-MSE; it is rewritten after
each stage. The ``base`` preset is the task's 8 frames of 32×32 with 1-frame temporal patches (a token per frame,
so a digit can move every frame), dim 128, depth 6: about 2.6 M parameters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common as C
import torch

from particlize.errors import ParticlizeError
from particlize.models.sora import PRESETS
from particlize.train_sora import train_sora

HERE = Path(__file__).resolve().parent
SHIFT, FRAME_CORR = 2.0, 0.5  # the CPU runs of 2026-12-05: both needed for digits that stay put (results/sora-judges.md)
FRAME_STEPS, FRAME_LAG = 0.5, 8  # session 21: readers per frame 0.85x -> 0.90x, FD per frame 2.0x -> 1.6x
ROPE = True  # session 22: rotary frame positions; without them the learned temporal positions collapse (no motion)


def probe(preset: str, out: Path, args: argparse.Namespace) -> float:
    """Optimizer steps per second of ``preset`` at ``--batch-size`` on ``--device``, after a few warm-up steps."""
    marks: dict[int, float] = {}
    warm = max(2, args.probe_steps // 5)

    def tick(step: int, steps: int, loss: float) -> None:
        if step in (warm, steps):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            marks[step] = time.perf_counter()

    train_sora(preset, args.probe_steps, out, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
               device=args.device, progress=tick, force=True, checkpoint_every=0, **recipe(args))
    return (args.probe_steps - warm) / (marks[args.probe_steps] - marks[warm])


def recipe(args: argparse.Namespace) -> dict:
    """The preset overrides this run trains with (noise shift, frame-correlated noise, steps per frame, the
    sampler's lag and rotary frame positions)."""
    return {"shift": args.shift, "frame_corr": args.frame_corr, "frame_steps": args.frame_steps,
            "frame_lag": args.frame_lag, "rope": args.rope}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="base", choices=sorted(PRESETS))
    ap.add_argument("--minutes", type=float, default=6.0, help="training time after the probe")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shift", type=float, default=SHIFT, help="noise shift (SNR / shift²; 1 = none)")
    ap.add_argument("--frame-corr", type=float, default=FRAME_CORR, help="noise correlation across frames (0 = none)")
    ap.add_argument("--frame-steps", type=float, default=FRAME_STEPS,
                    help="share of training videos whose frames get their own step (diffusion forcing; 0 = none)")
    ap.add_argument("--frame-lag", type=int, default=FRAME_LAG, help="the trained model samples frame after frame "
                    "with this lag in DDIM steps (needs --frame-steps)")
    ap.add_argument("--rope", action=argparse.BooleanOptionalAction, default=ROPE,
                    help="rotary frame positions in the temporal attention")
    ap.add_argument("--probe-steps", type=int, default=60)
    ap.add_argument("--per-class", type=int, default=10, help="judged samples per digit and guidance scale")
    ap.add_argument("--small", action="store_true", help="smoke run: the tiny preset, seconds of training, few samples")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT/gpu_sora.json")
    ap.add_argument("--fp32-matmul", choices=["highest", "high"], default="high",
                    help="torch.set_float32_matmul_precision while training: 'high' lets a GPU's tensor cores run fp32 "
                         "matmuls in TF32 (more steps in the same minutes), 'highest' keeps full fp32; the judges "
                         "sample in their own process at full fp32")
    args = ap.parse_args()
    torch.set_float32_matmul_precision(args.fp32_matmul)
    if args.small:
        args.preset, args.minutes, args.batch_size, args.probe_steps, args.per_class = "tiny", 0.25, 8, 10, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_sora: --device cuda but torch sees no GPU; run with --device cpu --small for a smoke run")
    summary_path = args.out / "gpu_sora.json"
    if summary_path.exists() and not args.force:
        raise SystemExit(f"gpu_sora: {summary_path} exists; pass --force to replace it")
    C.start()
    res: dict = {"machine": C.machine_line(), "command": " ".join(["python", *sys.argv]), "settings": vars(args) | {"out": str(args.out)}}
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name(0)
    rate = probe(args.preset, args.out / "probe", args)
    steps = max(1, int(rate * args.minutes * 60 * 0.95))
    res["probe"] = {"steps_per_s": rate, "videos_per_s": rate * args.batch_size}
    res["planned_steps"] = steps
    C.write_json(summary_path, res)
    print(f"probe: {rate:.1f} steps/s at batch {args.batch_size}; training {steps} steps (~{args.minutes:g} min)", flush=True)

    model_dir = args.out / f"sora-{args.preset}"
    if (model_dir / "checkpoint").exists():  # a killed earlier run's, planned for another step count: start afresh
        shutil.rmtree(model_dir / "checkpoint")
    t = time.perf_counter()
    try:
        train_sora(args.preset, steps, model_dir, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   device=args.device, max_seconds=args.minutes * 60 * 1.1 + 30, force=True, **recipe(args),
                   progress=lambda s, n, loss: print(f"step {s}/{n} loss {loss:.4f}", flush=True) if s % 500 == 0 else None)
    except ParticlizeError as e:
        res["error"] = str(e)
        C.write_json(summary_path, res)
        raise
    extra = json.loads((model_dir / "particlize.json").read_text())["extra"]
    res["train"] = {k: extra[k] for k in ("steps_done", "stopped_early", "seconds", "final_loss", "eps_mse_test")}
    res["train"]["wall_s"] = time.perf_counter() - t
    C.write_json(summary_path, res)
    print(f"trained {extra['steps_done']} steps in {extra['seconds']:.0f} s; held-out eps-MSE {extra['eps_mse_test']}", flush=True)

    judge = [sys.executable, str(HERE / "sora_judges.py"), "--model", str(model_dir), "sora-digits", "--guidance", "3", "5", "7",
             "--per-class", str(args.per_class), "--device", args.device, "--json", str(args.out / "judges.json")]
    if args.small:
        judge[judge.index("--guidance") + 1:judge.index("--per-class")] = ["5"]
        judge += ["--steps", "2", "--real-videos", "40"]
    t = time.perf_counter()
    done = subprocess.run(judge, check=False)
    res["judges"] = {"returncode": done.returncode, "seconds": time.perf_counter() - t, "json": str(args.out / "judges.json")}
    C.write_json(summary_path, res)
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
