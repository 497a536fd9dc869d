"""``HookedVLM``: one TransformerLens-style wrapper for every supported dual encoder.

The wrapped model is used as it is — its weights are never copied or converted. Hook
points are identity modules in a tree that mirrors the hook names
(``text.blocks.3.hook_resid_post`` is ``self.text.blocks[3].hook_resid_post``); PyTorch
hooks registered on the original submodules route their activations through them. So
``run_with_hooks``, ``run_with_cache`` and ``hooks()`` behave exactly as in TransformerLens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from .adapters.base import TowerAdapter, TowerState, attach
from .sites import BlockSite, Tower, TowerSite, hook_name
from .tokens import Tokenized


class _AttnPoints(nn.Module):
    def __init__(self):
        super().__init__()
        self.hook_z = HookPoint()
        self.hook_pattern = HookPoint()


class _BlockPoints(nn.Module):
    def __init__(self):
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        self.attn = _AttnPoints()

    def point(self, site: BlockSite) -> HookPoint:
        return self.get_submodule(site.suffix)


class _TowerPoints(nn.Module):
    def __init__(self, n_layers: int):
        super().__init__()
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(_BlockPoints() for _ in range(n_layers))
        self.hook_pooled = HookPoint()
        self.hook_proj = HookPoint()


class HookedVLM(HookedRootModule):
    """A dual encoder with TransformerLens hook points on both towers.

    Build it with :func:`negtrace.load`. ``forward(texts=..., images=...)`` returns the
    image–text logits (n_images, n_texts) when both are given, otherwise the embeddings of
    what was given, so ``run_with_cache(texts=[...])`` caches the text tower only.
    """

    def __init__(self, model: nn.Module, text: TowerAdapter, vision: TowerAdapter, tokenizer: Callable,
                 preprocess: Callable | None = None, name: str = "model",
                 logit_scale: Callable[[nn.Module], Tensor] | None = None):
        super().__init__()
        self.model = model
        self.adapters: dict[Tower, TowerAdapter] = {"text": text, "vision": vision}
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name_ = name
        self._logit_scale = logit_scale
        self.text = _TowerPoints(text.n_layers)
        self.vision = _TowerPoints(vision.n_layers)
        self._handles: list[Any] = []
        self._install()
        self.setup()

    # -- construction -------------------------------------------------------------------
    def setup(self) -> None:
        """Register hook points only (the wrapped model's modules are left untouched)."""
        self.mod_dict, self.hook_dict = {}, {}
        for tower in ("text", "vision"):
            for name, module in getattr(self, tower).named_modules(prefix=tower):
                if isinstance(module, HookPoint):
                    module.name = name
                    self.mod_dict[name] = module
                    self.hook_dict[name] = module

    def _install(self) -> None:
        for tower, adapter in self.adapters.items():
            points: _TowerPoints = getattr(self, tower)
            embed_module = adapter.root.get_submodule(adapter.embed_spec.path)
            self._handles.append(attach(embed_module, adapter.embed_spec, points.hook_embed, adapter.n_heads))
            for block, block_points in zip(adapter.blocks(), points.blocks, strict=True):
                for site, spec in adapter.block_table.items():
                    module = block.get_submodule(spec.path) if spec.path else block
                    self._handles.append(attach(module, spec, block_points.point(site), adapter.n_heads))
            adapter.install_heads(points.blocks)

    def __deepcopy__(self, memo: dict) -> HookedVLM:
        """A wrapper around a deep copy of the model, with its own hook points.

        The forward hooks on the wrapped modules close over this wrapper's hook points, so
        they are taken off while the model and its adapters are copied, and put back after."""
        self.unwrap()
        try:
            model, adapters = copy.deepcopy((self.model, self.adapters), memo)
        finally:
            self._install()
        return HookedVLM(model, adapters["text"], adapters["vision"], self.tokenizer, self.preprocess,
                         name=self.name_, logit_scale=self._logit_scale)

    def unwrap(self) -> nn.Module:
        """Remove every hook from the wrapped model and return it, as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for adapter in self.adapters.values():
            adapter.teardown()
        return self.model

    # -- facts ---------------------------------------------------------------------------
    def n_layers(self, tower: Tower = "text") -> int:
        return self.adapters[tower].n_layers

    def n_heads(self, tower: Tower = "text") -> int:
        return self.adapters[tower].n_heads

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> Tensor:
        """The contrastive temperature (exp of the model's log-scale, read at call time)."""
        if self._logit_scale is not None:
            return self._logit_scale(self.model)
        return torch.ones((), device=self.device)

    def hook_name(self, tower: Tower, site: BlockSite | TowerSite | str, layer: int | None = None) -> str:
        name = hook_name(tower, site, layer)
        if layer is not None and layer >= self.adapters[tower].n_layers:
            raise ValueError(f"{tower} tower has {self.adapters[tower].n_layers} layers; layer {layer} does not exist")
        return name

    # -- inputs --------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str], truncate: bool = False) -> Tokenized:
        """Token ids plus each token's string and character span (see :class:`Tokenized`)."""
        return self.tokenizer(texts, truncate=truncate).to(self.device)

    def _as_tokens(self, texts: str | Sequence[str] | Tokenized) -> Tokenized:
        if isinstance(texts, Tokenized):
            return texts.to(self.device)
        return self.tokenize(texts)

    def check_images(self, images: Tensor) -> Tensor:
        """Validate a batch of preprocessed images against the vision tower's input."""
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a tensor of shape (B, 3, H, W); got {type(images).__name__}. "
                            "Use model.preprocess(pil_image) for PIL images")
        if images.ndim == 3:
            images = images[None]
        expected = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != expected:
            raise ValueError(f"images must have shape (B, 3, {expected[0]}, {expected[1]}); got {tuple(images.shape)}. "
                             "Resize/convert with model.preprocess (grayscale radiographs are repeated to 3 channels)")
        if not torch.isfinite(images).all():
            bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(f"images contain NaN or inf (batch rows {bad})")
        return images.to(self.device, dtype=self._dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> tuple[int, int]:
        return self.adapters["vision"].image_size

    # -- running towers ------------------------------------------------------------------
    def embed(self, tower: Tower, inputs: Any) -> tuple[Tensor, TowerState]:
        """Tokens/images -> (residual stream entering block 0, state)."""
        return self.adapters[tower].embed(inputs)

    def run_blocks(self, tower: Tower, x: Tensor, state: TowerState, start: int = 0, stop: int | None = None) -> Tensor:
        """Run blocks ``start`` .. ``stop - 1`` on the residual stream ``x``."""
        adapter = self.adapters[tower]
        for layer in range(start, adapter.n_layers if stop is None else stop):
            x = adapter.block(layer, x, state)
        return x

    def finish(self, tower: Tower, x: Tensor, state: TowerState) -> Tensor:
        """Residual stream after the last block -> projected embedding (hooks pooled, proj)."""
        adapter = self.adapters[tower]
        points: _TowerPoints = getattr(self, tower)
        pooled = points.hook_pooled(adapter.pool(x, state))
        return points.hook_proj(adapter.project(pooled))

    def encode_text(self, texts: str | Sequence[str] | Tokenized, normalize: bool = False) -> Float[Tensor, "batch embed"]:
        tokens = self._as_tokens(texts)
        x, state = self.embed("text", tokens)
        out = self.finish("text", self.run_blocks("text", x, state), state)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_image(self, images: Float[Tensor, "batch 3 h w"], normalize: bool = False) -> Float[Tensor, "batch embed"]:
        images = self.check_images(images)
        x, state = self.embed("vision", images)
        out = self.finish("vision", self.run_blocks("vision", x, state), state)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def logits(self, images: Float[Tensor, "n_img 3 h w"] | None = None, texts: Sequence[str] | Tokenized | None = None,
               image_embeds: Tensor | None = None) -> Float[Tensor, "n_img n_text"]:
        """CLIP logits: logit_scale * cos(image, text), shape (n_images, n_texts)."""
        if image_embeds is None:
            if images is None:
                raise ValueError("pass images or image_embeds")
            image_embeds = self.encode_image(images)
        if texts is None:
            raise ValueError("pass texts")
        img = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(self.encode_text(texts).float(), dim=-1)
        return self.logit_scale.float() * img @ txt.T

    def forward(self, texts: Sequence[str] | Tokenized | None = None, images: Tensor | None = None) -> Tensor:
        if texts is None and images is None:
            raise ValueError("pass texts=..., images=..., or both")
        if texts is None:
            return self.encode_image(images)
        if images is None:
            return self.encode_text(texts)
        return self.logits(images, texts)

    # -- TransformerLens conveniences ----------------------------------------------------
    def nnsight(self):
        """An nnsight ``NNsight`` view of this wrapper (imported lazily: nnsight patches torch on import).

        Hook points are ordinary modules, so ``view.text.blocks[3].hook_resid_post.output``
        reads and writes the same activation as ``text.blocks.3.hook_resid_post``.
        """
        from nnsight import NNsight

        return NNsight(self)

    def __repr__(self) -> str:
        t, v = self.adapters["text"], self.adapters["vision"]
        return (f"HookedVLM({self.name_}: text {t.family} {t.n_layers}x{t.d_model} ({'causal' if t.causal else 'bidirectional'}), "
                f"vision {v.family} {v.n_layers}x{v.d_model})")
