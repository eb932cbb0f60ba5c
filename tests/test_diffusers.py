"""diffusers video transformers (CogVideoX, Latte): groups, gates, surgery, costs, saving."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import particlize as pz
from strategies import removal_sets

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DIM, HEADS, HEAD_DIM, LAYERS, HIDDEN = 32, 4, 8, 2, 128  # FF inner = 4 * DIM by diffusers' default
LATTE_PATCHES, LATTE_FRAMES = (8 // 2) ** 2, 3  # Latte below: sample_size 8, patch 2, video_length 3


def _randomise(m: torch.nn.Module) -> torch.nn.Module:
    """Give every weight a value (zero-initialised gates and tables included) so that every path matters."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def _cogvideox(seed: int = 0) -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return _randomise(CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=12, num_layers=LAYERS, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=3,
    ))


def _latte(seed: int = 0) -> torch.nn.Module:
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(seed)
    return _randomise(LatteTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, num_layers=LAYERS,
        cross_attention_dim=DIM, sample_size=8, patch_size=2, norm_type="ada_norm_single", caption_channels=12,
        video_length=3,
    ))


def _batch(family: str, b: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (b,), generator=g)
    if family == "cogvideox":  # [B, latent frames, C, H, W]; 3 caption tokens
        return {"hidden_states": torch.randn((b, 2, 4, 8, 8), generator=g),
                "encoder_hidden_states": torch.randn((b, 3, 12), generator=g), "timestep": t, "return_dict": False}
    return {"hidden_states": torch.randn((b, 4, 3, 8, 8), generator=g),  # [B, C, frames, H, W]; 5 caption tokens
            "encoder_hidden_states": torch.randn((b, 5, 12), generator=g), "timestep": t, "return_dict": False}


MODELS = {"cogvideox": _cogvideox, "latte": _latte}
FAMILIES = list(MODELS)


def _run(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch)[0]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_groups_found():
    pm = pz.decompose(_cogvideox())
    assert pm.adapter == "diffusers-video" and pm.flops_unit == "per token (transformer blocks)"
    assert [g.name for g in pm.groups] == [
        "transformer_blocks.0.attn1.heads", "transformer_blocks.0.ff.neurons",
        "transformer_blocks.1.attn1.heads", "transformer_blocks.1.ff.neurons", "transformer_blocks.blocks",
    ]
    assert [g.kind for g in pm.groups] == ["head", "neuron", "head", "neuron", "block"]
    assert [g.size for g in pm.groups] == [HEADS, HIDDEN, HEADS, HIDDEN, LAYERS]

    pm = pz.decompose(_latte())
    assert pm.adapter == "diffusers-video"
    names = [
        "transformer_blocks.{i}.attn1.heads", "transformer_blocks.{i}.attn2.heads", "transformer_blocks.{i}.ff.neurons",
        "temporal_transformer_blocks.{i}.attn1.heads", "temporal_transformer_blocks.{i}.ff.neurons",
    ]
    assert [g.name for g in pm.groups] == [n.format(i=i) for i in range(LAYERS) for n in names]
    assert [g.size for g in pm.groups] == [HEADS, HEADS, HIDDEN, HEADS, HIDDEN] * LAYERS
    assert not pm.select("block")  # zipped spatial/temporal lists: blocks are not removable exactly
    assert all(g.per_example for g in pm.groups)


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_changes_the_output(family):
    """The tiny models are sensitive enough for the 1e-5 equality below to mean something."""
    model, batch = MODELS[family](), _batch(family)
    pm = pz.decompose(model)
    with torch.no_grad():
        dense = _run(model, batch)
        for g in pm.groups:
            with pm.ablate({g.name: [0]}):
                assert (_run(model, batch) - dense).abs().max() > 1e-3, g.name


@pytest.mark.parametrize("family", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_masked_equals_pruned(family, data):
    model, batch = MODELS[family](), _batch(family)
    pm = pz.decompose(model)
    remove = data.draw(removal_sets(pm))
    with torch.no_grad():
        dense = _run(model, batch)
        with pm.ablate(remove):
            masked = _run(model, batch)
        small = pm.prune(remove)
        torch.testing.assert_close(_run(small, batch), masked, atol=1e-5, rtol=0)
        torch.testing.assert_close(_run(model, batch), dense, atol=0, rtol=0)  # original untouched, no hooks left
    assert _params(small) == pm.cost(remove).params


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    model, batch = MODELS[family](), _batch(family)
    pm = pz.decompose(model)
    remove = {g.name: [1, 2] if g.kind == "head" else list(range(0, g.size, 3)) for g in pm.groups if g.layer == 0}
    if family == "cogvideox":
        remove["transformer_blocks.blocks"] = [1]
    small = pm.prune(remove)
    pz.save(small, tmp_path / "m")
    again = pz.load(tmp_path / "m")  # a factory inside particlize: no trust_code needed
    assert type(again) is type(model) and _params(again) == _params(small)
    with torch.no_grad():
        torch.testing.assert_close(_run(again, batch), _run(small, batch), atol=1e-6, rtol=0)


def test_pruned_heads_update_counts():
    pm = pz.decompose(_cogvideox())
    small = pm.prune({"transformer_blocks.1.attn1.heads": [0, 3], "transformer_blocks.blocks": [0]})
    assert len(small.transformer_blocks) == 1
    attn = small.transformer_blocks[0].attn1
    assert attn.heads == 2 and attn.inner_dim == 2 * HEAD_DIM and attn.to_q.out_features == 2 * HEAD_DIM
    assert attn.to_out[0].in_features == 2 * HEAD_DIM
    pm = pz.decompose(_latte())
    small = pm.prune({"temporal_transformer_blocks.0.attn1.heads": [1], "transformer_blocks.1.ff.neurons": [0, 5]})
    assert small.temporal_transformer_blocks[0].attn1.heads == 3
    assert small.transformer_blocks[1].ff.net[0].proj.out_features == 2 * (HIDDEN - 2)  # GEGLU: value + gate rows


def test_flops_cost():
    pm = pz.decompose(_cogvideox())
    full = pm.cost(seq_len=0)
    assert full.flops == LAYERS * 2.0 * (4 * DIM * DIM + 2 * DIM * HIDDEN)  # adaLN Linears run per video: 0
    less = pm.cost({"transformer_blocks.0.ff.neurons": [0, 1], "transformer_blocks.1.attn1.heads": [2]}, seq_len=0)
    assert full.flops - less.flops == 2.0 * (2 * 2 * DIM + 4 * HEAD_DIM * DIM)
    assert pm.cost({"transformer_blocks.1.attn1.heads": [2]}, seq_len=10).flops == (
        pm.cost(seq_len=10).flops - 2.0 * 4 * HEAD_DIM * DIM - 10 * 4.0 * HEAD_DIM)
    assert pm.cost({"transformer_blocks.blocks": [0, 1]}, seq_len=10).flops == 0

    pm = pz.decompose(_latte())
    full = pm.cost(seq_len=0)
    # spatial: self-attention 4 D^2, cross-attention q and out 2 D^2 (k, v run on the caption), GEGLU 3 D H;
    # temporal: self-attention 4 D^2, GEGLU 3 D H; attention over 4 x 4 patches (spatial) and 3 frames (temporal)
    scores = LAYERS * HEADS * 4.0 * HEAD_DIM * (LATTE_PATCHES + LATTE_FRAMES)
    assert full.flops == LAYERS * 2.0 * (10 * DIM * DIM + 6 * DIM * HIDDEN) + scores
    less = pm.cost({"transformer_blocks.0.ff.neurons": [0, 1]}, seq_len=0)
    assert full.flops - less.flops == 2 * 2.0 * 3 * DIM  # a GEGLU neuron: two proj rows and one out column
    # only the cross-attention heads (caption tokens) follow seq_len
    assert pm.cost(seq_len=5).flops - full.flops == LAYERS * HEADS * 4.0 * HEAD_DIM * 5
    spatial, temporal = (pm.cost({f"{n}.0.attn1.heads": [0]}, seq_len=5).flops
                         for n in ("transformer_blocks", "temporal_transformer_blocks"))
    assert spatial - temporal == 4.0 * HEAD_DIM * (LATTE_FRAMES - LATTE_PATCHES)


def test_latte_attention_context_is_what_the_model_attends_over():
    model, batch = _latte(), _batch("latte")
    pm = pz.decompose(model)
    seen: dict[str, int] = {}

    def record(name):
        def hook(mod, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).shape[1]  # self-attention: keys = queries
        return hook

    handles = [model.get_submodule(g.name.removesuffix(".heads")).register_forward_pre_hook(record(g.name), with_kwargs=True)
               for g in pm.groups if g.name.endswith("attn1.heads")]
    with torch.no_grad():
        _run(model, batch)
    for h in handles:
        h.remove()
    assert seen and all(pm[name].ctx_len == n for name, n in seen.items())
    assert sorted(set(seen.values())) == [LATTE_FRAMES, LATTE_PATCHES]


@pytest.mark.parametrize("family", FAMILIES)
def test_per_example_gates_equal_one_run_per_example(family):
    model, batch = MODELS[family](), _batch(family)
    pm = pz.decompose(model)
    masks = {g.name: torch.zeros(3, g.size) for g in pm.groups if g.layer in (0, None)}
    for k, (name, m) in enumerate(masks.items()):
        m[k % 3, k % m.shape[1]] = 1
        m[(k + 1) % 3, (k + 1) % m.shape[1]] = 1
    with torch.no_grad(), pm.ablate(masks):
        batched = _run(model, batch)
    for b in range(3):
        one = {k: v[b:b + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        rem = {k: m[b].nonzero().flatten().tolist() for k, m in masks.items()}
        with torch.no_grad(), pm.ablate(rem):
            torch.testing.assert_close(batched[b:b + 1], _run(model, one), atol=1e-5, rtol=1e-5)


def test_per_example_gates_refused_where_the_feed_forward_is_chunked_over_the_batch():
    model, batch = _latte(), _batch("latte")
    pm = pz.decompose(model)
    name = "transformer_blocks.0.ff.neurons"
    with torch.no_grad(), pm.ablate({name: [3]}):
        ref = _run(model, batch)
    model.transformer_blocks[0].set_chunk_feed_forward(3, 0)  # 3 videos x 3 frames, in chunks of 3
    with torch.no_grad():
        with pm.ablate({name: [3]}):  # shared gates still apply to every chunk
            torch.testing.assert_close(_run(model, batch), ref, atol=1e-6, rtol=0)
        mask = torch.zeros(3, HIDDEN)
        mask[0, 3] = 1
        with pytest.raises(pz.GateError, match="chunks of the batch"), pm.ablate({name: mask}):
            _run(model, batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_gradients_exist_for_every_particle(family):
    model, batch = MODELS[family](), _batch(family)
    pm = pz.decompose(model)
    gates = {g.name: torch.ones(g.size, requires_grad=True) for g in pm.groups}
    with pm.gates(gates):
        _run(model, batch).pow(2).sum().backward()
    for name, g in gates.items():
        assert g.grad is not None and g.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_ablation_runs_and_fast_ablation_equals_the_naive_loop(family):
    """The analysis engine drives these gates (mean patches of the two-stream blocks, folded batches)."""
    from particlize.analysis._common import Batch
    from particlize.analysis.ablation import ablation_effects

    model, batch = MODELS[family](), _batch(family)
    pm = pz.decompose(model)
    with torch.no_grad(), pm.ablate({g.name: [0] for g in pm.groups}, mode="mean", data=[batch]):
        assert torch.isfinite(_run(model, batch)).all()
    with torch.no_grad():
        target = _run(model, batch) + 0.1
    batches = [Batch(batch, target)]
    names = [g.name for g in pm.groups if g.layer in (0, None)]
    fast = ablation_effects(pm, batches, groups=names, max_rows=12)
    naive = ablation_effects(pm, batches, groups=names, fast=False)
    for n in names:
        torch.testing.assert_close(fast[n], naive[n], atol=1e-5, rtol=0)
