"""The hook-name vocabulary: one typed constructor, no string parsing anywhere else.

Names follow TransformerLens so its users feel at home::

    text.blocks.3.hook_resid_post     vision.blocks.0.attn.hook_z     text.hook_pooled

Per-block sites and their shapes (B batch, T positions, D width, H heads, Dh head width):

==================  =========================  ===========================================
site                name suffix                shape
==================  =========================  ===========================================
``resid_pre``       ``hook_resid_pre``         (B, T, D)   input of block l
``resid_post``      ``hook_resid_post``        (B, T, D)   output of block l
``attn_out``        ``hook_attn_out``          (B, T, D)   attention's addend to the residual
``mlp_out``         ``hook_mlp_out``           (B, T, D)   MLP's addend to the residual
``z``               ``attn.hook_z``            (B, T, H, Dh) per-head values before W_O
``pattern``         ``attn.hook_pattern``      (B, H, T_query, T_key) softmax weights
==================  =========================  ===========================================

Per-tower sites: ``embed`` (B, T, D) token or patch embeddings before positions are added,
``pooled`` (B, D) the pooled state (EOT / CLS / mean) after the final norm, ``proj`` (B, E)
the projected embedding that the contrastive head compares.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args

Tower = Literal["text", "vision"]
TOWERS: tuple[Tower, ...] = get_args(Tower)


class BlockSite(StrEnum):
    RESID_PRE = "resid_pre"
    RESID_POST = "resid_post"
    ATTN_OUT = "attn_out"
    MLP_OUT = "mlp_out"
    Z = "z"
    PATTERN = "pattern"

    @property
    def suffix(self) -> str:
        return _BLOCK_SUFFIX[self]


class TowerSite(StrEnum):
    EMBED = "embed"
    POOLED = "pooled"
    PROJ = "proj"

    @property
    def suffix(self) -> str:
        return f"hook_{self.value}"


_BLOCK_SUFFIX = {
    BlockSite.RESID_PRE: "hook_resid_pre",
    BlockSite.RESID_POST: "hook_resid_post",
    BlockSite.ATTN_OUT: "hook_attn_out",
    BlockSite.MLP_OUT: "hook_mlp_out",
    BlockSite.Z: "attn.hook_z",
    BlockSite.PATTERN: "attn.hook_pattern",
}


def _check_tower(tower: str) -> Tower:
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")
    return tower  # type: ignore[return-value]


def hook_name(tower: Tower, site: BlockSite | TowerSite | str, layer: int | None = None) -> str:
    """Build a hook name.

    >>> hook_name("text", "resid_post", 3)
    'text.blocks.3.hook_resid_post'
    >>> hook_name("vision", "pooled")
    'vision.hook_pooled'
    """
    _check_tower(tower)
    if site in TowerSite._value2member_map_:
        if layer is not None:
            raise ValueError(f"site {site!r} belongs to the whole tower; do not pass a layer")
        return f"{tower}.{TowerSite(site).suffix}"
    if site in BlockSite._value2member_map_:
        if layer is None or layer < 0:
            raise ValueError(f"site {site!r} is per block; pass a layer index >= 0")
        return f"{tower}.blocks.{layer}.{BlockSite(site).suffix}"
    valid = [s.value for s in BlockSite] + [s.value for s in TowerSite]
    raise ValueError(f"unknown site {site!r}; valid sites are {valid}")


def all_hook_names(tower: Tower, n_layers: int) -> list[str]:
    """Every hook name of a tower with ``n_layers`` blocks, in forward order."""
    names = [hook_name(tower, TowerSite.EMBED)]
    for layer in range(n_layers):
        names += [hook_name(tower, site, layer) for site in BlockSite]
    names += [hook_name(tower, TowerSite.POOLED), hook_name(tower, TowerSite.PROJ)]
    return names
