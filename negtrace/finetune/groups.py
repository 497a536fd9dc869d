"""Per-layer parameter groups for both towers, derived from the adapters (no name patterns).

Every named parameter of the wrapped model lands in exactly one group:

    ``{tower}.blocks.{l}``  parameters of ``adapter.blocks()[l]`` (l is 0-based, as in hook names)
    ``{tower}.embed``       parameters ``adapter.embed`` uses (token/patch/position embeddings,
                            class token, pre-norm, BERT's embedding LayerNorm)
    ``{tower}.final``       parameters ``adapter.pool`` / ``adapter.project`` use (final norm,
                            pooler, projection)
    ``logit_scale``         the contrastive temperature (and ``logit_bias`` where present)
    ``other``               anything no tower function touches (unused heads, buffers-as-parameters)

Embed and final membership is *measured*, not guessed: one tiny forward through the
adapter's own ``embed`` (resp. ``pool`` + ``project``) and ``torch.autograd.grad`` with
``allow_unused=True`` says which parameters it depends on. So the same code serves open_clip
CLIP, BiomedCLIP's CustomTextCLIP (HF BERT + timm) and transformers CLIPModel, and any
future adapter. A parameter found by both towers (tied weights) goes to the first: text.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..models.hooked import HookedVLM

TOWERS = ("text", "vision")
HEAD_NAMES = ("logit_scale", "logit_bias")

__all__ = ["parameter_groups", "group_names", "TOWERS"]


def _used(params: list[nn.Parameter], output: torch.Tensor) -> list[nn.Parameter]:
    grads = torch.autograd.grad(output.float().sum(), params, allow_unused=True)
    return [p for p, g in zip(params, grads, strict=True) if g is not None]


def _probe_inputs(model: HookedVLM, tower: str):
    if tower == "text":
        return model.tokenize(["there is no pleural effusion."])
    h, w = model.image_size
    return torch.zeros(1, 3, h, w, device=model.device, dtype=next(model.model.parameters()).dtype)


def parameter_groups(model: HookedVLM) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Group name -> [(parameter name in ``model.model``, parameter)], covering every parameter once.

    Order: text.embed, text.blocks.0.., text.final, vision.embed, vision.blocks.0..,
    vision.final, logit_scale, other (empty groups omitted).
    """
    if not isinstance(model, HookedVLM):
        raise TypeError(f"parameter_groups needs a negtrace HookedVLM (negtrace.load / negtrace.wrap), "
                        f"got {type(model).__name__}")
    named = list(model.model.named_parameters())
    name_of = {id(p): n for n, p in named}
    owner: dict[int, str] = {}

    def claim(group: str, params: Iterable[nn.Parameter]) -> None:
        for p in params:
            owner.setdefault(id(p), group)

    all_params = [p for _, p in named]
    flags = [p.requires_grad for p in all_params]
    was_training = model.model.training
    try:
        for p in all_params:  # probe frozen parameters too: membership must not depend on requires_grad
            p.requires_grad_(True)
        model.model.eval()
        with torch.enable_grad():
            for tower in TOWERS:
                adapter = model.adapters[tower]
                x, state = adapter.embed(_probe_inputs(model, tower))
                claim(f"{tower}.embed", _used(all_params, x))
                for layer, block in enumerate(adapter.blocks()):
                    claim(f"{tower}.blocks.{layer}", block.parameters())
                x = x.detach().requires_grad_(True)
                out = adapter.project(adapter.pool(x, state))
                claim(f"{tower}.final", _used(all_params, out))
    finally:
        for p, f in zip(all_params, flags, strict=True):
            p.requires_grad_(f)
        model.model.train(was_training)
    for n, p in named:
        if n.split(".")[-1] in HEAD_NAMES:
            claim("logit_scale", [p])
        claim("other", [p])
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name in group_names(model) + ["logit_scale", "other"]:
        members = [(name_of[id(p)], p) for _, p in named if owner[id(p)] == name]
        if members:
            groups[name] = members
    return groups


def group_names(model: HookedVLM) -> list[str]:
    """Tower group names in forward order (embed, blocks, final for text, then vision)."""
    return [name for tower in TOWERS for name in
            [f"{tower}.embed", *(f"{tower}.blocks.{i}" for i in range(model.n_layers(tower))), f"{tower}.final"]]
