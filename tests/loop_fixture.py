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

# compress(model, task, tokenizer=tok, **OPTIONS) as main ran it: the plan (the kept indices of every cut) and
# every round's metrics, asserted by test_loop.py. Recorded again when calibration became a seeded subset of the
# whole training split (it was the split's first `calib_examples` reordered); before that, from the code before
# the loop was split up.
REFERENCE = {'reason': 'target met',
 'plan': [{'verb': 'prune',
           'group': 'encoder.encoder.layer.1.intermediate.neurons',
           'args': {'keep': [0,
                             1,
                             2,
                             7,
                             14,
                             16,
                             19,
                             21,
                             24,
                             27,
                             29,
                             31,
                             32,
                             34,
                             35,
                             37,
                             43,
                             50,
                             54,
                             55,
                             56,
                             57,
                             59,
                             60,
                             62]}},
          {'verb': 'prune',
           'group': 'encoder.encoder.layer.0.intermediate.neurons',
           'args': {'keep': [0, 1, 6, 10, 11, 12, 22, 27, 29, 30, 33, 37, 39, 40, 45, 49, 54, 57, 60]}},
          {'verb': 'prune', 'group': 'encoder.encoder.layer.1.attention.heads', 'args': {'keep': [0, 1, 2]}},
          {'verb': 'prune', 'group': 'encoder.encoder.layer.0.attention.heads', 'args': {'keep': [1, 3]}},
          {'verb': 'prune',
           'group': 'encoder.encoder.layer.1.intermediate.neurons',
           'args': {'keep': [1, 3, 4, 5, 6, 7, 9, 10, 13, 15, 16, 17, 18, 19, 21, 22, 23, 24]}},
          {'verb': 'prune',
           'group': 'encoder.encoder.layer.0.intermediate.neurons',
           'args': {'keep': [1, 2, 3, 7, 8, 9, 10, 12, 16, 18]}},
          {'verb': 'prune', 'group': 'encoder.encoder.layer.1.attention.heads', 'args': {'keep': [2]}}],
 'history': [{'round': 0,
              'params': 19874,
              'flops': 49152.0,
              'flops_ratio': 1.0,
              'params_ratio': 1.0,
              'quality': 0.875,
              'val': {'accuracy': 0.875, 'loss': 0.6708920001983643, 'n': 24},
              'removed': {}},
             {'round': 1,
              'params': 11270,
              'flops': 26112.0,
              'flops_ratio': 0.53125,
              'params_ratio': 0.5670725571097917,
              'quality': 0.7916666666666666,
              'val': {'accuracy': 0.7916666666666666, 'loss': 0.664216677347819, 'n': 24},
              'removed': {'encoder.encoder.layer.1.intermediate.neurons': 39,
                          'encoder.encoder.layer.0.intermediate.neurons': 45,
                          'encoder.encoder.layer.1.attention.heads': 1,
                          'encoder.encoder.layer.0.attention.heads': 2}},
             {'round': 2,
              'params': 8134,
              'flops': 15872.0,
              'flops_ratio': 0.3229166666666667,
              'params_ratio': 0.40927845426184967,
              'quality': 0.7083333333333334,
              'val': {'accuracy': 0.7083333333333334, 'loss': 0.6597091754277548, 'n': 24},
              'removed': {'encoder.encoder.layer.1.intermediate.neurons': 7,
                          'encoder.encoder.layer.0.intermediate.neurons': 9,
                          'encoder.encoder.layer.1.attention.heads': 2}}]}


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
