"""Tasks: CSV/VADER/Fashion-MNIST loading, stratified splits, batching, evaluation and clear data errors.

Everything here is offline and synthetic (tiny files in tmp); the real downloads are marked slow.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from particlize import ParticlizeError
from particlize.tasks import TASKS, DataError, Task, get_task, stratified_split
from particlize.tasks import fashion_mnist as fm
from particlize.tasks import vader

WORDS = ["the", "a", "movie", "film", "plot", "actor", "good", "great", "bad", "awful", "very", "quite"]


def tiny_tokenizer(folder: Path):
    """A real BERT WordPiece tokenizer over a dozen words (vocab file in ``folder``)."""
    import transformers as T

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return T.BertTokenizerFast.from_pretrained(str(folder))


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return path


@pytest.fixture
def csv3(tmp_path: Path) -> Path:
    """200 rows, 3 string classes (100 pos, 60 neg, 40 meh)."""
    rng = np.random.default_rng(0)
    labels = ["pos"] * 100 + ["neg"] * 60 + ["meh"] * 40
    rows = [(" ".join([f"row{i}", *rng.choice(WORDS, rng.integers(0, 9))]), y) for i, y in enumerate(labels)]
    return write_csv(tmp_path / "data.csv", rows)


# ---- splits ----------------------------------------------------------------------------------------


def test_text_csv_splits_are_stratified_sized_and_seeded(csv3: Path) -> None:
    task = get_task("text-csv", path=csv3, text_column="text", label_column="label")
    assert (task.name, task.kind, task.num_classes) == ("text-csv", "text", 3)
    assert task.classes == ["meh", "neg", "pos"]  # sorted names -> ids 0, 1, 2
    assert task.sizes() == {"train": 160, "val": 20, "test": 20}
    for split, n in task.sizes().items():
        texts, labels = task.split(split)
        assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)
        assert labels.dtype == torch.long and len(labels) == len(texts) == n
        assert Counter(labels.tolist()) == {0: n * 40 // 200, 1: n * 60 // 200, 2: n * 100 // 200}
    # the label mapping follows the rows of the file
    import pandas as pd

    df = pd.read_csv(csv3)
    by_text = dict(zip(df.text, df.label))
    texts, labels = task.split("train")
    assert all(task.classes[y] == by_text[t] for t, y in zip(texts, labels.tolist()))
    # same seed, same split; another seed, another split; the splits partition the data
    again = get_task("text-csv", path=csv3)
    assert again.split("val")[0] == task.split("val")[0]
    other = get_task("text-csv", path=csv3, seed=1)
    assert other.split("val")[0] != task.split("val")[0]
    assert sorted(sum((task.split(s)[0] for s in ("train", "val", "test")), [])) == sorted(df.text)


def test_numeric_labels_keep_their_order(tmp_path: Path) -> None:
    rows = [(f"w{i}", y) for i, y in enumerate([10, 2, 2, 10, 7] * 12)]
    task = get_task("text-csv", path=write_csv(tmp_path / "n.csv", rows))
    assert task.classes == ["2", "7", "10"]  # numeric sort, not text sort


def test_words_like_na_are_text_not_missing(tmp_path: Path) -> None:
    rows = [("NA", "None"), ("null", "a")] * 15
    task = get_task("text-csv", path=write_csv(tmp_path / "na.csv", rows))
    assert task.classes == ["None", "a"]
    assert set(sum((task.split(s)[0] for s in ("train", "val", "test")), [])) == {"NA", "null"}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=300), st.integers(0, 2**16))
def test_stratified_split_partitions_and_keeps_balance(labels: list[int], seed: int) -> None:
    y = np.asarray(labels)
    parts = stratified_split(y, (0.8, 0.1, 0.1), seed=seed)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(y)))  # a partition
    for c in np.unique(y):
        n_c = int((y == c).sum())
        for part, f in zip(parts, (0.8, 0.1, 0.1)):
            assert abs(int((y[part] == c).sum()) - n_c * f) < 1 + 1e-9  # within one example per class
    assert all((a == b).all() for a, b in zip(parts, stratified_split(y, (0.8, 0.1, 0.1), seed=seed)))


# ---- batches and evaluation ---------------------------------------------------------------------------


def test_text_batches_pad_to_longest_and_cap(csv3: Path, tmp_path: Path) -> None:
    task = get_task("text-csv", path=csv3)
    tok = tiny_tokenizer(tmp_path / "tok")
    batches = task.batches("train", tokenizer=tok, batch_size=32, max_length=64)
    assert [len(y) for _, y in batches] == [32] * 5
    texts, labels = task.split("train")
    for b, (inputs, y) in enumerate(batches):
        assert set(inputs) == {"input_ids", "attention_mask"}
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
        lengths = [len(t.split()) + 2 for t in texts[32 * b:32 * (b + 1)]]  # [CLS] words [SEP] (row<i> is [UNK])
        assert ids.shape[1] == max(lengths) and mask.sum(1).tolist() == lengths
        assert (ids[mask == 0] == tok.pad_token_id).all()
        assert torch.equal(y, labels[32 * b:32 * (b + 1)])
    capped = task.batches("train", tokenizer=tok, batch_size=50, max_length=5, limit=70)
    assert [len(y) for _, y in capped] == [50, 20]
    assert all(i["input_ids"].shape[1] <= 5 for i, _ in capped)
    a = task.batches("val", tokenizer=tok, batch_size=8, shuffle=True, seed=3)
    b = task.batches("val", tokenizer=tok, batch_size=8, shuffle=True, seed=3)
    c = task.batches("val", tokenizer=tok, batch_size=8, shuffle=True, seed=4)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(task.split("val")[1].tolist())
    with pytest.raises(ParticlizeError, match="tokenizer"):
        task.batches("train")
    with pytest.raises(ParticlizeError, match="unknown split"):
        task.split("dev")


def _numbered_images(n: int = 120) -> Task:
    """An image task whose example i is a 1x1 image of value i (so batches say which examples they hold)."""
    items = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    split = (items, torch.arange(n) % 2)
    return Task("numbered", "image", {"train": split, "val": split, "test": split}, ["even", "odd"])


def _ids(batches: list) -> list[int]:
    return torch.cat([x.flatten() for x, _ in batches]).mul(255).round().long().tolist()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), limit=st.integers(1, 60))
def test_calibration_draws_a_seeded_subset_of_the_whole_split(seed: int, limit: int) -> None:
    """Each seed scores its own `limit` examples from anywhere in the split, not the first `limit` reordered."""
    task = _numbered_images()
    ids = _ids(task.calibration(nn.Identity(), batch_size=7, limit=limit, seed=seed))
    assert len(ids) == len(set(ids)) == limit
    assert ids == _ids(task.calibration(nn.Identity(), batch_size=7, limit=limit, seed=seed))
    draws = [set(_ids(task.calibration(nn.Identity(), batch_size=64, limit=limit, seed=s))) for s in range(seed, seed + 4)]
    assert len({frozenset(d) for d in draws}) > 1  # other seeds, other examples
    assert any(max(d) >= limit for d in draws)  # not only the split's first `limit` examples
    assert _ids(task.batches("train", batch_size=64, limit=limit)) == list(range(limit))  # plain `limit` unchanged


class _Oracle(nn.Module):
    """Predicts class 0 for every example: logits [1, 0, 0]."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(input_ids), 3)


def test_evaluate_reports_accuracy_loss_and_n(csv3: Path, tmp_path: Path) -> None:
    task = get_task("text-csv", path=csv3)
    tok = tiny_tokenizer(tmp_path / "tok")
    res = task.evaluate(_Oracle(), "test", tokenizer=tok, batch_size=7)
    y = task.split("test")[1]
    expected_loss = nn.functional.cross_entropy(torch.tensor([[1.0, 0.0, 0.0]]).expand(len(y), 3), y).item()
    assert res["n"] == 20 and res["accuracy"] == pytest.approx((y == 0).float().mean().item())
    assert res["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert task.evaluate(_Oracle(), "test", tokenizer=tok, limit=5)["n"] == 5


# ---- data errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, kwargs, match",
    [
        ("", {}, "is empty"),
        ("text,label\n", {}, "no data rows"),
        ("sentence,label\nhi,a\nho,b\n", {}, "no column 'text'.*columns are 'sentence', 'label'.*text_column"),
        ("text,label\nhi,a\nho,b\n", {"label_column": "y"}, "no column 'y'"),
        ("text,label\nhi,a\nho,\nhe,b\nha,NaN\n", {}, "2 empty or NaN labels.*lines 3, 5"),
        ("text,label\nhi,a\n,b\n", {}, "1 empty texts.*line 3"),
        ("text,label\n" + "hi,same\n" * 30, {}, "only one class.*'same'"),
        ("text,label\nhi,a\nho,b\nhe,a\n", {}, "val split is empty.*too small"),
    ],
    ids=["empty-file", "header-only", "missing-text-column", "missing-label-column", "nan-labels", "nan-text",
         "one-class", "too-small"],
)
def test_text_csv_errors_are_clear(tmp_path: Path, content: str, kwargs: dict, match: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        get_task("text-csv", path=p, **kwargs)


def test_task_registry_errors(tmp_path: Path) -> None:
    assert set(TASKS) == {"vader-sentiment", "text-csv", "fashion-mnist", "moving-digits", "movielens-100k"}
    with pytest.raises(ParticlizeError, match="unknown task 'imdb'.*vader-sentiment"):
        get_task("imdb")
    with pytest.raises(ParticlizeError, match="unexpected keyword argument 'txt_column'.*options are: path"):
        get_task("text-csv", path=tmp_path / "x.csv", txt_column="t")
    with pytest.raises(ParticlizeError, match="missing a required argument: 'path'"):
        get_task("text-csv")
    with pytest.raises(DataError, match="no such CSV"):
        get_task("text-csv", path=tmp_path / "missing.csv")
    assert issubclass(DataError, ParticlizeError)


# ---- VADER ----------------------------------------------------------------------------------------------

VADER_LINES = [
    "1\t2.26666666667\tThe Rock is destined to be the 21st Century's new ''Conan''.",
    "2\t-1.8125\tHer fans walked out muttering words like ''horrible''.",
    "3\t0.0\tA film that is neither here nor there.",
    "4\t0.5\tCafé scenes — quietly charming.",
    "5\t-0.0625\tSlightly dull.",
]


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _fake_sdist(lines: list[str]) -> bytes:
    """An sdist-like .tar.gz: the ground-truth file (CRLF, no final newline) inside the inner archive."""
    text = "\r\n".join(lines).encode("utf-8")
    inner = _tar_gz({"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": text,
                     "hutto_ICWSM_2014/tweets_GroundTruth.txt": b"1\t1.0\tnot this one"})
    root = "vaderSentiment-3.3.2"
    return _tar_gz({f"{root}/setup.py": b"", f"{root}/additional_resources/hutto_ICWSM_2014.tar.gz": inner})


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Replace the pip download by writing a synthetic sdist; records each call's destination."""
    calls: list[Path] = []
    lines = VADER_LINES + [f"{10 + i}\t{(-1) ** i * (1 + i % 3)}.0\tSentence number {i} here." for i in range(40)]

    def download(dest: Path) -> Path:
        calls.append(dest)
        out = dest / "vaderSentiment-3.3.2.tar.gz"
        out.write_bytes(_fake_sdist(lines))
        return out

    monkeypatch.setattr(vader, "_download_sdist", download)
    monkeypatch.setenv("PARTICLIZE_CACHE", str(tmp_path / "cache"))
    return calls


def test_vader_parse_labels_by_sign_and_handles_crlf() -> None:
    sentences, ratings, ids = vader.parse("\r\n".join(VADER_LINES).encode())
    assert ids.tolist() == [1, 2, 3, 4, 5]
    assert ratings.tolist() == [2.26666666667, -1.8125, 0.0, 0.5, -0.0625]
    assert sentences[3] == "Café scenes — quietly charming." and not any("\r" in s for s in sentences)
    with pytest.raises(DataError, match="line 2 of the VADER file is malformed"):
        vader.parse(b"1\t1.0\tok\r\n2\tnot-a-number\tbad\r\n")


def test_vader_task_downloads_once_into_the_cache(fake_pip: list[Path], tmp_path: Path) -> None:
    task = get_task("vader-sentiment")
    assert len(fake_pip) == 1
    cached = tmp_path / "cache" / "vader" / vader.FILE
    assert cached.is_file() and list(cached.parent.iterdir()) == [cached]  # only the text file is kept
    assert (task.name, task.kind, task.num_classes) == ("vader-sentiment", "text", 2)
    assert task.classes == ["negative", "positive"]
    assert task.info["lines"] == 45 and task.info["dropped_zero"] == 1
    texts, labels = zip(*[(t, y) for s in ("train", "val", "test") for t, y in zip(*task.split(s))])
    assert len(texts) == 44 and "A film that is neither here nor there." not in texts
    label_of = dict(zip(texts, labels))
    assert label_of["The Rock is destined to be the 21st Century's new ''Conan''."] == 1
    assert label_of["Slightly dull."] == 0 and label_of["Café scenes — quietly charming."] == 1
    assert not any(t.endswith("\r") for t in texts)
    get_task("vader-sentiment", seed=3)
    assert len(fake_pip) == 1  # cached: no second download


def test_vader_offline_error_names_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARTICLIZE_CACHE", str(tmp_path / "cache"))
    seen: list[list[str]] = []

    def offline(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(subprocess, "run", offline)  # pip runs through particlize.tasks.base.pip_download
    command = r"pip download --no-deps --no-binary :all: vadersentiment==3\.3\.2"
    with pytest.raises(DataError, match=rf"offline.*{command}.*sdist="):
        get_task("vader-sentiment")
    assert seen[0][1:4] == ["-m", "pip", "download"]
    assert not (tmp_path / "cache" / "vader" / vader.FILE).exists()
    assert list((tmp_path / "cache" / "vader").iterdir()) == []  # the temporary download folder is gone


def test_vader_from_a_downloaded_sdist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline machines: pass the .tar.gz that pip downloaded elsewhere; pip is never run."""
    monkeypatch.setattr(vader, "_download_sdist", lambda dest: pytest.fail("must not download"))
    sdist = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    sdist.write_bytes(_fake_sdist(VADER_LINES * 6))
    task = get_task("vader-sentiment", sdist=sdist, cache=tmp_path / "c")
    assert task.info["lines"] == 30 and task.info["dropped_zero"] == 6 and sum(task.sizes().values()) == 24
    assert (tmp_path / "c" / vader.FILE).is_file()
    with pytest.raises(DataError, match="no such file"):
        get_task("vader-sentiment", sdist=tmp_path / "missing.tar.gz", cache=tmp_path / "c2")


def test_vader_bad_archive_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARTICLIZE_CACHE", str(tmp_path / "cache"))

    def wrong(dest: Path) -> Path:
        (dest / "x.tar.gz").write_bytes(_tar_gz({"pkg/setup.py": b""}))
        return dest / "x.tar.gz"

    monkeypatch.setattr(vader, "_download_sdist", wrong)
    with pytest.raises(DataError, match="does not contain additional_resources"):
        get_task("vader-sentiment")


# ---- Fashion-MNIST ---------------------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, n_train: int = 100, n_test: int = 30, seed: int = 0) -> Path:
    """Synthetic Fashion-MNIST: class k has background level 20k plus noise and a white band at rows 2k..2k+3
    (train files gzipped, test files raw)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, gz in (("train", n_train, True), ("test", n_test, False)):
        y = np.arange(n) % 10
        x = rng.integers(0, 20, (n, 28, 28)) + 20 * y[:, None, None]
        for i, k in enumerate(y):
            x[i, 2 * k:2 * k + 4] = 255
        for stem, arr in zip(fm.FILES[split], (x, y)):
            data = _idx(arr)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return folder


def test_fashion_mnist_reads_idx_gz_and_raw(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fm, "DATA_DIR", write_fashion(tmp_path / "fm"))
    task = get_task("fashion-mnist")
    assert (task.name, task.kind, task.num_classes) == ("fashion-mnist", "image", 10)
    assert task.sizes() == {"train": 90, "val": 10, "test": 30}
    x, y = task.split("val")
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert 0.0 <= x.min() and x.max() == 1.0
    assert sorted(y.tolist()) == list(range(10))  # stratified: one per class
    for k, img in zip(y.tolist(), x):
        assert (img[0, 2 * k:2 * k + 4] == 1.0).all()
    xt, yt = task.split("test")
    assert yt.tolist() == [i % 10 for i in range(30)]  # test = the test files, in file order
    batches = task.batches("train", batch_size=32)
    assert [b[0].shape for b in batches] == [(32, 1, 28, 28)] * 2 + [(26, 1, 28, 28)]
    res = task.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), "test")
    assert res["n"] == 30 and 0 <= res["accuracy"] <= 1 and res["loss"] > 0
    with pytest.raises(ParticlizeError, match="gives 3 logits.*10 classes"):
        task.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(784, 3)), "test")


def test_fashion_mnist_missing_names_the_apt_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fm, "DATA_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        get_task("fashion-mnist")


def test_fashion_mnist_corrupt_idx(tmp_path: Path) -> None:
    folder = write_fashion(tmp_path / "fm")
    raw = (folder / "t10k-images-idx3-ubyte").read_bytes()
    (folder / "t10k-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        get_task("fashion-mnist", data_dir=folder)
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        get_task("fashion-mnist", data_dir=folder)


def test_task_rejects_empty_splits() -> None:
    empty = ([], torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="test split is empty"):
        Task("t", "text", {"train": (["a"], torch.tensor([0])), "val": (["b"], torch.tensor([1])), "test": empty},
             ["x", "y"])


# ---- real data (slow: downloads / needs the apt package) ------------------------------------------------


@pytest.mark.slow
def test_real_vader_counts() -> None:
    task = get_task("vader-sentiment")
    path = Path(task.info["path"])
    raw = path.read_bytes()
    assert raw.count(b"\r\n") == 10_604  # 10,605 records; the last line has no line break
    assert task.info["lines"] == 10_605 and task.info["dropped_zero"] == 37
    labels = torch.cat([task.split(s)[1] for s in ("train", "val", "test")])
    assert len(labels) == 10_568 and int(labels.sum()) == 5_242  # 5,242 positive, 5,326 negative
    assert task.sizes() == {"train": 8_455, "val": 1_057, "test": 1_056}


@pytest.mark.slow
def test_real_fashion_mnist() -> None:
    if not fm.DATA_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed ({fm.APT})")
    task = get_task("fashion-mnist")
    assert task.sizes() == {"train": 54_000, "val": 6_000, "test": 10_000}
    assert torch.bincount(task.split("test")[1]).tolist() == [1000] * 10


def test_recovery_defaults_follow_the_tasks_kind(csv3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`particlize.recover.recover` (what compress calls) fills an unset learning rate and layer-wise weight
    from ``RECOVER_LR`` / ``RECOVER_HIDDEN_WEIGHT`` of the task's kind; values it is given pass through."""
    import particlize.recover.classifier as C
    from particlize.recover import RECOVER_HIDDEN_WEIGHT, RECOVER_LR, RecoveryConfig, recover

    seen: list[dict] = []

    def fake(student, task, **kw):
        seen.append(kw)
        return {"epochs_run": 1.0, "steps": 1, "best_epoch": 1, "epochs": [{}], "seconds": 0.0}

    monkeypatch.setattr(C, "train_classifier", fake)
    task = get_task("text-csv", path=csv3)
    recover(None, None, task)
    recover(None, None, task, RecoveryConfig(lr=1e-3, hidden_weight=0.0))
    assert (seen[0]["lr"], seen[0]["hidden_weight"]) == (RECOVER_LR["text"], RECOVER_HIDDEN_WEIGHT["text"]) == (1.5e-4, 5.0)
    assert (seen[1]["lr"], seen[1]["hidden_weight"]) == (1e-3, 0.0)
    task.kind = "image"
    recover(None, None, task)
    assert (seen[2]["lr"], seen[2]["hidden_weight"]) == (1e-3, 0.0)


def test_tasks_know_data_not_training() -> None:
    """The tasks package imports no training, recovery, surgery or loop code (recovery dispatches on the task)."""
    import ast

    import particlize.tasks as T

    banned = {"train", "train_sora", "recover", "surgery", "loop", "allocate"}
    for f in Path(T.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert (node.module or "").split(".")[0] not in banned, (f.name, node.module)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("particlize.") and n.split(".")[1] in banned for n in names), (f.name, names)


def test_train_frame_classifier_returns_its_model_and_that_model_s_test_accuracy():
    """40 steps on a tiny moving-digits task: the accuracy returned is the returned model's on the task's test
    frames (computed again here), already above chance (1 in 10) after so few steps, and the run is seeded."""
    from particlize.models.vision import SimpleCNN
    from particlize.tasks.moving_digits import moving_digits, train_frame_classifier

    task = moving_digits(seed=0, n_train=10, n_eval=10)
    model, acc = train_frame_classifier(task, steps=40, batch_size=32, seed=0)
    assert isinstance(model, SimpleCNN) and not model.training
    x, y = task.frames_of("test", 1000, seed=0)
    with torch.no_grad():
        assert acc == (model(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.15, acc
