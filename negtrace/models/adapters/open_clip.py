"""open_clip families: ``CLIP`` with native towers, ``CustomTextCLIP`` with a Hugging Face
text tower (BiomedCLIP: PubMedBERT) and a timm vision trunk.

Facts specific to open_clip, kept here and nowhere else:
- native towers run batch-first (open_clip >= 2.24) and use ``nn.MultiheadAttention``,
  whose fused kernel hides per-head values: see :class:`HookedMultiheadAttention`;
- the native text tower is causal and pools at EOT (largest token id, ``argmax``);
- ``ls_1``/``ls_2`` (LayerScale or Identity) emit exactly the attention/MLP addends;
- the HF text tower is bidirectional (BERT, post-LN) and pools CLS or a mean;
- the timm trunk exposes the softmax pattern through ``attn_drop`` when not fused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..attention import HookedMultiheadAttention
from ..sites import BlockSite
from ..tokens import Tokenized
from .base import HookSpec, TowerAdapter, TowerState
from .hf_clip import BERT_TABLE, HFAttentionMixin, bert_block, padding_mask

NATIVE_TABLE = {
    BlockSite.RESID_PRE: HookSpec("", "pre"),
    BlockSite.RESID_POST: HookSpec("", "post"),
    BlockSite.ATTN_OUT: HookSpec("ls_1"),
    BlockSite.MLP_OUT: HookSpec("ls_2"),
    # z and pattern come from HookedMultiheadAttention (installed in setup)
}

TIMM_TABLE = {
    BlockSite.RESID_PRE: HookSpec("", "pre"),
    BlockSite.RESID_POST: HookSpec("", "post"),
    BlockSite.ATTN_OUT: HookSpec("ls1"),
    BlockSite.MLP_OUT: HookSpec("ls2"),
    BlockSite.Z: HookSpec("attn.proj", "pre", "heads"),
    BlockSite.PATTERN: HookSpec("attn.attn_drop"),
}


class _NativeAttentionMixin:
    """Installs :class:`HookedMultiheadAttention` on every block's ``attn``."""

    def install_heads(self, block_points) -> None:
        self._mha = [HookedMultiheadAttention(blk.attn, pts.attn.hook_z, pts.attn.hook_pattern)
                     for blk, pts in zip(self.blocks(), block_points, strict=True)]
        for m in self._mha:
            m.install()

    def teardown(self) -> None:
        for m in getattr(self, "_mha", []):
            m.remove()


def _check_batch_first(transformer: nn.Module, what: str) -> None:
    if not getattr(transformer, "batch_first", True):
        raise NotImplementedError(f"{what}: sequence-first open_clip transformers (open_clip < 2.24) are not "
                                  "supported; rebuild the model with a current open_clip")


class NativeTextTower(_NativeAttentionMixin, TowerAdapter):
    tower = "text"
    family = "open_clip"
    causal = True
    block_table = NATIVE_TABLE
    embed_spec = HookSpec("token_embedding")

    def __init__(self, model: nn.Module):
        self.model = self.root = model
        self.transformer = model.transformer
        _check_batch_first(self.transformer, "text tower")
        self.d_model = self.transformer.width
        self.n_heads = self.transformer.resblocks[0].attn.num_heads

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.resblocks)

    def _pooled_index(self, ids: Tensor) -> Tensor:
        pool = getattr(self.model, "text_pool_type", "argmax")
        if pool == "argmax":
            return ids.argmax(dim=-1)
        if pool == "eos":
            return (ids == self.model.text_eos_id).int().argmax(dim=-1)
        if pool == "first":
            return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        if pool == "last":
            return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        raise NotImplementedError(f"text pool type {pool!r} is not supported")

    def embed(self, inputs: Tokenized) -> tuple[Tensor, TowerState]:
        ids = inputs.ids
        cast = self.transformer.get_cast_dtype()
        t = ids.shape[1]
        x = self.model.token_embedding(ids).to(cast) + self.model.positional_embedding[:t].to(cast)
        mask = self.model.attn_mask
        mask = None if mask is None else mask[:t, :t].to(cast)
        return x, TowerState(self._pooled_index(ids), mask)

    def block(self, layer: int, x: Tensor, state: TowerState) -> Tensor:
        return self.transformer.resblocks[layer](x, attn_mask=state.attn_mask)

    def pool(self, x: Tensor, state: TowerState) -> Tensor:
        x = self.model.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), state.pooled_index]

    def project(self, pooled: Tensor) -> Tensor:
        proj = self.model.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


class NativeVisionTower(_NativeAttentionMixin, TowerAdapter):
    tower = "vision"
    family = "open_clip"
    causal = False
    block_table = NATIVE_TABLE
    embed_spec = HookSpec("conv1", "post", "grid")

    def __init__(self, visual: nn.Module):
        self.visual = self.root = visual
        _check_batch_first(visual.transformer, "vision tower")
        if getattr(visual, "attn_pool", None) is not None:
            raise NotImplementedError("open_clip vision towers with attentional pooling (CoCa) are not supported yet")
        self.d_model = visual.transformer.width
        self.n_heads = visual.transformer.resblocks[0].attn.num_heads
        self.grid = tuple(visual.grid_size)
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def blocks(self) -> list[nn.Module]:
        return list(self.visual.transformer.resblocks)

    def embed(self, inputs: Tensor) -> tuple[Tensor, TowerState]:
        x = self.visual._embeds(inputs)
        pooled = 0 if self.visual.pool_type == "tok" else -1
        return x, TowerState(torch.full((x.shape[0],), pooled, dtype=torch.long, device=x.device))

    def block(self, layer: int, x: Tensor, state: TowerState) -> Tensor:
        return self.visual.transformer.resblocks[layer](x)

    def pool(self, x: Tensor, state: TowerState) -> Tensor:
        return self.visual._pool(x)[0]

    def project(self, pooled: Tensor) -> Tensor:
        return pooled if self.visual.proj is None else pooled @ self.visual.proj


class HFTextTower(HFAttentionMixin, TowerAdapter):
    """open_clip's ``HFTextEncoder`` around a BERT-family encoder (BiomedCLIP's PubMedBERT)."""

    tower = "text"
    family = "open_clip-hf"
    causal = False
    block_table = BERT_TABLE
    embed_spec = HookSpec("transformer.embeddings.word_embeddings")

    def __init__(self, text: nn.Module):
        self.text = self.root = text
        cfg = text.config
        if getattr(cfg, "is_decoder", False) or not hasattr(text.transformer, "encoder"):
            raise NotImplementedError(f"HF text tower of type {cfg.model_type!r} is not supported; "
                                      "negtrace supports BERT-family encoders")
        self.config = text.transformer.config
        self.d_model = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads

    def blocks(self) -> list[nn.Module]:
        return list(self.text.transformer.encoder.layer)

    def attention_modules(self) -> list[nn.Module]:
        return [blk.attention.self for blk in self.blocks()]

    def embed(self, inputs: Tokenized) -> tuple[Tensor, TowerState]:
        ids = inputs.ids
        keep = (ids != self.text.config.pad_token_id).long()
        x = self.text.transformer.embeddings(input_ids=ids)
        pooler = self.text.pooler
        pos = getattr(pooler, "cls_token_position", None)
        index = torch.full((ids.shape[0],), -1 if pos is None else pos, dtype=torch.long, device=ids.device)
        return x, TowerState(index, padding_mask(keep, x.dtype), {"keep": keep})

    def truncate(self, state: TowerState, length: int) -> TowerState:
        mask = state.attn_mask[..., :length]
        return TowerState(state.pooled_index, mask, {"keep": state.extra["keep"][:, :length]})

    def block(self, layer: int, x: Tensor, state: TowerState) -> Tensor:
        return bert_block(self.text.transformer.encoder.layer[layer], x, state.attn_mask)

    def pool(self, x: Tensor, state: TowerState) -> Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        return self.text.pooler(BaseModelOutput(last_hidden_state=x), state.extra["keep"])

    def project(self, pooled: Tensor) -> Tensor:
        return self.text.proj(pooled)


class TimmVisionTower(TowerAdapter):
    """open_clip's ``TimmModel`` around a timm ``VisionTransformer`` (BiomedCLIP's ViT-B/16)."""

    tower = "vision"
    family = "open_clip-timm"
    causal = False
    block_table = TIMM_TABLE
    embed_spec = HookSpec("trunk.patch_embed")

    def __init__(self, visual: nn.Module):
        self.visual = self.root = visual
        trunk = visual.trunk
        if not hasattr(trunk, "blocks") or not hasattr(trunk, "_pos_embed"):
            raise NotImplementedError(f"timm trunk {type(trunk).__name__} is not supported; negtrace supports "
                                      "timm VisionTransformer trunks")
        if getattr(trunk, "dynamic_img_size", False):  # patch_embed then returns (B, gh, gw, D)
            self.embed_spec = HookSpec("trunk.patch_embed", "post", "nhwc")
        self.trunk = trunk
        self.d_model = trunk.embed_dim
        self.n_heads = trunk.blocks[0].attn.num_heads
        self.grid = tuple(trunk.patch_embed.grid_size)
        self.image_size = tuple(trunk.patch_embed.img_size)  # open_clip does not pass image_size to timm
        self._handles: list[Any] = []

    def blocks(self) -> list[nn.Module]:
        return list(self.trunk.blocks)

    def install_heads(self, block_points) -> None:
        # timm materialises the pattern (and passes it through attn_drop) only when not fused.
        for blk, pts in zip(self.blocks(), block_points, strict=True):
            attn, point = blk.attn, pts.attn.hook_pattern
            fused = attn.fused_attn

            def toggle(mod, _args, point=point, fused=fused):
                mod.fused_attn = fused and not point.has_hooks()
            self._handles.append((attn, fused, attn.register_forward_pre_hook(toggle)))

    def teardown(self) -> None:
        for attn, fused, handle in self._handles:
            handle.remove()
            attn.fused_attn = fused
        self._handles = []

    def embed(self, inputs: Tensor) -> tuple[Tensor, TowerState]:
        t = self.trunk
        x = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(inputs))))
        pooled = 0 if t.global_pool == "token" else -1
        return x, TowerState(torch.full((x.shape[0],), pooled, dtype=torch.long, device=x.device))

    def block(self, layer: int, x: Tensor, state: TowerState) -> Tensor:
        return self.trunk.blocks[layer](x)

    def pool(self, x: Tensor, state: TowerState) -> Tensor:
        return self.trunk.forward_head(self.trunk.norm(x), pre_logits=False)

    def project(self, pooled: Tensor) -> Tensor:
        return self.visual.head(pooled)


def towers_for(model: nn.Module) -> tuple[TowerAdapter, TowerAdapter]:
    """The (text, vision) adapters for an open_clip model, or a clear error."""
    import open_clip

    text: TowerAdapter
    if isinstance(model, open_clip.CLIP):
        text = NativeTextTower(model)
    elif isinstance(model, open_clip.CustomTextCLIP):
        from open_clip.hf_model import HFTextEncoder

        if not isinstance(model.text, HFTextEncoder):
            text = NativeTextTower(_TextTransformerView(model.text))
        else:
            text = HFTextTower(model.text)
    else:
        raise TypeError(f"{type(model).__name__} is not an open_clip CLIP or CustomTextCLIP")

    visual = model.visual
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        vision: TowerAdapter = NativeVisionTower(visual)
    elif isinstance(visual, TimmModel):
        vision = TimmVisionTower(visual)
    else:
        raise NotImplementedError(f"vision tower {type(visual).__name__} is not supported yet (ResNet towers such "
                                  "as RN50 have no token positions to patch); use a ViT model")
    return text, vision


class _TextTransformerView(nn.Module):
    """Presents a ``CustomTextCLIP``'s native ``TextTransformer`` with the attribute names of
    ``CLIP`` so :class:`NativeTextTower` serves both."""

    def __init__(self, text: nn.Module):
        super().__init__()
        self.inner = text

    def __getattr__(self, name: str):
        if name == "inner":
            return super().__getattr__(name)
        inner = super().__getattr__("inner")
        aliases = {"text_pool_type": "pool_type", "text_eos_id": "eos_id"}
        return getattr(inner, aliases.get(name, name))
