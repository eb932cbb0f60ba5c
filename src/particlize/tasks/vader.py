"""``vader-sentiment``: 10,605 movie-review sentences rated by humans (Hutto & Gilbert, ICWSM 2014).

The sentences ship inside the MIT-licensed ``vaderSentiment`` source distribution on PyPI. The first use
downloads that sdist with pip (no network access is needed afterwards), takes
``additional_resources/hutto_ICWSM_2014.tar.gz`` → ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``
out of it and keeps only that text file in the cache folder (`particlize.tasks.base.cache_dir`).

Each line is ``id <TAB> mean rating (-4..+4) <TAB> sentence`` (UTF-8, CRLF). Label = sign of the rating:
1 positive, 0 negative; sentences rated exactly 0 are dropped. Split: seeded, stratified 80/10/10.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

from .base import DataError, Task, cache_dir, cached_file, check_labels, make_splits, pip_download

PACKAGE = "vadersentiment==3.3.2"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
FILE = "movieReviewSnippets_GroundTruth.txt"
CLASSES = ("negative", "positive")


def download_command(dest: str | os.PathLike[str] = "DIR") -> list[str]:
    """The pip command that fetches the sdist into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(dest)]


def _download_sdist(dest: Path) -> Path:
    """Run pip to download the vaderSentiment sdist into ``dest``; return the ``.tar.gz``."""
    return pip_download(download_command(dest), dest, "*.tar.gz", "the VADER sentences",
                        "get_task('vader-sentiment', sdist=PATH)")


def _extract(sdist: Path) -> bytes:
    """The ground-truth file's bytes from the sdist (reads the two archives; writes nothing)."""
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith(INNER_ARCHIVE)), None)
            if member is None:
                raise DataError(f"{sdist.name} does not contain {INNER_ARCHIVE}; is it the vaderSentiment 3.3.2 sdist?")
            inner_bytes = outer.extractfile(member).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            member = next((m for m in inner.getmembers() if m.name.endswith("/" + FILE) or m.name == FILE), None)
            if member is None:
                raise DataError(f"{INNER_ARCHIVE} in {sdist.name} does not contain {FILE}")
            return inner.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{sdist} is not a readable .tar.gz ({e}); delete it and try again") from None


def fetch(cache: str | os.PathLike[str] | None = None, sdist: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached ground-truth text file, extracting it on first use from ``sdist`` (a downloaded
    ``vaderSentiment-3.3.2.tar.gz``) or else from a fresh pip download."""
    folder = Path(cache) if cache is not None else cache_dir() / "vader"
    return cached_file(folder, FILE, sdist, "the vaderSentiment-3.3.2 sdist, a .tar.gz", _download_sdist, _extract)


def parse(data: bytes | str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(sentences, ratings, ids)`` from the ground-truth file's content (any line endings)."""
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    sentences, ratings, ids = [], [], []
    # split on line breaks only (str.splitlines would also cut at form feeds, U+2028, ...)
    for n, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        try:
            if len(fields) != 3:
                raise ValueError("expected 3 tab-separated fields")
            ids.append(int(fields[0]))
            ratings.append(float(fields[1]))
        except ValueError as e:
            raise DataError(f"line {n} of the VADER file is malformed ({e}): {line[:80]!r}") from None
        sentences.append(fields[2].strip())
    return sentences, np.asarray(ratings, dtype=float), np.asarray(ids, dtype=np.int64)


def load_vader(
    *, seed: int = 0, cache: str | os.PathLike[str] | None = None, sdist: str | os.PathLike[str] | None = None
) -> Task:
    """The ``vader-sentiment`` `Task` (binary: 0 negative, 1 positive).

    ``cache`` overrides the folder the text file is kept in; ``sdist`` is an already downloaded
    ``vaderSentiment-3.3.2.tar.gz`` to take the data from (offline machines).
    """
    path = fetch(cache, sdist)
    sentences, ratings, _ = parse(path.read_bytes())
    keep = np.flatnonzero(ratings != 0)
    labels = (ratings[keep] > 0).astype(np.int64)
    check_labels(labels, str(path), CLASSES)
    texts = [sentences[i] for i in keep]
    return Task(
        "vader-sentiment", "text", make_splits(texts, labels, seed=seed), CLASSES,
        info={"path": str(path), "seed": seed, "lines": len(sentences), "dropped_zero": len(sentences) - len(keep)},
    )
