"""A small decoder-only transformer as named stages, so it can be cut.

GPT-style (Radford et al. 2019): token embedding plus learned positions,
``N`` pre-norm blocks ``h ← h + Attn(LN(h))``, ``h ← h + MLP(LN(h))`` with
causal multi-head self-attention
(:func:`torch.nn.functional.scaled_dot_product_attention` with
``is_causal=True``) and a 4x GELU MLP, a final layer norm and a linear head
over the vocabulary. Stages of the :class:`torch.nn.Sequential`:
``embed``, ``block1`` ... ``blockN``, ``norm``, ``head``; every boundary is a
valid cut, and the tensor between stages is ``(B, T, width)`` float32.

Input ``(B, T)`` int64 token ids, ``T <= context``; output ``(B, T, vocab)``
logits, where position ``t`` sees tokens ``0..t`` only. Weights start as in
GPT-2: normal with standard deviation 0.02 (the residual output projections
scaled by ``1/sqrt(2N)``), biases zero, so the initial logits are close to 0
and the initial perplexity close to ``vocab``.

Parameters at the defaults (width 128, 4 blocks, 4 heads, vocab 256, context
64): 4·(12·128² + 13·128) + (256 + 64)·128 + 2·128 + 128·256 + 256 = 867,328
(:func:`transformer_parameters`).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = [
    "Block",
    "CausalSelfAttention",
    "Embedding",
    "transformer",
    "transformer_parameters",
]


class Embedding(nn.Module):
    """Token embedding plus a learned position embedding: ``(B, T) -> (B, T, D)``."""

    def __init__(self, vocab: int, context: int, width: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embed ``ids`` of shape ``(B, T)``, ``T <= context``."""
        steps = torch.arange(ids.shape[1], device=ids.device)
        return self.tokens(ids) + self.positions(steps)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` attends to ``0..t``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        b, t, d = h.shape
        q, k, v = self.qkv(h).split(d, dim=2)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """One pre-norm transformer block: attention then MLP, each residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


def _init(model: nn.Sequential, layers: int) -> None:
    """GPT-2 initialization: N(0, 0.02), residual projections / sqrt(2N)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = 0.02
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                std /= math.sqrt(2 * layers)
            nn.init.normal_(p, mean=0.0, std=std)


def transformer(
    vocab: int,
    context: int,
    width: int = 128,
    layers: int = 4,
    heads: int = 4,
) -> nn.Sequential:
    """A decoder-only transformer language model as named stages.

    Parameters
    ----------
    vocab : int
        Vocabulary size (256 for bytes); the head's output width.
    context : int
        Longest input ``T`` (learned positions).
    width : int (default: 128)
        Model width ``D``.
    layers : int (default: 4)
        Transformer blocks ``N``.
    heads : int (default: 4)
        Attention heads; ``width`` must be a multiple.
    """
    stages: OrderedDict[str, nn.Module] = OrderedDict(
        embed=Embedding(vocab, context, width)
    )
    for i in range(1, layers + 1):
        stages[f"block{i}"] = Block(width, heads)
    stages["norm"] = nn.LayerNorm(width)
    stages["head"] = nn.Linear(width, vocab)
    model = nn.Sequential(stages)
    _init(model, layers)
    return model


def transformer_parameters(
    vocab: int, context: int, width: int = 128, layers: int = 4
) -> int:
    """Parameter count of :func:`transformer`, by formula.

    Per block ``12·D² + 13·D`` (attention ``4·D² + 4·D``, MLP ``8·D² + 5·D``,
    two layer norms ``4·D``); embeddings ``(V + T)·D``; final norm ``2·D``;
    head ``D·V + V``.
    """
    d = width
    return (
        layers * (12 * d * d + 13 * d)
        + (vocab + context) * d
        + 2 * d
        + d * vocab
        + vocab
    )
