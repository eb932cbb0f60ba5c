"""The recommender: the movielens task (synthetic ratings of the same shape), NeuMF / MF, the factor and
neuron particles (masked == pruned), save/load, training and compression with recovery."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import particlize as pz
from conftest import assert_masked_equals_pruned
from particlize.errors import ParticlizeError
from particlize.models.recommender import MatrixFactorization, NeuMF
from particlize.loop import compress
from particlize.recover import recover, train_recommender
from particlize.recover.config import RecoveryConfig
from particlize.tasks import DataError, RatingTask, get_task
from particlize.tasks.movielens import MEMBER, fetch, parse, rating_task
from particlize.train import fine_tune
from strategies import removal_sets

USERS, ITEMS, PER_USER = 40, 160, 25
ATOL = 1e-5


def _rows(seed: int = 0) -> np.ndarray:
    """``(user, item, rating, timestamp)`` rows from a rank-3 model with biases, ids 1-based like ML-100K."""
    rng = np.random.default_rng(seed)
    p, q = rng.normal(size=(USERS, 3)), rng.normal(size=(ITEMS, 3))
    bu, bi = rng.normal(0, 0.5, USERS), rng.normal(0, 0.5, ITEMS)
    rows = []
    for u in range(USERS):
        for i in rng.choice(ITEMS, PER_USER, replace=False):
            r = np.clip(np.rint(3.5 + bu[u] + bi[i] + p[u] @ q[i] * 0.7 + rng.normal(0, 0.3)), 1, 5)
            rows.append((u + 1, i + 1, r, 880_000_000 + rng.integers(0, 10**6)))
    return np.asarray(rows, dtype=np.float64)


@pytest.fixture(scope="module")
def task() -> RatingTask:
    return rating_task(_rows(), name="synthetic")


def _inter_text(rows: np.ndarray) -> str:
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{int(u)}\t{int(i)}\t{int(r)}\t{int(t)}" for u, i, r, t in rows]
    return "\n".join(lines) + "\n"


def _wheel(path: Path, rows: np.ndarray) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBER, _inter_text(rows))
        z.writestr("recbole/__init__.py", "")
    return path


def _neumf(seed: int = 0) -> NeuMF:
    torch.manual_seed(seed)
    m = NeuMF(USERS, ITEMS, factors=6, mlp_factors=5, layers=(8, 4)).eval()
    with torch.no_grad():  # biases away from zero so that pruning has something to get wrong
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _pairs(n: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"users": torch.randint(0, USERS, (n,), generator=g), "items": torch.randint(0, ITEMS, (n,), generator=g)}


# --------------------------------------------------------------------------------------------------
# The task


def test_split_sizes_heldout_and_negatives(task):
    assert task.sizes() == {"train": 800, "val": 100, "test": 100}
    train = set(zip(*(t.tolist() for t in task.split("train")[:2])))
    users, items = {}, {}
    for s in ("train", "val", "test"):
        u, i, _ = task.split(s)
        for a, b in zip(u.tolist(), i.tolist()):
            users.setdefault(a, set()).add(b)
    for split in ("val", "test"):
        us, cand = task._rank[split]
        assert len(us) == USERS and cand.shape == (USERS, 100)
        for u, row in zip(us.tolist(), cand.tolist()):
            assert (u, row[0]) not in train  # the held-out positive is never trained on
            assert row[0] in users[u] and not set(row[1:]) & users[u]  # negatives: never rated
            assert len(set(row[1:])) == 99


def test_latest_interaction_is_the_test_positive():
    rows = _rows()
    task = rating_task(rows)
    us, cand = task._rank["test"]
    ids_u, ids_i = np.unique(rows[:, 0]), np.unique(rows[:, 1])
    for u, pos in zip(us.tolist()[:10], cand[:, 0].tolist()):
        mine = rows[rows[:, 0] == ids_u[u]]
        latest = mine[np.lexsort((mine[:, 1], mine[:, 3]))][-1]
        assert ids_i[pos] == latest[1]


class _Oracle(torch.nn.Module):
    """Scores pairs from a lookup table: the true rating of known pairs, ``fill`` elsewhere."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, users, items):
        return self.table[users, items][:, None]


def test_metrics_of_a_perfect_and_a_worst_ranker(task):
    table = torch.zeros(USERS, ITEMS)
    for s in ("train", "val", "test"):
        u, i, r = task.split(s)
        table[u, i] = r
    perfect = task.evaluate(_Oracle(table.clone()), "test")
    assert perfect["rmse"] == pytest.approx(0.0) and perfect["n"] == 100
    us, cand = task._rank["test"]
    table[us, cand[:, 0]] = 10.0  # held-out items on top
    assert task.evaluate(_Oracle(table.clone()))["hr@10"] == 1.0
    assert task.evaluate(_Oracle(table.clone()))["ndcg@10"] == 1.0
    table[us, cand[:, 0]] = -10.0  # at the bottom: ranked 100th
    worst = task.evaluate(_Oracle(table))
    assert worst["hr@10"] == 0.0 and worst["ndcg@10"] == 0.0
    q = task.quality(_Oracle(torch.full((USERS, ITEMS), 3.0)), "val")
    assert q["quality"] == pytest.approx(1 / q["rmse"])


def test_fetch_from_a_wheel_keeps_one_file(tmp_path):
    wheel = _wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl", _rows())
    t = get_task("movielens-100k", cache=tmp_path / "cache", wheel=wheel)
    assert t.kind == "rating" and t.num_users == USERS and sum(t.sizes().values()) == USERS * PER_USER
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["ml-100k.inter"]
    assert parse((tmp_path / "cache" / "ml-100k.inter").read_bytes()).shape == (USERS * PER_USER, 4)


def test_fetch_errors_name_what_to_do(tmp_path):
    with pytest.raises(DataError, match="no such file.*recbole-1.2.1 wheel"):
        fetch(tmp_path / "c", tmp_path / "missing.whl")
    bad = tmp_path / "other.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("x.txt", "")
    with pytest.raises(DataError, match="does not contain .*ml-100k.inter"):
        fetch(tmp_path / "c", bad)
    with pytest.raises(DataError, match="line 2 of the MovieLens file is malformed"):
        parse("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\tx\t3\t4\n")


# --------------------------------------------------------------------------------------------------
# Particles


def test_decompose_neumf_groups_and_costs():
    m = _neumf()
    pm = pz.decompose(m)
    assert pm.adapter == "recommender"
    assert {(g.name, g.kind, g.size) for g in pm.groups} == {
        ("gmf.factors", "factor", 6), ("mlp.factors", "factor", 5),
        ("mlp.0.neurons", "neuron", 8), ("mlp.2.neurons", "neuron", 4),
    }
    assert pm.cost().params == sum(p.numel() for p in m.parameters())
    # FLOPs per scored pair: the GMF product and gmf_out, and the MLP's three Linears
    assert pm.cost().flops == 6 + 2 * 6 + 2 * (10 * 8 + 8 * 4 + 4)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_masked_equals_pruned_neumf(data):
    pm = pz.decompose(_neumf())
    remove = data.draw(removal_sets(pm))
    small = assert_masked_equals_pruned(pm, remove, _pairs(), ATOL)
    assert sum(p.numel() for p in small.parameters()) == pm.cost(remove).params


@settings(max_examples=10, deadline=None)
@given(remove=st.lists(st.integers(0, 7), max_size=7, unique=True))
def test_masked_equals_pruned_mf(remove):
    torch.manual_seed(0)
    pm = pz.decompose(MatrixFactorization(USERS, ITEMS, factors=8))
    assert [(g.name, g.kind, g.size) for g in pm.groups] == [("factors", "factor", 8)]
    small = assert_masked_equals_pruned(pm, {"factors": remove}, _pairs(), ATOL)
    assert small.user_factors.embedding_dim == 8 - len(remove)


def test_per_example_gates_ablate_one_example():
    pm = pz.decompose(_neumf())
    x = _pairs(4)
    gates = torch.ones(4, 6)
    gates[1, :3] = 0
    with torch.no_grad(), pm.gates({"gmf.factors": gates}) as gated:
        y = gated(**x)
    with torch.no_grad(), pm.ablate({"gmf.factors": [0, 1, 2]}) as gated:
        y1 = gated(**x)
    with torch.no_grad():
        ref = pm.model(**x)
    torch.testing.assert_close(y[1], y1[1])
    torch.testing.assert_close(y[[0, 2, 3]], ref[[0, 2, 3]])


def test_save_load_round_trip_of_a_pruned_model(tmp_path):
    pm = pz.decompose(_neumf())
    small = pm.prune({"gmf.factors": [0, 4], "mlp.factors": [1], "mlp.0.neurons": [2, 3, 7], "mlp.2.neurons": [0]})
    pz.save(small, tmp_path / "m")
    back = pz.load(tmp_path / "m")
    x = _pairs()
    torch.testing.assert_close(back(**x), small(**x), rtol=0, atol=0)
    assert back.user_gmf.embedding_dim == 4 and back.mlp[0].in_features == 8 and back.mlp[0].out_features == 5
    with pytest.raises(ParticlizeError, match="already exists"):
        pz.save(small, tmp_path / "m")


# --------------------------------------------------------------------------------------------------
# Training, recovery, compression


def test_recovery_distils_a_pruned_model(task):
    torch.manual_seed(0)
    teacher = NeuMF(task.num_users, task.num_items, factors=6, mlp_factors=5, layers=(8, 4), mean=task.mean_rating)
    train_recommender(teacher, task, epochs=8, lr=1e-2, batch_size=64)
    pm = pz.decompose(teacher)
    student = pm.prune({"gmf.factors": [0, 1, 2], "mlp.0.neurons": [0, 1, 2, 3]})
    before = task.evaluate(student, "val")["rmse"]
    summary = recover(student, teacher, task, RecoveryConfig(epochs=2, lr=1e-2))
    assert summary["steps"] > 0
    assert task.evaluate(student, "val")["rmse"] <= before + 1e-6  # the best validation epoch is kept


def test_train_and_compress_end_to_end(tmp_path):
    wheel = _wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl", _rows())
    kwargs = {"cache": str(tmp_path / "cache"), "wheel": str(wheel)}
    folder = fine_tune("movielens-100k", tmp_path / "neumf", model="neumf", epochs=3, lr=1e-2,
                                task_kwargs=kwargs)
    model = pz.load(folder)
    assert isinstance(model, NeuMF)
    task = get_task("movielens-100k", **kwargs)
    res = compress(model, task, target_flops=0.5, granularity=("factors", "neurons"), recover_epochs=1,
                      min_quality=0.0, max_rounds=4)
    last = res.history[-1]
    assert last["flops_ratio"] <= 0.5 + 1e-9 and res.reason.startswith("target met")
    assert 0.0 < last["quality"] and "hr@10" in last["val"]
    assert sum(p.numel() for p in res.model.parameters()) < sum(p.numel() for p in model.parameters())
    with pytest.raises(ParticlizeError, match="rating tasks train neumf, mf"):
        fine_tune("movielens-100k", tmp_path / "x", model="minilm", task_kwargs=kwargs)
