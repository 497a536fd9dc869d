"""transformers families: ``CLIPModel`` (PubMedCLIP layout) and the BERT encoder reused by
open_clip's HF text tower.

Facts specific to transformers 5.x, kept here and nowhere else:
- encoder layers return a tensor, not a tuple (4.x returned tuples: both are accepted);
- attention goes through a registered attention function chosen by
  ``config._attn_implementation``: negtrace registers its own, which defers to SDPA unless
  a pattern hook is attached (see :mod:`negtrace.models.attention`);
- CLIP's text tower is causal and pools at the first EOS (or argmax for legacy configs with
  ``eos_token_id == 2``); its vision tower pools CLS after ``post_layernorm``;
- BERT is post-LN: the attention/MLP addends are the outputs of the ``dropout`` that follows
  each output ``dense`` layer, before the residual LayerNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attention import register_hf_attention
from ..sites import BlockSite
from ..tokens import Tokenized
from .base import HookSpec, TowerAdapter, TowerState

BERT_TABLE = {
    BlockSite.RESID_PRE: HookSpec("", "pre"),
    BlockSite.RESID_POST: HookSpec("", "post"),
    BlockSite.ATTN_OUT: HookSpec("attention.output.dropout"),
    BlockSite.MLP_OUT: HookSpec("output.dropout"),
    BlockSite.Z: HookSpec("attention.output.dense", "pre", "heads"),
    # pattern: through the registered attention function (HFAttentionMixin)
}

CLIP_TABLE = {
    BlockSite.RESID_PRE: HookSpec("", "pre"),
    BlockSite.RESID_POST: HookSpec("", "post"),
    BlockSite.ATTN_OUT: HookSpec("self_attn.out_proj"),
    BlockSite.MLP_OUT: HookSpec("mlp"),
    BlockSite.Z: HookSpec("self_attn.out_proj", "pre", "heads"),
}


def padding_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) 1/0 keep-mask -> additive (B, 1, 1, T) mask."""
    return (1.0 - keep[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _layer_output(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def bert_block(layer: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    return _layer_output(layer(x, mask))


class HFAttentionMixin:
    """Routes attention patterns of transformers modules through negtrace hook points."""

    config: object

    def attention_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def install_heads(self, block_points) -> None:
        name = register_hf_attention()
        self._previous_attn = self.config._attn_implementation
        self.config._attn_implementation = name
        for module, pts in zip(self.attention_modules(), block_points, strict=True):
            object.__setattr__(module, "_negtrace_pattern", pts.attn.hook_pattern)  # not a submodule

    def teardown(self) -> None:
        if hasattr(self, "_previous_attn"):
            self.config._attn_implementation = self._previous_attn
            for module in self.attention_modules():
                module.__dict__.pop("_negtrace_pattern", None)


class _CLIPTower(HFAttentionMixin, TowerAdapter):
    """What both towers of a transformers ``CLIPModel`` share: encoder layers and attention."""

    encoder_owner: nn.Module

    def blocks(self) -> list[nn.Module]:
        return list(self.encoder_owner.encoder.layers)

    def attention_modules(self) -> list[nn.Module]:
        return [blk.self_attn for blk in self.blocks()]


class CLIPTextTower(_CLIPTower):
    tower = "text"
    family = "hf-clip"
    causal = True
    block_table = CLIP_TABLE
    embed_spec = HookSpec("embeddings.token_embedding")

    def __init__(self, model: nn.Module):
        self.model = model
        self.text = self.root = self.encoder_owner = model.text_model
        self.config = self.text.config
        self.d_model = self.config.hidden_size
        self.n_heads = self.config.num_attention_heads

    def _pooled_index(self, ids: Tensor) -> Tensor:
        eos = self.text.eos_token_id
        if eos == 2:  # legacy configs: EOT has the largest id
            return ids.to(torch.int).argmax(dim=-1).long()
        return (ids == eos).int().argmax(dim=-1).long()

    def embed(self, inputs: Tokenized) -> tuple[Tensor, TowerState]:
        ids = inputs.ids
        x = self.text.embeddings(input_ids=ids)
        t = ids.shape[1]
        causal = torch.full((t, t), torch.finfo(x.dtype).min, device=x.device, dtype=x.dtype).triu(1)
        mask = causal[None, None] + padding_mask(inputs.mask.long(), x.dtype)
        mask = mask.clamp_min(torch.finfo(x.dtype).min)
        return x, TowerState(self._pooled_index(ids), mask)

    def block(self, layer: int, x: Tensor, state: TowerState) -> Tensor:
        return _layer_output(self.text.encoder.layers[layer](x, state.attn_mask))

    def pool(self, x: Tensor, state: TowerState) -> Tensor:
        x = self.text.final_layer_norm(x)
        return x[torch.arange(x.shape[0], device=x.device), state.pooled_index]

    def project(self, pooled: Tensor) -> Tensor:
        return self.model.text_projection(pooled)


class CLIPVisionTower(_CLIPTower):
    tower = "vision"
    family = "hf-clip"
    causal = False
    block_table = CLIP_TABLE
    embed_spec = HookSpec("embeddings.patch_embedding", "post", "grid")

    def __init__(self, model: nn.Module):
        self.model = model
        self.vision = self.root = self.encoder_owner = model.vision_model
        self.config = self.vision.config
        self.d_model = self.config.hidden_size
        self.n_heads = self.config.num_attention_heads
        side = self.config.image_size // self.config.patch_size
        self.grid = (side, side)
        self.image_size = (self.config.image_size, self.config.image_size)

    def embed(self, inputs: Tensor) -> tuple[Tensor, TowerState]:
        x = self.vision.pre_layrnorm(self.vision.embeddings(inputs))
        return x, TowerState(torch.zeros(x.shape[0], dtype=torch.long, device=x.device))

    def block(self, layer: int, x: Tensor, state: TowerState) -> Tensor:
        return _layer_output(self.vision.encoder.layers[layer](x, None))

    def pool(self, x: Tensor, state: TowerState) -> Tensor:
        return self.vision.post_layernorm(x[:, 0])

    def project(self, pooled: Tensor) -> Tensor:
        return self.model.visual_projection(pooled)


def towers_for(model: nn.Module) -> tuple[TowerAdapter, TowerAdapter]:
    return CLIPTextTower(model), CLIPVisionTower(model)
