"""What every adapter provides, and the generic glue that turns its tables into hooks.

An adapter describes one tower of one model family. Model-specific facts live in two
places only: a *table* (site -> where the activation is in a block: module path, whether
it is that module's input or output, and how to reshape it to the documented shape) and
a few *thin functions* that compose the tower from the model's own, unmodified modules
(``embed``, ``block``, ``pool``, ``project``). Everything else — hook registration, the
engine, fine-tuning groups — is generic and reads only these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..sites import BlockSite, Tower

Reshape = Literal["none", "heads", "grid", "nhwc"]


@dataclass(frozen=True)
class HookSpec:
    """Where a site lives: ``path`` relative to the block (or tower root for tower sites).

    ``when="post"`` hooks the module's output, ``"pre"`` its first positional input.
    ``index`` selects an element when the module returns a tuple. ``reshape="heads"`` views
    (B, T, H*Dh) as (B, T, H, Dh); ``"grid"`` views a conv map (B, D, gh, gw) as (B, gh*gw, D), ``"nhwc"`` a
    channels-last map (B, gh, gw, D) as (B, gh*gw, D).
    """

    path: str
    when: Literal["pre", "post"] = "post"
    reshape: Reshape = "none"
    index: int | None = None


@dataclass
class TowerState:
    """Per-batch facts a tower needs besides the residual stream (masks, ids, pooling)."""

    pooled_index: Tensor  # (B,) position whose state is pooled; -1 for mean pooling
    attn_mask: Tensor | None = None  # additive mask broadcastable to (B, H, T, T), or None
    extra: dict[str, Any] = field(default_factory=dict)


class TowerAdapter(ABC):
    """One tower (text or vision) of one model family."""

    tower: Tower
    family: str
    causal: bool  # True when position t cannot see positions > t
    d_model: int
    n_heads: int
    block_table: dict[BlockSite, HookSpec]
    embed_spec: HookSpec
    root: nn.Module  # the module that owns ``embed_spec.path`` and the blocks

    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @abstractmethod
    def blocks(self) -> list[nn.Module]: ...

    @abstractmethod
    def embed(self, inputs: Any) -> tuple[Tensor, TowerState]:
        """Inputs -> (residual stream entering block 0 (B, T, D), state)."""

    @abstractmethod
    def block(self, layer: int, x: Tensor, state: TowerState) -> Tensor:
        """Run block ``layer`` of the original model on (B, T, D)."""

    @abstractmethod
    def pool(self, x: Tensor, state: TowerState) -> Tensor:
        """Output of the last block (B, T, D) -> pooled state (B, D) (final norm included)."""

    @abstractmethod
    def project(self, pooled: Tensor) -> Tensor:
        """Pooled state (B, D) -> embedding compared by the contrastive head (B, E)."""

    def truncate(self, state: TowerState, length: int) -> TowerState:
        """State for the first ``length`` positions only (used when later ones cannot matter)."""
        mask = state.attn_mask
        if mask is not None:
            mask = mask[..., :length, :length]
        return TowerState(state.pooled_index, mask, dict(state.extra))

    def repeat(self, state: TowerState, index: Tensor) -> TowerState:
        """State for rows ``index`` of the batch (rows may repeat)."""
        mask = state.attn_mask
        if mask is not None and mask.ndim == 4 and mask.shape[0] > 1:  # per-example (B, 1, T, T) masks
            mask = mask[index]
        extra = {k: v[index] if isinstance(v, Tensor) and v.shape[:1] == state.pooled_index.shape else v
                 for k, v in state.extra.items()}
        return TowerState(state.pooled_index[index], mask, extra)

    def install_heads(self, block_points: Any) -> None:
        """Called once at wrap time to route per-head sites that no table entry reaches
        (fused attention); ``block_points[l].attn.hook_z`` / ``.hook_pattern`` are the targets."""
        return None

    def teardown(self) -> None:
        """Undo :meth:`install_heads`."""
        return None


def _to_site_shape(x: Tensor, reshape: Reshape, n_heads: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    if reshape == "none":
        return x, lambda y: y
    if reshape == "heads":
        shape = x.shape
        return x.reshape(*shape[:-1], n_heads, shape[-1] // n_heads), lambda y: y.reshape(shape)
    if reshape == "grid":
        b, d, gh, gw = x.shape
        return x.flatten(2).transpose(1, 2), lambda y: y.transpose(1, 2).reshape(b, d, gh, gw)
    if reshape == "nhwc":
        shape = x.shape
        return x.flatten(1, 2), lambda y: y.reshape(shape)
    raise ValueError(reshape)


def _checked(hook_point: nn.Module, value: Tensor) -> Tensor:
    out = hook_point(value)
    if not isinstance(out, Tensor) or out.shape != value.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"a hook on {hook_point.name} returned {got}; it must return a tensor of "
                         f"shape {tuple(value.shape)} (or None to leave the activation unchanged)")
    return out


def attach(module: nn.Module, spec: HookSpec, hook_point: nn.Module, n_heads: int) -> torch.utils.hooks.RemovableHandle:
    """Route ``module``'s input or output through ``hook_point`` as described by ``spec``.

    The hook's return value always replaces the activation (a hook that edits its input in
    place or returns a new tensor both take effect), so no edit is silently dropped.
    """
    if spec.when == "pre":
        def pre_hook(_mod, args, kwargs):
            if args:
                value, restore = _to_site_shape(args[0], spec.reshape, n_heads)
                return (restore(_checked(hook_point, value)), *args[1:]), kwargs
            name = next(iter(kwargs))  # modules called with keywords only (HF layers)
            value, restore = _to_site_shape(kwargs[name], spec.reshape, n_heads)
            return args, {**kwargs, name: restore(_checked(hook_point, value))}
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(_mod, _args, output):
        value = output if spec.index is None else output[spec.index]
        site_value, restore = _to_site_shape(value, spec.reshape, n_heads)
        new = restore(_checked(hook_point, site_value))
        if spec.index is None:
            return new
        return (*output[: spec.index], new, *output[spec.index + 1:])
    return module.register_forward_hook(post_hook)
