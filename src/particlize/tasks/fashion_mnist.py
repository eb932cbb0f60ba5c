"""``fashion-mnist``: 70,000 28×28 grey images of clothes in 10 classes (Zalando, MIT licence).

Read from the IDX files of the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
gzipped or raw) with numpy; nothing is downloaded. Test = the 10,000 official test images; val = a seeded
stratified 10% of the 60,000 training images; train = the rest.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .base import DataError, Task, check_labels, stratified_split

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
APT = "apt-get install -y dataset-fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An IDX file (``.gz`` or raw) as a numpy array; only unsigned-byte data, as in (Fashion-)MNIST."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {p} ({e}); reinstall the data: {APT}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{p} is not an IDX file (bad magic number)")
    dtype, ndim = raw[2], raw[3]
    if dtype != _UBYTE:
        raise DataError(f"{p} holds IDX data type 0x{dtype:02x}; only unsigned bytes (0x08) are supported")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(shape)):
        raise DataError(f"{p} is truncated or corrupt: header says {shape}, file has {len(raw) - start} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"Fashion-MNIST not found: no {stem}(.gz) in {folder}. Install it with `{APT}` "
        "or pass data_dir=... (a folder with the four IDX files)"
    )


def _read_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(_find(folder, FILES[split][0]))
    labels = read_idx(_find(folder, FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST {split} files do not match: images {images.shape}, labels {labels.shape} in {folder}"
        )
    return images, labels.astype(np.int64)


def load_fashion_mnist(
    *, seed: int = 0, val_fraction: float = 0.1, data_dir: str | os.PathLike[str] | None = None
) -> Task:
    """The ``fashion-mnist`` image `Task` (items ``[N, 1, 28, 28]`` in [0, 1], 10 classes)."""
    folder = Path(data_dir) if data_dir is not None else DATA_DIR
    train_x, train_y = _read_pair(folder, "train")
    test_x, test_y = _read_pair(folder, "test")
    check_labels(train_y, f"Fashion-MNIST training labels in {folder}", CLASSES)
    if train_y.max() >= len(CLASSES) or test_y.max(initial=0) >= len(CLASSES):
        raise DataError(f"Fashion-MNIST labels in {folder} go beyond the 10 classes")
    train_idx, val_idx = stratified_split(train_y, (1 - val_fraction, val_fraction), seed=seed)
    # kept as uint8 [N, 1, H, W] (a quarter of the memory of float32); Task scales to [0, 1] when asked
    x = torch.from_numpy(train_x.copy()).unsqueeze(1)
    y = torch.from_numpy(train_y)
    splits = {
        "train": (x[torch.from_numpy(train_idx)], y[torch.from_numpy(train_idx)]),
        "val": (x[torch.from_numpy(val_idx)], y[torch.from_numpy(val_idx)]),
        "test": (torch.from_numpy(test_x.copy()).unsqueeze(1), torch.from_numpy(test_y)),
    }
    return Task("fashion-mnist", "image", splits, CLASSES, info={"path": str(folder), "seed": seed})
