"""Random models for property tests: chains, long skips, branches, tied weights,
buffers, layer norm and attention, built from a drawn program of layer kinds."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

LAYER_KINDS = ("linear", "skip", "branch", "tied", "buffer", "norm", "attention")


class ProgramModel(nn.Module):
    """Runs `program`, a list of (kind, arg) steps, over a [batch, seq, width] activation."""

    def __init__(self, program: list[tuple[str, int]], width: int, heads: int = 2) -> None:
        super().__init__()
        self.program = program
        self.width = width
        self.heads = heads
        self.layers = nn.ModuleList()
        for kind, _ in program:
            self.layers.append(self._make(kind, width))
        self.head = nn.Linear(width, 3)

    @staticmethod
    def _make(kind: str, width: int) -> nn.Module:
        block = nn.Module()
        if kind in ("linear", "skip", "tied"):
            block.proj = nn.Linear(width, width)
        elif kind == "branch":
            block.left = nn.Linear(width, width)
            block.right = nn.Linear(width, width, bias=False)
        elif kind == "buffer":
            block.proj = nn.Linear(width, width)
            block.register_buffer("scale", torch.linspace(0.5, 1.5, width))
        elif kind == "norm":
            block.norm = nn.LayerNorm(width)
        elif kind == "attention":
            block.qkv = nn.Linear(width, 3 * width)
            block.out = nn.Linear(width, width)
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        history = [x]
        h = x
        for (kind, arg), block in zip(self.program, self.layers):
            if kind == "linear":
                h = torch.tanh(block.proj(h))
            elif kind == "skip":  # residual from `arg` layers back: crosses many stages
                h = torch.tanh(block.proj(h)) + history[max(0, len(history) - 1 - arg)]
            elif kind == "branch":  # two paths that join
                h = F.gelu(block.left(h)) * torch.sigmoid(block.right(h))
            elif kind == "tied":  # reuses the first layer's weight (tied parameters)
                h = h + torch.tanh(F.linear(h, self._first_weight()))
            elif kind == "buffer":
                h = block.proj(h) * block.scale
            elif kind == "norm":
                h = block.norm(h)
            elif kind == "attention":
                h = h + self._attention(block, h)
            history.append(h)
        return self.head(h)

    def _first_weight(self) -> torch.Tensor:
        for block in self.layers:
            for name in ("proj", "left", "qkv"):
                if hasattr(block, name):
                    weight = getattr(block, name).weight
                    if weight.shape[0] == weight.shape[1]:
                        return weight
        return self.head.weight.new_zeros(self.width, self.width)

    def _attention(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        b, s, w = h.shape
        q, k, v = block.qkv(h).split(w, dim=-1)
        shape = (b, s, self.heads, w // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return block.out(y.transpose(1, 2).reshape(b, s, w))


@st.composite
def programs(draw, min_layers: int = 1, max_layers: int = 8) -> list[tuple[str, int]]:
    n = draw(st.integers(min_layers, max_layers))
    steps = []
    for _ in range(n):
        kind = draw(st.sampled_from(LAYER_KINDS))
        steps.append((kind, draw(st.integers(1, 6)) if kind == "skip" else 0))
    return steps


def build(program: list[tuple[str, int]], width: int = 8, seed: int = 0) -> ProgramModel:
    torch.manual_seed(seed)
    model = ProgramModel(program, width)
    # keep activations O(1) so float32 comparisons stay meaningful
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(1.0 / math.sqrt(p.shape[1]) / p.std().clamp_min(1e-6) / 2)
    return model


# ----------------------------------------------------------------------------- sequences (context parallelism)

SEQUENCE_KINDS = ("linear", "skip", "norm", "attention", "rotary", "masked_attention", "eager_attention", "pool",
                  "shift")
ATTENTION_KINDS = ("attention", "masked_attention", "eager_attention")


class SequenceModel(nn.Module):
    """Runs `program` over a [batch, seq, width] activation `x` with a padding mask `keep` [batch, seq]
    (True: a real token), with what a context-parallel plan must get right: causal SDPA, rotary-like
    tables built from whole positions, an attention mask from the padding (SDPA's and eager attention's,
    additive), a mean over the tokens, and a token shift (a slice along the sequence)."""

    def __init__(self, program: list[tuple[str, int]], width: int, heads: int = 2) -> None:
        super().__init__()
        self.program, self.width, self.heads = program, width, heads
        self.layers = nn.ModuleList()
        for kind, _ in program:
            block = nn.Module()
            if kind in ("linear", "skip", "pool", "shift"):
                block.proj = nn.Linear(width, width)
            elif kind == "norm":
                block.norm = nn.LayerNorm(width)
            elif kind == "rotary":
                block.register_buffer("inv_freq", 1.0 / (10.0 ** (torch.arange(0, width, 2).float() / width)))
            else:
                block.qkv = nn.Linear(width, 3 * width)
                block.out = nn.Linear(width, width)
            self.layers.append(block)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        history, h = [x], x
        s = x.shape[1]
        positions = torch.arange(s, device=x.device)
        causal = positions[None, :] <= positions[:, None]
        # a query sees the earlier real tokens and itself (no row is all masked)
        mask = (causal[None, None] & keep[:, None, None, :]) | torch.eye(s, dtype=torch.bool, device=x.device)
        for (kind, arg), block in zip(self.program, self.layers):
            if kind == "linear":
                h = torch.tanh(block.proj(h))
            elif kind == "skip":
                h = torch.tanh(block.proj(h)) + history[max(0, len(history) - 1 - arg)]
            elif kind == "norm":
                h = block.norm(h)
            elif kind == "rotary":   # tables of the whole sequence's positions meet the split activation
                freqs = positions.float()[:, None] * block.inv_freq[None, :]
                cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
                half = self.width // 2
                h = h * cos + torch.cat([-h[..., half:], h[..., :half]], -1) * sin
            elif kind == "pool":     # a mean over the tokens: a reduction along the sequence
                h = h + block.proj(h.mean(dim=1, keepdim=True))
            elif kind == "shift":    # each token sees its predecessor: a slice along the sequence
                h = h + block.proj(F.pad(h[:, :-1], (0, 0, 1, 0)))
            else:
                h = h + self._attention(block, h, kind, mask)
            history.append(h)
        return self.head(h)

    def _attention(self, block: nn.Module, h: torch.Tensor, kind: str, mask: torch.Tensor) -> torch.Tensor:
        b, s, w = h.shape
        q, k, v = (t.reshape(b, s, self.heads, w // self.heads).transpose(1, 2)
                   for t in block.qkv(h).split(w, dim=-1))
        if kind == "attention":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif kind == "masked_attention":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(w // self.heads)
            scores = scores + torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, -1e9)
            y = torch.softmax(scores, dim=-1) @ v
        return block.out(y.transpose(1, 2).reshape(b, s, w))


@st.composite
def sequence_programs(draw, min_layers: int = 1, max_layers: int = 5) -> list[tuple[str, int]]:
    """Programs of `SequenceModel` with at least one attention (context parallelism splits its sequence)."""
    n = draw(st.integers(min_layers, max_layers))
    steps = [(kind, draw(st.integers(1, 4)) if kind == "skip" else 0)
             for kind in (draw(st.sampled_from(SEQUENCE_KINDS)) for _ in range(n))]
    if not any(kind in ATTENTION_KINDS for kind, _ in steps):
        steps.insert(draw(st.integers(0, len(steps))), (draw(st.sampled_from(ATTENTION_KINDS)), 0))
    return steps


def build_sequence_model(program: list[tuple[str, int]], width: int = 12, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    model = SequenceModel(program, width)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(1.0 / math.sqrt(p.shape[1]) / p.std().clamp_min(1e-6) / 2)
    return model
