"""Saving and loading (changed) models: safetensors weights + a plan, never pickle.

A saved folder holds ``model.safetensors`` and ``particlize.json``: the *recipe* that rebuilds the base
architecture (a Hugging Face class and config, or an importable factory and its keyword arguments), the
*plan* (`particlize.plan.Plan`: the steps ``{verb, group, args}`` applied since) and the particlize version
that wrote it. Loading rebuilds the base — or takes the user's own freshly built instance, ``base=``, for a
class no recipe can rebuild — replays the plan verb by verb (so uneven widths per layer that no config can
express come back) and loads the weights. Folders are written to a temporary sibling and renamed into
place, so a crash never leaves half a model.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from . import plan as _plan
from ._version import __version__
from .adapters import decompose
from .errors import CheckpointError, ParticlizeError, PlanError
from .plan import FORMAT, Plan, model_plan, provenance, set_provenance

META = "particlize.json"
WEIGHTS = "model.safetensors"
TRUSTED_PREFIXES = ("particlize.", "transformers.")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _respect_umask(folder: Path) -> None:
    """mkdtemp and safetensors create private files; give them the permissions a plain mkdir/open would."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def write_folder_atomically(out: Path, fill: Any, *, force: bool = False) -> Path:
    """Create folder ``out`` by calling ``fill(tmp_dir)`` on a temporary sibling and renaming it.

    An existing non-empty ``out`` is an error unless ``force``; then it is replaced only after the new
    folder is complete.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ParticlizeError(f"{out} exists and is not a folder; choose another output path")
    if out.exists() and any(out.iterdir()) and not force:
        raise ParticlizeError(f"{out} already exists and is not empty; pass force=True (CLI: --force) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fill(tmp)
        _respect_umask(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def model_meta(model: nn.Module, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``particlize.json`` content for ``model``: format, particlize version, recipe (None for a class
    particlize cannot rebuild: load it with ``base=``), the base class, the plan and ``extra``."""
    prov = provenance(model)
    recipe = prov.get("recipe") or getattr(model, "particlize_recipe", None)
    if recipe is None:
        try:
            recipe = decompose(model).recipe
        except ParticlizeError:
            recipe = None
    return {
        "format": FORMAT, "particlize": __version__, "recipe": recipe, "base_class": _class_name(model),
        "plan": model_plan(model).to_json(), "torch": torch.__version__, "extra": dict(extra or {}),
    }


def write_model(model: nn.Module, folder: Path, *, tokenizer: Any = None, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model``'s weights and ``particlize.json`` (and a tokenizer) into the existing ``folder``
    (not atomic by itself: `save` and the compress loop call it on a temporary folder)."""
    try:
        text = json.dumps(model_meta(model, extra=extra), indent=1)
    except TypeError as e:
        raise ParticlizeError(f"the recipe or extra metadata is not JSON-serialisable ({e})") from None
    save_model(model, str(folder / WEIGHTS))
    (folder / META).write_text(text)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    tokenizer: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` (changed by particlize or not) to folder ``path``: safetensors weights, recipe, plan.

    Hugging Face models, particlize's own models and models built from them by particlize know how to
    rebuild their architecture; for your own class the folder records the plan only, and `load` needs
    ``base=`` (a freshly built, unchanged instance). A Hugging Face ``tokenizer`` is saved beside the
    weights (``AutoTokenizer.from_pretrained(path)`` then works). ``extra`` is stored as is in the JSON
    (JSON-serialisable values). Returns the folder.
    """
    if "shard" in model_plan(model).verbs():  # one rank's share of the particles, not a model
        raise CheckpointError("this model is one rank's shard; gather it with particlize.parallel.unshard(model) and save that")
    return write_folder_atomically(Path(path), lambda tmp: write_model(model, tmp, tokenizer=tokenizer, extra=extra),
                                   force=force)


def _import_target(target: str, trust_code: bool) -> Any:
    mod_name, _, attr = target.rpartition(":")
    if not mod_name or not attr:
        raise CheckpointError(f"recipe target {target!r} is not of the form 'module:callable' or 'file.py:callable'")
    if mod_name.endswith(".py"):
        if not trust_code:
            raise CheckpointError(
                f"this model is built by code in {mod_name}; load it with trust_code=True only if you trust that file"
            )
        file = Path(mod_name)
        if not file.is_file():
            raise CheckpointError(f"the model's factory file {file} does not exist")
        spec = importlib.util.spec_from_file_location(f"_particlize_user_{abs(hash(str(file.resolve())))}", file)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        if not (mod_name + ".").startswith(TRUSTED_PREFIXES) and not trust_code:
            raise CheckpointError(
                f"this model is built by {mod_name}.{attr}; load it with trust_code=True if you trust that module"
            )
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise CheckpointError(f"cannot import {mod_name!r} to rebuild the model ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise CheckpointError(f"{mod_name} has no {attr!r} to rebuild the model with") from None


def build(recipe: Mapping[str, Any], *, trust_code: bool = False) -> nn.Module:
    """Build the (randomly initialised) base architecture a recipe describes."""
    kind = recipe.get("kind")
    if kind == "hf":
        cls_path = str(recipe.get("class", ""))
        if not cls_path.startswith("transformers."):
            raise CheckpointError(f"Hugging Face recipe names a class outside transformers: {cls_path!r}")
        cls = _import_target(cls_path.rsplit(".", 1)[0] + ":" + cls_path.rsplit(".", 1)[1], trust_code)
        config = cls.config_class.from_dict(dict(recipe["config"]))
        return cls(config)
    if kind == "callable":
        fn = _import_target(str(recipe.get("target", "")), trust_code)
        model = fn(**dict(recipe.get("kwargs", {})))
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"{recipe['target']} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise CheckpointError(f"unknown recipe kind {kind!r}; this folder was written by another tool or version")


def shipped() -> dict[str, Path]:
    """Models that ship inside the package, by name (``pz.load("sora-tiny")``)."""
    root = Path(__file__).parent / "models" / "weights"
    return {d.name: d for d in sorted(root.iterdir()) if (d / META).is_file()} if root.is_dir() else {}


def resolve(path: str | os.PathLike[str]) -> Path:
    """A model folder: the path itself, or the folder of a shipped model of that name."""
    p = Path(path)
    if not p.exists() and str(path) in shipped():
        return shipped()[str(path)]
    return p


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``particlize.json`` of a saved folder (with clear errors for anything else)."""
    p = resolve(path)
    if p.is_file():
        raise CheckpointError(
            f"{p} is a file; particlize loads folders written by pz.save (pickle files are never unpickled)"
        )
    if not (p / META).is_file():
        raise CheckpointError(f"{p} is not a particlize model folder (no {META}); save one with pz.save(model, folder)")
    try:
        meta = json.loads((p / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p / META} is corrupt ({e}); re-save the model") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int) or "recipe" not in meta:
        raise CheckpointError(f"{p / META} is not a particlize model description; re-save the model with pz.save")
    if meta["format"] > FORMAT:
        raise CheckpointError(
            f"{p} was written by particlize {meta.get('particlize', '(unknown version)')} in format {meta['format']}; "
            f"this is particlize {__version__}, which reads formats up to {FORMAT}: upgrade particlize to load it"
        )
    return meta


def load(
    path: str | os.PathLike[str],
    *,
    base: nn.Module | None = None,
    trust_code: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a folder written by `save` (or a shipped model by name, e.g. ``"sora-tiny"``): rebuild the base
    architecture, replay the plan verb by verb, load the weights.

    ``base`` is a freshly built, unchanged instance of the saved model's class: required for a class
    particlize cannot rebuild by itself (your own ``nn.Module``), optional otherwise; it is changed in place
    and returned. ``trust_code`` allows recipes whose factory lives outside particlize and transformers (it
    imports and runs that code). Weights are read only through safetensors.
    """
    p = resolve(path)
    meta = read_meta(p)
    try:
        state = load_file(str(p / WEIGHTS), device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{p / WEIGHTS} is missing; re-save the model") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p / WEIGHTS} is corrupt or truncated ({e}); re-save the model") from None
    recipe = meta["recipe"]
    cls = meta.get("base_class")
    if base is not None:
        if cls and _class_name(base) != cls:
            raise CheckpointError(f"{p} holds a {cls}; base= is a {_class_name(base)}: pass a fresh {cls.rsplit('.', 1)[-1]}")
        if len(model_plan(base)):
            raise CheckpointError("base= must be a freshly built, unchanged model; this one was already changed by particlize")
        model = base
    elif recipe is None:
        name = (cls or "model").rsplit(".", 1)[-1]
        raise CheckpointError(
            f"{p} was saved from a {name}, which particlize cannot rebuild by itself: "
            f"pass base={name}(...) built as the original, unchanged, e.g. pz.load(path, base={name}(...))"
        )
    else:
        with torch.device(device):  # built where the weights go: a 1.1B model's throwaway initialisation on a
            model = build(recipe, trust_code=trust_code)  # GPU takes a moment, on the host most of a minute
    plan = Plan.from_json(meta.get("plan", []), format=meta["format"])
    if len(plan):
        _plan.run(decompose(model, recipe=recipe), plan, replay=True, written_by=meta.get("particlize"))
    missing, unexpected = _load_state(model, state)
    if missing or unexpected:
        raise PlanError(
            f"weights do not match the rebuilt model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "the plan or recipe does not belong to these weights"
        )
    set_provenance(model, recipe, plan)
    return model.to(device).eval()


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _tied(model, k, state)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        return missing, unexpected
    bad = [k for k, v in state.items() if own[k].shape != v.shape]
    if bad:
        return [f"{k} {tuple(own[k].shape)} vs saved {tuple(state[bad[0]].shape)}" for k in bad[:1]], []
    model.load_state_dict(state, strict=False)
    return [], []


def _tied(model: nn.Module, key: str, state: Mapping[str, torch.Tensor]) -> bool:
    """safetensors' save_model drops duplicates of shared tensors; accept a key if its twin is saved."""
    own = model.state_dict(keep_vars=True)
    t = own[key]
    return any(k in state and v is t for k, v in own.items() if k != key)
