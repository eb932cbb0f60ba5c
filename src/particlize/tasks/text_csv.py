"""``text-csv``: your own text classification data, a CSV file with a text column and a label column.

Labels may be strings or numbers; the distinct values, sorted, become class ids ``0..K-1``
(``task.classes`` keeps their names). Split: seeded, stratified 80/10/10.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .base import DataError, Task, check_labels, make_splits

if TYPE_CHECKING:
    import pandas as pd

# only empty cells and NaN count as missing: texts such as "NA" or "null" stay texts
NA_VALUES = ["", "NaN", "nan"]


def _rows(mask: np.ndarray) -> str:
    """'rows 3, 7, 9 (and 4 more)' for a boolean mask over data rows (numbered as lines of the file)."""
    lines = np.flatnonzero(mask) + 2  # +1 for the header, +1 for 1-based line numbers
    more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
    return ("line " if len(lines) == 1 else "lines ") + ", ".join(str(x) for x in lines[:5]) + more


def _class_ids(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    uniq = values.unique()
    try:
        classes = sorted(uniq)
    except TypeError:  # mixed types that do not compare: order by their text
        classes = sorted(uniq, key=str)
    ids = {v: i for i, v in enumerate(classes)}
    return values.map(ids).to_numpy(dtype=np.int64), [str(c) for c in classes]


def load_text_csv(
    path: str | os.PathLike[str],
    text_column: str = "text",
    label_column: str = "label",
    *,
    seed: int = 0,
    name: str = "text-csv",
) -> Task:
    """A text `Task` from a CSV file with ``text_column`` and ``label_column``.

    Empty cells (and ``NaN``) in either column are errors, as are files without rows or with one class.
    """
    import pandas as pd  # imported here: pandas is slow to import and only this loader needs it

    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such CSV file: {p}")
    try:
        df = pd.read_csv(p, keep_default_na=False, na_values=NA_VALUES)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{p} is empty; it needs a header row with {text_column!r} and {label_column!r} and data rows"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{p} is not a readable CSV file ({str(e).splitlines()[0]})") from None
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise DataError(
            f"{p} has no column {' or '.join(repr(c) for c in missing)}; its columns are "
            f"{', '.join(repr(str(c)) for c in df.columns)}. Pass text_column=... / label_column=... "
            "(CLI: --text-column / --label-column)"
        )
    what = f"{p} ({label_column!r} column)"
    if len(df) == 0:
        raise DataError(f"{p} has a header but no data rows")
    bad = df[label_column].isna().to_numpy()
    if bad.any():
        raise DataError(
            f"{p}: {int(bad.sum())} empty or NaN labels in column {label_column!r} ({_rows(bad)}); "
            "fill or remove those rows"
        )
    bad = df[text_column].isna().to_numpy()
    if bad.any():
        raise DataError(
            f"{p}: {int(bad.sum())} empty texts in column {text_column!r} ({_rows(bad)}); fill or remove those rows"
        )
    labels, classes = _class_ids(df[label_column])
    check_labels(labels, what, classes)
    texts = [str(t) for t in df[text_column].tolist()]
    return Task(
        name, "text", make_splits(texts, labels, seed=seed), classes,
        info={"path": str(p.resolve()), "text_column": text_column, "label_column": label_column, "seed": seed},
    )
