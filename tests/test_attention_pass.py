"""passes/attention.py: constant causal masks become SDPA's is_causal, repeat_kv becomes enable_gqa,
and the graph still computes what the model computes (float32, rtol 1e-5 / atol 1e-5)."""

from __future__ import annotations

import pytest
import torch

import autopart
from autopart import passes, zoo

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _sdpa_calls(gm: torch.fx.GraphModule) -> list[dict]:
    calls = []
    for node in gm.graph.nodes:
        if node.target is SDPA:
            args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), node.args))
            args.update(node.kwargs)
            calls.append(args)
    return calls


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)


@pytest.mark.parametrize("family,causal,gqa", [("llama", True, True), ("qwen2", True, True), ("gpt2", True, False),
                                                ("bert", False, False)])
def test_constant_masks_become_flags_and_the_graph_is_unchanged(family, causal, gqa):
    torch.manual_seed(0)
    entry = zoo.ALL_FAMILIES[family](layers=2)
    gm = autopart.trace(entry.model, entry.args, entry.kwargs or None)
    assert all(isinstance(c.get("attn_mask"), torch.fx.Node) for c in _sdpa_calls(gm))  # traced with a mask
    passes.use_causal_attention(gm)
    calls = _sdpa_calls(gm)
    assert calls and all(c.get("attn_mask") is None for c in calls)
    assert all(bool(c.get("is_causal")) == causal for c in calls)
    assert all(bool(c.get("enable_gqa")) == gqa for c in calls)
    if gqa:  # the keys are the projection's heads, not the repeated ones
        assert all(c["key"].meta["val"].shape[1] < c["query"].meta["val"].shape[1] for c in calls)
    out = _logits(gm(*entry.args, **{**(entry.kwargs or {}), **({"use_cache": False} if family != "bert" else {})}))
    torch.testing.assert_close(out, _logits(entry.model(*entry.args, **(entry.kwargs or {}))), rtol=1e-5, atol=1e-5)


def test_a_padding_mask_that_depends_on_the_input_stays():
    torch.manual_seed(0)
    entry = zoo.llama(layers=1)
    ids = entry.args[0]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: a data-dependent mask
    gm = autopart.trace(entry.model, (ids,), {"attention_mask": mask})
    passes.use_causal_attention(gm)
    assert all(isinstance(c.get("attn_mask"), torch.fx.Node) for c in _sdpa_calls(gm))


@pytest.mark.parametrize("window,causal", [(None, True), (1500, False)])
def test_a_mask_too_large_to_build_is_judged_on_a_sample_of_its_rows(monkeypatch, window, causal):
    """Beyond LARGE_MASK_ELEMENTS a mask is computed on sampled query rows only (at 131,072 tokens the
    whole one is 17 GB): a causal mask still becomes is_causal, a sliding window (visible only in the
    rows past it) stays a mask."""
    from transformers import MistralConfig, MistralForCausalLM

    from autopart.passes import attention

    monkeypatch.setattr(attention, "LARGE_MASK_ELEMENTS", 2**16)  # a 2048 × 2048 mask is 64 times that
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                           sliding_window=window)
    gm = autopart.trace(MistralForCausalLM(config), (torch.randint(0, 64, (1, 2048)),))
    passes.use_causal_attention(gm)
    calls = _sdpa_calls(gm)
    assert calls and all((c.get("attn_mask") is None) == causal for c in calls)
    assert all(bool(c.get("is_causal")) == causal for c in calls)
