"""Models and helpers for the context-parallel tests (tests/test_context_parallel.py and the gloo script
tests/distributed/context_parallel.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Dropped(torch.nn.Module):
    """A dropout on the tokens (split over cp) and one on a positional table (whole over cp)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.table = torch.nn.Parameter(torch.ones(8, 16))
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, ids):
        b, s = ids.shape
        tokens = F.dropout(torch.ones_like(self.embed(ids)), 0.5, True)
        table = F.dropout(self.table, 0.5, True)
        h = tokens + table
        q, k, v = (x.view(b, s, 2, 8).transpose(1, 2) for x in self.qkv(h).split(16, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, 16)
        return self.out(y), tokens, table


