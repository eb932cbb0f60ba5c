"""Shared fixtures: small random-init models built from configs (offline, seeded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny test models run fastest on one thread, and do not stall when the machine is shared.
torch.set_num_threads(1)


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def hf_model(family: str) -> tuple[torch.nn.Module, dict]:
    """A tiny random-init transformer of ``family`` and an input batch for it (eval mode, seeded)."""
    import transformers as T

    _quiet()
    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(0, 97, (3, 7))}
    if family == "bert":
        m = T.BertForSequenceClassification(T.BertConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            num_labels=3, max_position_embeddings=32))
    elif family == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                                           bos_token_id=0, eos_token_id=0))
    elif family == "llama-gqa":
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                                             num_key_value_heads=2, intermediate_size=40, max_position_embeddings=32))
    elif family == "qwen2-gqa":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                             num_key_value_heads=3, intermediate_size=40, max_position_embeddings=32))
    elif family == "mistral-gqa":
        m = T.MistralForCausalLM(T.MistralConfig(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                                                 num_key_value_heads=4, intermediate_size=40, max_position_embeddings=32,
                                                 sliding_window=None))
    elif family == "roberta":
        m = T.RobertaForSequenceClassification(T.RobertaConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            num_labels=3, max_position_embeddings=40, pad_token_id=1))
        ids = {"input_ids": torch.randint(2, 97, (3, 7))}  # RoBERTa counts positions from pad_token_id + 1
    elif family == "llama-mha":
        m = T.LlamaModel(T.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=4, intermediate_size=40, max_position_embeddings=32))
    elif family == "vit":
        m = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                     intermediate_size=48, image_size=16, patch_size=4, num_labels=5))
        ids = {"pixel_values": torch.randn(3, 3, 16, 16)}
    else:
        raise ValueError(family)
    return m.eval(), ids


HF_FAMILIES = ["bert", "roberta", "gpt2", "llama-gqa", "qwen2-gqa", "mistral-gqa", "llama-mha", "vit"]


def output_of(model: torch.nn.Module, batch) -> torch.Tensor:
    """The main output tensor of a model call, whatever the output type."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0] if isinstance(out, (tuple, list)) else out


def assert_masked_equals_pruned(pm, remove: dict, batch, atol: float = 1e-5) -> torch.nn.Module:
    """The invariant: zero gates on ``remove`` give the outputs of ``pm.prune(remove)`` (rtol 0, ``atol``) on ``batch``
    (a tensor or a dict of keyword inputs); returns the pruned model for further checks."""
    with torch.no_grad():
        with pm.ablate(remove) as gated:
            y_gated = output_of(gated, batch)
        small = pm.prune(remove).eval()
        torch.testing.assert_close(output_of(small, batch), y_gated, rtol=0, atol=atol)
    return small


@pytest.fixture(params=HF_FAMILIES)
def hf(request):
    return hf_model(request.param)


def reader_output(model: torch.nn.Module, path: str, batch: dict) -> torch.Tensor:
    """The output of submodule ``path`` when ``model`` runs on ``batch`` (no grad)."""
    seen = {}
    h = model.get_submodule(path).register_forward_hook(lambda m, a, o: seen.setdefault("y", o.detach()))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        h.remove()
    return seen["y"]


@pytest.fixture(scope="session")
def trained_text(tmp_path_factory):
    """(work folder, model, task, tokenizer): the quickly trained text classifier of `loop_fixture`, trained once
    per session and shared by the compress-loop tests."""
    from loop_fixture import make

    work = tmp_path_factory.mktemp("loop")
    return (work, *make(work))
