"""MovieLens 100K end to end on the real ratings (downloaded once by pip into the cache): train NeuMF
briefly, compress it to half its FLOPs with recovery, evaluate. Slow: run by `make test-all`."""

from __future__ import annotations

import pytest
import torch

from particlize.adapters import decompose
from particlize.loop import compress
from particlize.models.recommender import NeuMF
from particlize.recover import train_recommender
from particlize.tasks import get_task

pytestmark = pytest.mark.slow


def test_movielens_train_compress_evaluate():
    torch.set_num_threads(1)  # tiny embedding steps: more threads only contend on a shared machine
    task = get_task("movielens-100k")
    assert (task.num_users, task.num_items) == (943, 1682)
    assert task.sizes() == {"train": 80_000, "val": 10_000, "test": 10_000}
    torch.manual_seed(0)
    dense = NeuMF(task.num_users, task.num_items, mean=task.mean_rating)
    train_recommender(dense, task, epochs=3, lr=5e-3, batch_size=1024)
    before = task.evaluate(dense, "test")
    assert before["rmse"] < 1.0 and before["users"] == 943  # predicting the mean gives ~1.13
    res = compress(dense, task, target_flops=0.5, granularity=("factors", "neurons"), recover_epochs=1,
                   min_quality=0.0, batch_size=1024)
    small = res.model
    assert res.reason == "target met"
    assert decompose(small).cost().flops <= 0.5 * decompose(dense).cost().flops + 1e-6
    after = task.evaluate(small, "test")
    assert after["rmse"] < 1.05 and 0.0 < after["hr@10"] <= 1.0
