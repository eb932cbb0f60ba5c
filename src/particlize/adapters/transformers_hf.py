"""Hugging Face transformers: BERT family (MiniLM, RoBERTa, …), ViT, GPT-2, Llama / Qwen2 / Mistral.

Layers are found by structure, not by class, so the adapter also works on a model that *contains*
such a transformer (a classifier wrapping a BERT encoder). Per layer it yields attention heads and FFN
neurons (and, under grouped-query attention, key/value heads: each a whole key/value group with its query
heads, a coarse group over the heads, ``kv_heads``); per layer list, the blocks. FLOPs are per token of the transformer layers (embeddings and
anything outside the layers excluded); attention scores count ``4 * head_dim`` per token per context
position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..particles import InputGate, ParticleGroup, ResidualGate, Slice
from . import AdapterResult, register
from ._builders import blocks, columns, heads, kv_heads, linear_flops, mlp_neurons, neurons, rows, set_present

FLOPS_UNIT = "per token (transformer layers)"


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _is_matmul(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


# ---- per-layer recognisers: each returns the groups of one layer or None ------------------------


def _bert_like(layer: nn.Module, lp: str, idx: int) -> list[ParticleGroup] | None:
    """BERT/RoBERTa/MiniLM (``attention.self.{query,key,value}``) and ViT (``attention.attention``)."""
    attn = getattr(layer, "attention", None)
    out = getattr(layer, "output", None)
    inter = getattr(layer, "intermediate", None)
    if attn is None or out is None or inter is None:
        return None
    inner_name = "self" if hasattr(attn, "self") else "attention"
    sa = getattr(attn, inner_name, None)
    reader = getattr(getattr(attn, "output", None), "dense", None)
    if sa is None or not all(isinstance(getattr(sa, k, None), nn.Linear) for k in ("query", "key", "value")):
        return None
    if not isinstance(reader, nn.Linear) or not isinstance(getattr(inter, "dense", None), nn.Linear):
        return None
    d = sa.attention_head_size
    n = sa.query.out_features // d
    ap, sp = f"{lp}.attention", f"{lp}.attention.{inner_name}"

    def heads_pruned(model: nn.Module, keep: list[int], sp=sp, d=d) -> None:
        set_present(model.get_submodule(sp), num_attention_heads=len(keep), all_head_size=len(keep) * d)

    qkv = [(f"{sp}.{k}", getattr(sa, k)) for k in ("query", "key", "value")]
    out = f"{ap}.output.dense"
    return [
        heads(ap, n, d, idx, InputGate(out), rows(qkv, width=d), (columns(out, d),), scope=f"{lp}.",
              on_prune=heads_pruned),
        mlp_neurons(f"{lp}.intermediate", inter.dense.out_features, idx, InputGate(f"{lp}.output.dense"),
                    [(f"{lp}.intermediate.dense", inter.dense)], f"{lp}.output.dense", scope=f"{lp}."),
    ]


_MLPS = (("gate_proj", "up_proj", "down_proj"), ("up_proj", "down_proj"), ("fc1", "fc2"))


def _qkvo(layer: nn.Module, lp: str, idx: int) -> list[ParticleGroup] | None:
    """Separate ``{q,k,v,o}_proj`` attention (Llama / Qwen2 / Mistral with grouped-query attention,
    ViT in transformers 5) and a ``mlp`` of ``gate/up/down_proj`` or ``fc1/fc2``."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    found = [(k, getattr(layer, k)) for k in ("self_attn", "attention", "attn") if hasattr(layer, k)]
    found = [(k, a) for k, a in found if all(isinstance(getattr(a, n, None), nn.Linear) for n in names)]
    if not found:
        return None
    an, attn = found[0]
    d = attn.head_dim
    n_q, n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    ap = f"{lp}.{an}"

    def gqa_pruned(model: nn.Module, keep: list[int], ap=ap, n_kv=n_kv) -> None:
        a = model.get_submodule(ap)
        set_present(a, num_key_value_groups=len(keep) // n_kv, num_heads=len(keep), num_attention_heads=len(keep))

    def kv_pruned(model: nn.Module, keep: list[int], ap=ap, d=d) -> None:
        a = model.get_submodule(ap)  # whole key/value groups go: query heads per key/value head stay as they were
        n = a.q_proj.out_features // d
        set_present(a, num_key_value_heads=len(keep), num_heads=n, num_attention_heads=n)

    def mha_pruned(model: nn.Module, keep: list[int], ap=ap) -> None:
        set_present(model.get_submodule(ap), num_key_value_groups=1, num_heads=len(keep),
                    num_attention_heads=len(keep), num_key_value_heads=len(keep))

    # under grouped-query attention a head owns only its query rows (its key/value head is shared);
    # in plain multi-head attention it owns its key and value rows too
    mha = n_kv == n_q
    projs = ("q_proj", "k_proj", "v_proj") if mha else ("q_proj",)
    groups = [heads(
        ap, n_q, d, idx, InputGate(f"{ap}.o_proj"), rows([(f"{ap}.{k}", getattr(attn, k)) for k in projs], width=d),
        (columns(f"{ap}.o_proj", d),), balanced=1 if mha else n_kv, scope=f"{lp}.",
        on_prune=mha_pruned if mha else gqa_pruned,
    )]
    if not mha:  # the coarse group: whole key/value heads with their query heads (under MHA it would be `heads`)
        groups.append(kv_heads(ap, n_kv, n_q, d, idx, InputGate(f"{ap}.o_proj"), (f"{ap}.q_proj", attn.q_proj),
                               [(f"{ap}.{k}", getattr(attn, k)) for k in ("k_proj", "v_proj")], f"{ap}.o_proj",
                               scope=f"{lp}.", on_prune=kv_pruned))
    mlp = getattr(layer, "mlp", None)
    for names_ in _MLPS:
        if mlp is not None and all(isinstance(getattr(mlp, k, None), nn.Linear) for k in names_):
            mp, down = f"{lp}.mlp", names_[-1]
            groups.append(mlp_neurons(
                mp, getattr(mlp, down).in_features, idx, InputGate(f"{mp}.{down}"),
                [(f"{mp}.{k}", getattr(mlp, k)) for k in names_[:-1]], f"{mp}.{down}", scope=f"{lp}.",
            ))
            break
    return groups


def _gpt2_like(layer: nn.Module, lp: str, idx: int) -> list[ParticleGroup] | None:
    """GPT-2: fused ``attn.c_attn`` (Conv1D, [in, 3 * embed]) and ``mlp.c_fc`` / ``mlp.c_proj``."""
    attn, mlp = getattr(layer, "attn", None), getattr(layer, "mlp", None)
    if attn is None or not _is_conv1d(getattr(attn, "c_attn", None)) or not _is_conv1d(getattr(attn, "c_proj", None)):
        return None
    d = attn.head_dim
    e = attn.split_size
    n = e // d
    ap = f"{lp}.attn"

    def heads_pruned(model: nn.Module, keep: list[int], ap=ap, d=d) -> None:
        a = model.get_submodule(ap)
        w = len(keep) * d
        set_present(a, num_heads=len(keep), split_size=w)
        a.c_attn.nf, a.c_proj.nx = 3 * w, w

    # Conv1D stores weights as [in, out]: a head writes columns of c_attn and is read by rows of c_proj
    groups = [heads(
        ap, n, d, idx, InputGate(f"{ap}.c_proj"),
        (Slice(f"{ap}.c_attn.weight", 1, d, 3, e), Slice(f"{ap}.c_attn.bias", 0, d, 3, e)),
        (Slice(f"{ap}.c_proj.weight", 0, d),), scope=f"{lp}.", on_prune=heads_pruned,
    )]
    if mlp is not None and _is_conv1d(getattr(mlp, "c_fc", None)) and _is_conv1d(getattr(mlp, "c_proj", None)):
        mp = f"{lp}.mlp"

        def neurons_pruned(model: nn.Module, keep: list[int], mp=mp) -> None:
            m = model.get_submodule(mp)
            m.c_fc.nf, m.c_proj.nx = len(keep), len(keep)

        groups.append(neurons(
            mp, mlp.c_fc.nf, idx, InputGate(f"{mp}.c_proj"),
            (Slice(f"{mp}.c_fc.weight", 1), Slice(f"{mp}.c_fc.bias", 0)), (Slice(f"{mp}.c_proj.weight", 0),),
            scope=f"{lp}.", on_prune=neurons_pruned,
        ))
    return groups


_RECOGNISERS: tuple[Callable[[nn.Module, str, int], list[ParticleGroup] | None], ...] = (
    _bert_like, _qkvo, _gpt2_like,
)


def _find_config(model: nn.Module) -> Any:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict") and hasattr(cfg, "num_hidden_layers"):
            return cfg
    return None


def _layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


class HFTransformerAdapter:
    """Heads, FFN neurons and blocks of Hugging Face transformer stacks."""

    name = "transformers"

    def matches(self, model: nn.Module) -> bool:
        return any(self._layer_groups(lst[0], f"{p}.0", 0) for p, lst in _layer_lists(model))

    @staticmethod
    def _layer_groups(layer: nn.Module, lp: str, idx: int) -> list[ParticleGroup] | None:
        for rec in _RECOGNISERS:
            groups = rec(layer, lp, idx)
            if groups:
                return groups
        return None

    def build(self, model: nn.Module, *, seq_len: int, example_inputs: Any = None) -> AdapterResult:
        groups: list[ParticleGroup] = []
        flops: dict[str, float] = {}
        for lpath, layers in _layer_lists(model):
            found = [self._layer_groups(layer, f"{lpath}.{i}", i) for i, layer in enumerate(layers)]
            if not found or not all(found):
                continue
            paths = tuple(f"{lpath}.{i}" for i in range(len(layers)))
            for f in found:
                groups += f
            groups.append(blocks(f"{lpath}.", model, paths, ResidualGate(paths), on_prune=_blocks_pruned))
            for p, layer in zip(paths, layers):
                flops.update(linear_flops(layer, p, is_matmul=_is_matmul))
        return AdapterResult(groups, flops, FLOPS_UNIT, recipe=_hf_recipe(model))


def _blocks_pruned(model: nn.Module, keep: list[int]) -> None:
    """After removing layers: shorten the config and renumber cache indices."""
    cfg = _find_config(model)
    if cfg is not None:
        if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == cfg.num_hidden_layers:
            cfg.layer_types = [cfg.layer_types[i] for i in keep]
        cfg.num_hidden_layers = len(keep)
    for _, layers in _layer_lists(model):
        for i, layer in enumerate(layers):
            for m in layer.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = i


def _hf_recipe(model: nn.Module) -> dict[str, Any] | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is an optional extra
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    cls = type(model)
    return {"kind": "hf", "class": f"{cls.__module__}.{cls.__qualname__}", "config": model.config.to_dict()}


register(HFTransformerAdapter(), priority=30)  # structural, anywhere in a model: below the exact DiT matchers
