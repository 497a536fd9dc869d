"""Attention that exposes per-head values (``z``) and patterns to hook points.

Fused attention kernels never materialise the per-head values before the output
projection nor the softmax pattern, so these sites need a small re-implementation that
reads the module's own weights (never copies them). To keep the wrapped model's outputs
bit-identical by default, the re-implementation runs only while a hook is attached to
``z`` or ``pattern``; otherwise the module's original forward runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _needs_heads(*points: nn.Module) -> bool:
    return any(p.has_hooks() for p in points)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                       pattern_point: nn.Module, dropout: float = 0.0) -> Tensor:
    """softmax(q k^T * scale + mask) v with the pattern routed through ``pattern_point``.

    q, k, v: (B, H, T, Dh); mask additive, broadcastable to (B, H, T, S). Returns (B, H, T, Dh).
    """
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask
    pattern = pattern_point(scores.softmax(dim=-1))
    if dropout:
        pattern = F.dropout(pattern, p=dropout)
    return pattern @ v


class HookedMultiheadAttention:
    """Instance-level forward for ``torch.nn.MultiheadAttention`` (open_clip's native towers)."""

    def __init__(self, mha: nn.MultiheadAttention, z_point: nn.Module, pattern_point: nn.Module):
        if not mha._qkv_same_embed_dim:
            raise NotImplementedError("nn.MultiheadAttention with separate k/v widths is not supported")
        self.mha, self.z_point, self.pattern_point = mha, z_point, pattern_point
        self.original_forward = mha.forward

    def install(self) -> None:
        self.mha.forward = self.forward

    def remove(self) -> None:
        if self.mha.__dict__.get("forward") == self.forward:
            del self.mha.forward

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if need_weights or key_padding_mask is not None or not _needs_heads(self.z_point, self.pattern_point):
            return self.original_forward(query, key, value, key_padding_mask=key_padding_mask,
                                         need_weights=need_weights, attn_mask=attn_mask,
                                         average_attn_weights=average_attn_weights, is_causal=is_causal)
        mha = self.mha
        if not mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, t, d = query.shape
        h = mha.num_heads
        dh = d // h
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)

        def heads(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
            return F.linear(x, w, bias).view(x.shape[0], x.shape[1], h, dh).transpose(1, 2)

        q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
        mask = _additive(attn_mask, q.dtype)
        if is_causal and mask is None:
            mask = torch.full((t, t), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
        dropout = mha.dropout if mha.training else 0.0
        if self.pattern_point.has_hooks():
            z = explicit_attention(q, k, v, mask, 1.0 / math.sqrt(dh), self.pattern_point, dropout)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        z = self.z_point(z.transpose(1, 2))
        out = F.linear(z.reshape(b, t, d), mha.out_proj.weight, mha.out_proj.bias)
        return (out if mha.batch_first else out.transpose(0, 1)), None


# --- transformers: a registered attention function, selected per model config -------------

HF_ATTENTION_NAME = "negtrace"


def _hf_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pattern_point = getattr(module, "_negtrace_pattern", None)
    if pattern_point is None or not pattern_point.has_hooks():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = _additive(attention_mask, query.dtype)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if mask is None and causal and query.shape[2] > 1:
        t, s = query.shape[2], key.shape[2]
        mask = torch.full((t, s), float("-inf"), device=query.device, dtype=query.dtype).triu(1)
    out = explicit_attention(query, key, value, mask, scale, pattern_point, dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def register_hf_attention() -> str:
    """Register negtrace's attention with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_ATTENTION_NAME, _hf_attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, sdpa_mask)
    return HF_ATTENTION_NAME
