"""Video diffusion transformers from ``diffusers``: `CogVideoXTransformer3DModel` and `LatteTransformer3DModel`.

Groups, named by the model's own module paths plus the particle kind:

- **CogVideoX** (one joint stream of text and video tokens per block): per block
  ``transformer_blocks.{i}.attn1.heads`` and ``transformer_blocks.{i}.ff.neurons``, and the blocks
  ``transformer_blocks.blocks``.
- **Latte** (spatial and temporal blocks alternate): per layer the spatial blocks' self-attention heads
  ``transformer_blocks.{i}.attn1.heads``, their cross-attention heads ``transformer_blocks.{i}.attn2.heads``
  (when the model has ``cross_attention_dim``) and FF neurons ``transformer_blocks.{i}.ff.neurons``; the
  temporal blocks' self-attention heads ``temporal_transformer_blocks.{i}.attn1.heads`` and FF neurons
  ``temporal_transformer_blocks.{i}.ff.neurons``. diffusers calls the spatial list ``transformer_blocks``;
  every temporal group starts with ``temporal_``. No block group: see below.

Coupling. A head owns its ``to_q``/``to_k``/``to_v`` rows (and biases) and its ``to_out.0`` columns.
CogVideoX's qk-norm is a LayerNorm over ``head_dim`` shared by all heads: it normalises each head on
its own, so it couples nothing and stays whole. Heads are offered only where that holds (no qk-norm
across heads, no grouped key/value heads, no added key/value projections, unfused projections). A
neuron owns its row of ``ff.net.0.proj`` (two rows, ``i`` and ``inner + i``, for GEGLU/SwiGLU, whose
projection is split into value and gate halves) and its column of ``ff.net.2``. adaLN modulation and
its gates act on the residual width, never on a head or a neuron.

Blocks. A CogVideoX block updates two streams, ``(hidden_states, encoder_hidden_states)`` (video and
text tokens), from its own adaLN-Zero norms and a ``temb`` shared by all blocks; the model only loops
over ``transformer_blocks``. Removing a block is therefore exact once *both* streams skip it, which
`TwoStreamResidualGate` does (a plain `ResidualGate` would gate only the video stream). Latte offers no
blocks: the model zips ``transformer_blocks`` with ``temporal_transformer_blocks``, so removing one
block would silently drop the last block of the other list, and it adds the temporal position
embedding right before the temporal block of layer 0, so removing layer 0 would move that addition
to after the next spatial block. Neither matches a gate that makes a block the identity.

Batches. Latte folds frames (spatial blocks) or patches (temporal blocks) into the batch, example-major;
its gates (`FoldedInputGate`) expand per-example gates ``[B, n]`` to the folded batch. They are not
`InputGate`s on purpose: the fast ablation engine's shortcut for input gates assumes the reader sees
the unfolded batch. Running Latte with ``enable_temporal_attentions=False`` skips the temporal blocks,
so gates on them do not fire and `ParticleMap.gates` raises `GateError`, as for any undescribed path.

FLOPs are per token of the transformer blocks (CogVideoX: tokens of the joint text + video sequence;
Latte: video patch tokens), 2 per weight element of each Linear that runs per token. adaLN Linears run
once per video and count 0; Latte's cross-attention ``to_k``/``to_v`` run on the caption, not per video
token, and count 0. Attention scores add ``4 * head_dim`` per token per context position. The context
is ``seq_len`` for CogVideoX (its full attention over the joint sequence) and for Latte's cross-attention
heads (caption tokens); Latte's spatial heads see one frame's patches, ``(sample_size // patch_size)**2``,
and its temporal heads one patch's frames, ``video_length``, both fixed from the model's config (the
sizes it was built for), whatever ``seq_len``.

Saving: the recipe rebuilds the base model from its diffusers config through `build_model`, a
factory inside particlize (so `particlize.load` needs no ``trust_code``); the plan replays the cuts.
The pruned model's ``config`` still describes the base architecture (uniform head counts cannot
express a pruned model); the saved plan is what describes the cuts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import GateError, ParticlizeError
from ..particles import GateSite, InputGate, ParticleGroup, ResidualGate, apply_gate
from . import AdapterResult, register
from ._builders import blocks, columns, heads, linear_flops, neurons, rows

FLOPS_UNIT = "per token (transformer blocks)"
CLASSES = ("CogVideoXTransformer3DModel", "LatteTransformer3DModel")
_ACTS_PLAIN = ("GELU", "ApproximateGELU", "LinearActivation")  # proj -> act(proj)
_ACTS_GATED = ("GEGLU", "SwiGLU")  # proj -> value, gate halves


def build_model(cls: str, config: dict[str, Any]) -> nn.Module:
    """Build a supported diffusers video transformer (random init) from its config (the recipe factory)."""
    if cls not in CLASSES:
        raise ParticlizeError(f"particlize rebuilds only these diffusers classes: {', '.join(CLASSES)}; got {cls!r}")
    import diffusers

    return getattr(diffusers, cls).from_config(dict(config)).eval()


# --------------------------------------------------------------------------------------------------
# Gate sites


@dataclass(frozen=True)
class FoldedInputGate(GateSite):
    """Gate the first input of ``module`` along ``dim`` where the batch arrives folded with another axis
    (``[B * k, ...]``, example-major, as Latte folds frames or patches into the batch). Per-example gates
    ``[B, n]`` are repeated ``k`` times. ``chunked_by`` names the block whose feed-forward chunking (along
    the batch, `set_chunk_feed_forward`) would hide ``k`` from a gate inside that feed-forward; per-example
    gates are refused then."""

    module: str
    dim: int = -1
    chunked_by: str = ""

    def gate_dim(self) -> int:
        return self.dim

    def install(self, model, n, gate, patch, fired):
        p = patch[0] if patch else None

        def hook(mod, args):
            fired()
            a, g = args[0], gate
            if g.ndim == 2:
                blk = model.get_submodule(self.chunked_by) if self.chunked_by else None
                chunked = blk is not None and getattr(blk, "_chunk_size", None) is not None
                if chunked and getattr(blk, "_chunk_dim", 0) == 0:
                    raise GateError(
                        f"{self.chunked_by} runs its feed-forward in chunks of the batch; per-example gates cannot "
                        "be applied there. Call set_chunk_feed_forward(None) or use gates of shape [n]"
                    )
                if a.shape[0] % g.shape[0]:
                    raise GateError(
                        f"per-example gates for batch {g.shape[0]} do not divide the folded batch {a.shape[0]} "
                        f"at {self.module!r}"
                    )
                g = g.repeat_interleave(a.shape[0] // g.shape[0], dim=0)
            return (apply_gate(a, self.dim, n, g, p), *args[1:])

        return [model.get_submodule(self.module).register_forward_pre_hook(hook)]

    def capture(self, model, n, sink):
        def hook(mod, args):
            sink(0, args[0])

        return [model.get_submodule(self.module).register_forward_pre_hook(hook)]


def _streams(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    h = args[0] if len(args) > 0 else kwargs["hidden_states"]
    e = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
    return h, e


@dataclass(frozen=True)
class TwoStreamResidualGate(ResidualGate):
    """`ResidualGate` for blocks ``f(hidden_states, encoder_hidden_states, ...) -> (hidden_states,
    encoder_hidden_states)`` that update a video and a text stream. A block's activation is its update
    of the joint sequence ``[text, video]`` (concatenated along tokens, as CogVideoX attends over it); a
    patch shaped like it is split back into the two streams. ``g = 0`` with ``p = 0`` leaves both streams
    unchanged, exactly what removing the block does."""

    def install(self, model, n, gate, patch, fired):
        handles = []
        for i, path in enumerate(self.modules):

            def hook(mod, args, kwargs, output, i=i):
                fired()
                (h, e), (ho, eo) = _streams(args, kwargs), output
                g, p, t = gate[..., i : i + 1], (patch[i] if patch else None), e.shape[1]
                pe, ph = (p, p) if p is None or p.ndim == 1 else (p[:, :t], p[:, t:])
                return (h + apply_gate(ho - h, self.dim, 1, g, ph), e + apply_gate(eo - e, self.dim, 1, g, pe))

            handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
        return handles

    def capture(self, model, n, sink):
        handles = []
        for i, path in enumerate(self.modules):

            def hook(mod, args, kwargs, output, i=i):
                (h, e), (ho, eo) = _streams(args, kwargs), output
                sink(i, torch.cat([eo - e, ho - h], dim=1))  # [text, video], CogVideoX's joint order

            handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
        return handles


# --------------------------------------------------------------------------------------------------
# Groups of one attention / feed-forward


def _norm_width(norm: nn.Module | None) -> int | None:
    """The width a qk-norm normalises over (None: no norm)."""
    if norm is None:
        return None
    shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
    return int(shape[-1]) if shape is not None else -1


def _heads(attn: Any, ap: str, idx: int, scope: str, gate: Callable[[str], GateSite],
           ctx_len: int | None = None) -> ParticleGroup | None:
    """The heads of a diffusers ``Attention`` at ``ap`` (attending over ``ctx_len`` positions, or
    ``seq_len`` when None), or None where they are coupled or fused."""
    lins = [getattr(attn, k, None) for k in ("to_q", "to_k", "to_v")]
    out = getattr(attn, "to_out", None)
    if not all(isinstance(m, nn.Linear) for m in lins) or not isinstance(out, nn.ModuleList):
        return None
    if not isinstance(out[0], nn.Linear) or getattr(attn, "fused_projections", False):
        return None
    if getattr(attn, "add_k_proj", None) is not None or getattr(attn, "to_add_out", None) is not None:
        return None
    n = int(attn.heads)
    d = lins[0].out_features // n
    if any(m.out_features != n * d for m in lins) or out[0].in_features != n * d:
        return None  # grouped key/value heads or an out_dim that is not heads * head_dim
    if any(_norm_width(getattr(attn, k, None)) not in (None, d) for k in ("norm_q", "norm_k")):
        return None  # a qk-norm across heads couples them
    def heads_pruned(model: nn.Module, keep: list[int]) -> None:
        a = model.get_submodule(ap)
        h = len(keep)
        # everything diffusers' Attention and its processors read about the width
        a.heads, a.sliceable_head_dim, a.inner_dim, a.inner_kv_dim = h, h, h * d, h * d

    qkv = [(f"{ap}.{k}", lin) for k, lin in zip(("to_q", "to_k", "to_v"), lins)]
    return heads(
        ap, n, d, idx, gate(f"{ap}.to_out.0"), rows(qkv, width=d), (columns(f"{ap}.to_out.0", d),),
        ctx_len=ctx_len, scope=scope, on_prune=heads_pruned,
    )


def _neurons(ff: Any, fp: str, idx: int, scope: str, gate: Callable[[str], GateSite]) -> ParticleGroup | None:
    """The hidden neurons of a diffusers ``FeedForward`` at ``fp``, or None for an unknown layout."""
    net = getattr(ff, "net", None)
    if not isinstance(net, nn.ModuleList) or len(net) < 3 or not isinstance(net[2], nn.Linear):
        return None
    act, down = net[0], net[2]
    proj = getattr(act, "proj", None)
    inner = down.in_features
    if not isinstance(proj, nn.Linear):
        return None
    kind = type(act).__name__
    if kind in _ACTS_PLAIN and proj.out_features == inner:
        kw: dict[str, int] = {}
    elif kind in _ACTS_GATED and proj.out_features == 2 * inner:
        kw = {"repeat": 2, "stride": inner}  # neuron i owns value row i and gate row inner + i
    else:
        return None
    return neurons(
        fp, inner, idx, gate(f"{fp}.net.2"), rows([(f"{fp}.net.0.proj", proj)], **kw), (columns(f"{fp}.net.2"),),
        scope=scope,
    )


def _recipe(model: nn.Module) -> dict[str, Any]:
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return {
        "kind": "callable", "target": f"{__name__}:build_model",
        "kwargs": {"cls": type(model).__name__, "config": config},
    }


# --------------------------------------------------------------------------------------------------
# The adapter


class DiffusersVideoAdapter:
    """Heads, FF neurons (and, for CogVideoX, blocks) of diffusers video transformers."""

    name = "diffusers-video"

    def matches(self, model: nn.Module) -> bool:
        if "diffusers" not in sys.modules:  # a diffusers model cannot exist before diffusers is imported
            return False
        try:
            import diffusers
        except ImportError:  # pragma: no cover - diffusers is an optional extra
            return False
        return type(model) in {getattr(diffusers, c, None) for c in CLASSES}

    def build(self, model: nn.Module, *, seq_len: int, example_inputs: Any = None) -> AdapterResult:
        if type(model).__name__ == "CogVideoXTransformer3DModel":
            groups, flops = self._cogvideox(model)
        else:
            groups, flops = self._latte(model)
        return AdapterResult(groups, flops, FLOPS_UNIT, recipe=_recipe(model))

    @staticmethod
    def _cogvideox(model: nn.Module) -> tuple[list[ParticleGroup], dict[str, float]]:
        groups: list[ParticleGroup] = []
        flops: dict[str, float] = {}
        paths = tuple(f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks)))
        for i, (bp, block) in enumerate(zip(paths, model.transformer_blocks)):
            for g in (_heads(block.attn1, f"{bp}.attn1", i, f"{bp}.", InputGate),
                      _neurons(block.ff, f"{bp}.ff", i, f"{bp}.", InputGate)):
                if g is not None:
                    groups.append(g)
            flops.update(linear_flops(block, bp, zero=lambda n: n.startswith("norm")))  # adaLN: once per video
        if paths:
            groups.append(blocks("transformer_blocks.", model, paths, TwoStreamResidualGate(paths)))
        return groups, flops

    @staticmethod
    def _latte(model: nn.Module) -> tuple[list[ParticleGroup], dict[str, float]]:
        groups: list[ParticleGroup] = []
        flops: dict[str, float] = {}
        cfg = model.config
        patches = (cfg.sample_size // cfg.patch_size) ** 2 if cfg.patch_size else None
        ctx = {("transformer_blocks", "attn1"): patches, ("temporal_transformer_blocks", "attn1"): cfg.video_length}
        for i in range(len(model.transformer_blocks)):
            for lname in ("transformer_blocks", "temporal_transformer_blocks"):  # spatial, then temporal
                bp, block = f"{lname}.{i}", getattr(model, lname)[i]

                def gate(module: str, bp: str = bp) -> GateSite:
                    return FoldedInputGate(module, chunked_by=bp if module.endswith(".ff.net.2") else "")

                found = [_heads(getattr(block, an), f"{bp}.{an}", i, f"{bp}.", gate, ctx.get((lname, an)))
                         for an in ("attn1", "attn2") if getattr(block, an, None) is not None]
                found.append(_neurons(block.ff, f"{bp}.ff", i, f"{bp}.", gate))
                groups += [g for g in found if g is not None]
                # adaLN Linears (if any) run once per frame or video; cross-attention keys and values run
                # on the caption, not per video token
                flops.update(linear_flops(
                    block, bp, zero=lambda n: n.startswith("norm") or n in ("attn2.to_k", "attn2.to_v")))
        return groups, flops


register(DiffusersVideoAdapter(), priority=50)  # exact classes: before conv sees their patch-embedding Conv2d
