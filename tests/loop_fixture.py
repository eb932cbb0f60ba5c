"""A tiny, quickly trained text classifier and task for the compress-loop tests (also run as a script by
the SIGKILL test: ``python loop_fixture.py WORKDIR OUT [--resume]``)."""

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
from particlize.train import train_classifier  # noqa: E402

OPTIONS = dict(target_flops=0.35, recover_epochs=1, lr=1e-3, batch_size=16, min_quality=0.5, calib_examples=64,
               max_fraction=0.4, latency_batch=4, latency_seq=8)


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


if __name__ == "__main__":
    from particlize.loop import compress

    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    model, task, tok = make(work)
    compress(model, task, tokenizer=tok, out=out, resume="--resume" in sys.argv, **OPTIONS)
