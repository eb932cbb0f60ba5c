"""A tiny, quickly trained text classifier and task for the compress-loop tests (also run as a script by
the SIGKILL test: ``python loop_fixture.py WORKDIR OUT [--resume] [--kill-at EVENT ROUND [halfway]]``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from test_tasks import tiny_tokenizer, write_csv  # noqa: E402
from test_train import sentiment_rows, tiny_config  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.models.text import TextClassifier  # noqa: E402
from particlize.tasks import get_task  # noqa: E402
from particlize.recover import train_classifier  # noqa: E402

OPTIONS = dict(target_flops=0.35, recover_epochs=1, lr=1e-3, batch_size=16, min_quality=0.5, calib_examples=64,
               max_fraction=0.4, latency_batch=4, latency_seq=8)

# compress(model, task, tokenizer=tok, **OPTIONS) as main's code (before the loop was split up) ran it: the kept
# indices of every cut (the model's plan) and every round's metrics, asserted by test_loop.py
REFERENCE = {'reason': 'target met',
             'plan': [{'encoder.encoder.layer.1.intermediate.neurons': [0, 1, 2, 7, 14, 16, 19, 21, 24, 27, 29, 31, 32, 34, 35,
                                                                        37, 38, 43, 50, 54, 55, 56, 57, 59, 60, 62],
                       'encoder.encoder.layer.0.intermediate.neurons': [0, 1, 6, 10, 11, 12, 22, 27, 29, 30, 33, 37, 39, 40, 45,
                                                                        49, 54, 57, 60],
                       'encoder.encoder.layer.1.attention.heads': [0, 1],
                       'encoder.encoder.layer.0.attention.heads': [1, 2, 3]},
                      {'encoder.encoder.layer.0.intermediate.neurons': [1, 2, 6, 9, 12, 16, 18],
                       'encoder.encoder.layer.1.intermediate.neurons': [1, 3, 4, 5, 7, 9, 10, 13, 15, 17, 18, 19, 20, 22, 23, 24,
                                                                        25],
                       'encoder.encoder.layer.1.attention.heads': [0],
                       'encoder.encoder.layer.0.attention.heads': [0, 1]}],
             'history': [{'round': 0,
                          'params': 19874,
                          'flops': 49152.0,
                          'flops_ratio': 1.0,
                          'params_ratio': 1.0,
                          'quality': 0.875,
                          'val': {'accuracy': 0.875, 'loss': 0.6708920001983643, 'n': 24},
                          'removed': {}},
                         {'round': 1,
                          'params': 11335,
                          'flops': 26240.0,
                          'flops_ratio': 0.5338541666666666,
                          'params_ratio': 0.5703431619200966,
                          'quality': 0.7916666666666666,
                          'val': {'accuracy': 0.7916666666666666, 'loss': 0.664235512415568, 'n': 24},
                          'removed': {'encoder.encoder.layer.1.intermediate.neurons': 38,
                                      'encoder.encoder.layer.0.intermediate.neurons': 45,
                                      'encoder.encoder.layer.1.attention.heads': 2,
                                      'encoder.encoder.layer.0.attention.heads': 1}},
                         {'round': 2,
                          'params': 7874,
                          'flops': 15360.0,
                          'flops_ratio': 0.3125,
                          'params_ratio': 0.39619603502062994,
                          'quality': 0.6666666666666666,
                          'val': {'accuracy': 0.6666666666666666, 'loss': 0.6598004102706909, 'n': 24},
                          'removed': {'encoder.encoder.layer.0.intermediate.neurons': 12,
                                      'encoder.encoder.layer.1.intermediate.neurons': 9,
                                      'encoder.encoder.layer.1.attention.heads': 1,
                                      'encoder.encoder.layer.0.attention.heads': 1}}]}


def make(work: Path):
    """(model, task, tokenizer): trained once and cached in ``work`` so every process gets the same model."""
    torch.set_num_threads(1)
    tok = tiny_tokenizer(work / "tok")
    csv = work / "s.csv"
    if not csv.exists():
        write_csv(csv, sentiment_rows(240))
    task = get_task("text-csv", path=csv)
    if not (work / "dense" / "particlize.json").exists():
        torch.manual_seed(0)
        model = TextClassifier(tiny_config(len(tok)), num_labels=2)
        train_classifier(model, task, tokenizer=tok, epochs=3, lr=1e-3, batch_size=16)
        pz.save(model, work / "dense", tokenizer=tok, force=True)
    return pz.load(work / "dense"), task, tok


def sigkill_at(event: str, round_: int, halfway: bool = False):
    """A progress callback that SIGKILLs this process at ``event`` of round ``round_`` (``halfway``: at the middle
    step of a recovery), so a test kills a run at a known point instead of after a guessed wall-clock time."""
    import os
    import signal

    def progress(ev, info):
        if ev == event and info.get("round") == round_ and (not halfway or info["step"] == info["total"] // 2):
            os.kill(os.getpid(), signal.SIGKILL)

    return progress


if __name__ == "__main__":
    from particlize.loop import compress

    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    model, task, tok = make(work)
    kill = None
    if "--kill-at" in sys.argv:  # --kill-at EVENT ROUND [halfway]
        i = sys.argv.index("--kill-at")
        kill = sigkill_at(sys.argv[i + 1], int(sys.argv[i + 2]), "halfway" in sys.argv[i + 3:])
    compress(model, task, tokenizer=tok, out=out, resume="--resume" in sys.argv, progress=kill, **OPTIONS)
