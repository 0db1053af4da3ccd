"""Small models with random weights for examples, tests and benchmarks; nothing is downloaded.

The transformers families need the `transformers` package (the `test` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True, kw_only=True)
class ZooModel:
    """A model, its example inputs, and how to read one tensor out of its output."""

    name: str
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    main_output: Callable[[Any], torch.Tensor]


def mlp(width: int = 32, depth: int = 4, batch: int = 8) -> ZooModel:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(width, 4))
    return ZooModel(name="mlp", model=model, args=(torch.randn(batch, width),), kwargs={},
                    main_output=lambda out: out)


def transformer_encoder(d_model: int = 32, layers: int = 2, batch: int = 4, seq: int = 8) -> ZooModel:
    layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
    return ZooModel(name="transformer_encoder", model=model, args=(torch.randn(batch, seq, d_model),),
                    kwargs={}, main_output=lambda out: out)


def gpt2(layers: int = 2, d_model: int = 64, batch: int = 4, seq: int = 16, vocab: int = 256) -> ZooModel:
    """GPT-2 with a small vocabulary (pass vocab=50257 for GPT-2's own). GPT2Config's bos/eos id 50256 is
    moved to the vocabulary's last id when it lies beyond it, so that transformers has no token id to warn
    about at any size (its warning on every run came from that id, not from the size)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    special = min(50256, vocab - 1)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=d_model, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=special,
                        eos_token_id=special)
    return ZooModel(name="gpt2", model=GPT2LMHeadModel(config), args=(torch.randint(0, vocab, (batch, seq)),),
                    kwargs={}, main_output=lambda out: out.logits)


def bert(layers: int = 2, d_model: int = 64, batch: int = 4, seq: int = 16, vocab: int = 256) -> ZooModel:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * d_model, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ZooModel(name="bert", model=BertForMaskedLM(config), args=(torch.randint(0, vocab, (batch, seq)),),
                    kwargs={}, main_output=lambda out: out.logits)


def llama(layers: int = 2, d_model: int = 64, batch: int = 4, seq: int = 16, vocab: int = 256) -> ZooModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return ZooModel(name="llama", model=LlamaForCausalLM(config), args=(torch.randint(0, vocab, (batch, seq)),),
                    kwargs={}, main_output=lambda out: out.logits)


def mistral(layers: int = 2, d_model: int = 64, batch: int = 4, seq: int = 16, vocab: int = 256) -> ZooModel:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, sliding_window=None)
    return ZooModel(name="mistral", model=MistralForCausalLM(config),
                    args=(torch.randint(0, vocab, (batch, seq)),), kwargs={}, main_output=lambda out: out.logits)


def qwen2(layers: int = 2, d_model: int = 64, batch: int = 4, seq: int = 16, vocab: int = 256) -> ZooModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return ZooModel(name="qwen2", model=Qwen2ForCausalLM(config),
                    args=(torch.randint(0, vocab, (batch, seq)),), kwargs={}, main_output=lambda out: out.logits)


def mixtral(layers: int = 2, d_model: int = 64, experts: int = 4, top_k: int = 2, batch: int = 4, seq: int = 16,
            vocab: int = 256) -> ZooModel:
    """A mixture of experts (HF Mixtral: `experts` experts per layer, `top_k` per token). Not among the
    families every test sweeps (tests/test_expert_parallel.py covers the MoE models)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=64)
    return ZooModel(name="mixtral", model=MixtralForCausalLM(config),
                    args=(torch.randint(0, vocab, (batch, seq)),), kwargs={}, main_output=lambda out: out.logits)


def t5(layers: int = 2, d_model: int = 64, batch: int = 2, seq: int = 8, vocab: int = 256) -> ZooModel:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=layers,
                      num_heads=4, dropout_rate=0.0, decoder_start_token_id=0)
    ids = torch.randint(0, vocab, (batch, seq))
    return ZooModel(name="t5", model=T5ForConditionalGeneration(config), args=(ids,),
                    kwargs={"decoder_input_ids": torch.randint(0, vocab, (batch, seq))},
                    main_output=lambda out: out.logits)


def vit(layers: int = 2, d_model: int = 64, batch: int = 2, image: int = 32) -> ZooModel:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=4,
                       intermediate_size=2 * d_model, image_size=image, patch_size=8, num_labels=10,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ZooModel(name="vit", model=ViTForImageClassification(config),
                    args=(torch.randn(batch, 3, image, image),), kwargs={},
                    main_output=lambda out: out.logits)


class _GPTBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, attn_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn_qkv = nn.Linear(d_model, 3 * d_model, bias=attn_bias)
        self.attn_proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp_fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.attn_qkv(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp_proj(torch.nn.functional.gelu(self.mlp_fc(self.ln_2(x))))


class GPT(nn.Module):
    """A GPT decoder in plain PyTorch (nanoGPT's shape: pre-norm blocks, tied head)."""

    def __init__(self, layers: int, d_model: int, heads: int, vocab: int, max_seq: int,
                 attn_bias: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(max_seq, d_model)
        self.blocks = nn.ModuleList(_GPTBlock(d_model, heads, attn_bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt(layers: int = 4, d_model: int = 64, heads: int = 4, vocab: int = 256, seq: int = 16,
        batch: int = 4, device: str | torch.device | None = None, attn_bias: bool = True) -> ZooModel:
    """A plain-PyTorch GPT; `device="meta"` builds it without memory (for planning only).

    attn_bias=False drops the q/k/v bias; the key bias has an exactly-zero true
    gradient (softmax is shift invariant), so Adam turns its float noise into
    full-size steps, which makes it useless for comparing two training runs.
    """
    with torch.device(device or "cpu"):
        model = GPT(layers, d_model, heads, vocab, seq, attn_bias)
        ids = torch.randint(0, vocab, (batch, seq))
    return ZooModel(name="gpt", model=model, args=(ids,), kwargs={}, main_output=lambda out: out)


TRANSFORMERS_FAMILIES: dict[str, Callable[[], ZooModel]] = {
    "gpt2": gpt2, "bert": bert, "llama": llama, "mistral": mistral, "qwen2": qwen2, "t5": t5, "vit": vit,
}
ALL_FAMILIES: dict[str, Callable[[], ZooModel]] = {
    "mlp": mlp, "gpt": gpt, "transformer_encoder": transformer_encoder, **TRANSFORMERS_FAMILIES,
}
