"""Selective fine-tuning mechanisms: per-layer learning rates, per-layer LoRA, gradient hooks.

Why the learning rate is the default knob (NAST, Abbasi et al. 2026; DESIGN §6): Adam and
AdamW divide each coordinate's step by a running RMS of its gradient, so multiplying a
layer's gradient by a constant c leaves its step unchanged (Kingma & Ba 2014, §2.1: "the
magnitudes of parameter updates are invariant to rescaling of the gradient"). Scaling the
*learning rate* of the layer's parameter group scales its step by s_l under any optimizer.

Mechanisms (``method``):

``"lr"``    one optimizer group per parameter group (:mod:`negtrace.finetune.groups`) with
            ``lr = base_lr * s_l``. Schedulers must multiply every group by the same factor
            (``torch.optim.lr_scheduler.LambdaLR`` with one lambda, :func:`make_scheduler`), which
            preserves the ratios.
``"lora"``  peft LoRA adapters on the Linear layers whose ``forward`` runs inside each scaled
            block, with ``alpha_pattern`` = ``alpha * s_l`` per layer (and optionally
            ``rank_pattern``). Which Linear layers that is, measured by a probe forward:
              - open_clip native towers: ``mlp.c_fc``, ``mlp.c_proj`` only — ``nn.MultiheadAttention``
                keeps ``in_proj`` as a raw parameter and its fused kernel reads ``out_proj.weight``
                directly, so a LoRA wrapper on ``out_proj`` would be silently bypassed;
              - timm ViT (BiomedCLIP vision): ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``;
              - HF BERT (BiomedCLIP text): ``attention.self.{query,key,value}``, ``attention.output.dense``,
                ``intermediate.dense``, ``output.dense``;
              - transformers CLIPModel: ``self_attn.{q,k,v,out}_proj``, ``mlp.fc1``, ``mlp.fc2``.
            LoRA's weight change is ``(alpha / r) B A`` with ``B = 0`` at start, so under Adam the
            per-layer update grows in proportion to alpha: alpha is the LoRA analogue of the lr.
``"grad"``  every trainable group at ``base_lr`` and a gradient hook multiplying the gradient by
            s_l. Correct for SGD (step = lr * grad); under Adam/AdamW it is (nearly) a no-op,
            so it warns.

Groups without a scale follow ``unscaled``: ``"frozen"`` (default: ``requires_grad`` is
switched off and they are left out of the optimizer) or a number used as their scale.
A scale of 0 also freezes a group.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..models.hooked import HookedVLM
from .groups import parameter_groups
from .scales import LayerScales, check_scales

Method = Literal["lr", "lora", "grad"]
METHODS = ("lr", "lora", "grad")
OPTIMIZERS = ("adamw", "adam", "sgd")
SPECIAL_SCALES = ("uniform", "full", "frozen")
ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW)

__all__ = ["param_groups", "resolve_scales", "make_optimizer", "make_scheduler", "apply_grad_scaling",
           "lora_targets", "inject_lora", "merge_lora", "Setup", "setup_training"]


class GradScalingWarning(UserWarning):
    """method='grad' under an adaptive optimizer: the scaling has (almost) no effect."""


def _check_lr(base_lr: float) -> None:
    if not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr) or base_lr <= 0:
        raise ValueError(f"learning rate must be a positive finite number, got {base_lr!r}")


def resolve_scales(model: HookedVLM, scales: LayerScales | Mapping[str, float] | str, *,
                   towers: tuple[str, ...] = ("text",)) -> dict[str, float]:
    """Scales as a plain dict, checked against the model's groups.

    Strings: ``"uniform"`` = 1.0 on every block of ``towers``; ``"full"`` = 1.0 on every group
    of the model (full fine-tuning); ``"frozen"`` = {} (nothing trains).
    """
    groups = parameter_groups(model)
    if isinstance(scales, str):
        if scales == "uniform":
            return {g: 1.0 for g in groups if g.split(".")[0] in towers and ".blocks." in g}
        if scales == "full":
            return {g: 1.0 for g in groups}
        if scales == "frozen":
            return {}
        if scales == "shuffled":
            raise ValueError("scales='shuffled' needs CTE scales to shuffle: pass layer_scales(agg, "
                             "control='shuffled') or scales.shuffled(seed), or control='shuffled' with CTE scales")
        raise ValueError(f"unknown scales {scales!r}; pass a LayerScales/dict or one of {SPECIAL_SCALES}")
    if not isinstance(scales, Mapping):
        raise TypeError(f"scales must be a LayerScales, a dict or a string, got {type(scales).__name__}")
    scales = {str(k): v for k, v in scales.items()}
    check_scales(scales)
    unknown = sorted(set(scales) - set(groups))
    if unknown:
        raise ValueError(f"scales name groups this model does not have: {unknown}. {model.name_} has "
                         f"{model.n_layers('text')} text and {model.n_layers('vision')} vision blocks; its groups are "
                         f"{_summarise(list(groups))}")
    return {k: float(v) for k, v in scales.items()}


def _summarise(names: list[str]) -> str:
    return ", ".join(names[:4] + ["..."] + names[-4:]) if len(names) > 10 else ", ".join(names)


def _group_scales(model: HookedVLM, scales, unscaled: str | float, towers) -> tuple[dict, dict[str, float]]:
    if unscaled != "frozen" and not (isinstance(unscaled, (int, float)) and math.isfinite(unscaled) and unscaled >= 0):
        raise ValueError(f"unscaled must be 'frozen' or a finite number >= 0, got {unscaled!r}")
    resolved = resolve_scales(model, scales, towers=towers)
    groups = parameter_groups(model)
    final = {}
    for name in groups:
        s = resolved.get(name, 0.0 if unscaled == "frozen" else float(unscaled))
        final[name] = s
    return groups, final


def param_groups(model: HookedVLM, scales: LayerScales | Mapping[str, float] | str, base_lr: float, *,
                 unscaled: str | float = "frozen", weight_decay: float = 0.0, method: Method = "lr",
                 towers: tuple[str, ...] = ("text",)) -> list[dict]:
    """Optimizer parameter groups, ready for ``torch.optim.AdamW(groups)``.

    One dict per parameter group with a positive scale: ``params``, ``lr`` (``base_lr * s``
    for ``method="lr"``, ``base_lr`` for ``"grad"``), ``weight_decay``, plus ``name`` and
    ``scale`` (ignored by torch, kept for logs). Parameters of groups with scale 0 — or no
    scale, with ``unscaled="frozen"`` — get ``requires_grad=False``.
    """
    _check_lr(base_lr)
    if method not in ("lr", "grad"):
        raise ValueError(f"param_groups builds groups for method 'lr' or 'grad', got {method!r} "
                         "(LoRA groups come from inject_lora)")
    groups, final = _group_scales(model, scales, unscaled, towers)
    out = []
    for name, members in groups.items():
        s = final[name]
        for _, p in members:
            p.requires_grad_(s > 0)
        if s > 0:
            out.append({"params": [p for _, p in members], "lr": base_lr * (s if method == "lr" else 1.0),
                        "weight_decay": weight_decay, "name": name, "scale": s})
    return out


def make_optimizer(groups: list[dict], optimizer: str = "adamw", **kwargs) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over ``groups`` (extra keyword arguments go to the optimizer)."""
    if not groups:
        raise ValueError("nothing to train: every group is frozen (scale 0 or unscaled='frozen' with no scale)")
    name = optimizer.lower()
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {OPTIMIZERS}")
    return cls(groups, lr=groups[0]["lr"], **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                   kind: Literal["constant", "linear", "cosine"] = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """One multiplier for all groups (so per-group lr ratios are preserved at every step)."""
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {kind!r}; use 'constant', 'linear' or 'cosine'")
    total, warm = max(1, int(total_steps)), max(0, int(warmup_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_grad_scaling(groups: list[dict], optimizer: torch.optim.Optimizer | str) -> list:
    """Register ``grad * scale`` hooks on every parameter of ``groups``; returns the handles.

    Warns under Adam/AdamW: their steps are invariant to a constant gradient factor
    (Kingma & Ba 2014, §2.1), so the scales would have (almost) no effect — only epsilon
    and weight decay break the invariance. Use method='lr' (or 'lora') with adaptive optimizers.
    """
    is_adaptive = isinstance(optimizer, ADAPTIVE) or (isinstance(optimizer, str)
                                                      and optimizer.lower() in ("adam", "adamw"))
    if is_adaptive:
        warnings.warn("method='grad' scales gradients, but Adam/AdamW normalise each step by the gradient's running "
                      "RMS, so a constant per-layer gradient factor leaves the updates (almost) unchanged "
                      "(Kingma & Ba 2014, §2.1). Use method='lr' (per-group learning rates) or method='lora', or "
                      "optimizer='sgd' with method='grad'.", GradScalingWarning, stacklevel=3)
    handles = []
    for g in groups:
        s = float(g["scale"])
        if s != 1.0:
            for p in g["params"]:
                handles.append(p.register_hook(lambda grad, s=s: grad * s))
    return handles


# -- LoRA ------------------------------------------------------------------------------------

def _called_linears(model: HookedVLM, tower: str) -> dict[int, list[str]]:
    """Per block: names (relative to the block) of nn.Linear modules whose forward runs."""
    from .groups import _probe_inputs

    adapter = model.adapters[tower]
    called: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, *_: called.add(id(mod)))
               for blk in adapter.blocks() for m in blk.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            x, state = adapter.embed(_probe_inputs(model, tower))
            for layer in range(adapter.n_layers):
                x = adapter.block(layer, x, state)
    finally:
        for h in handles:
            h.remove()
    return {layer: [n for n, m in blk.named_modules() if isinstance(m, nn.Linear) and id(m) in called]
            for layer, blk in enumerate(adapter.blocks())}


def lora_targets(model: HookedVLM, scales: Mapping[str, float]) -> dict[str, float]:
    """Full module name in ``model.model`` -> scale, for every called Linear of each scaled block."""
    full_name = {id(m): n for n, m in model.model.named_modules()}
    out: dict[str, float] = {}
    for tower in ("text", "vision"):
        wanted = {int(k.split(".")[2]): s for k, s in scales.items() if k.startswith(f"{tower}.blocks.") and s > 0}
        if not wanted:
            continue
        blocks = model.adapters[tower].blocks()
        for layer, names in _called_linears(model, tower).items():
            if layer in wanted:
                for n in names:
                    out[full_name[id(blocks[layer].get_submodule(n))]] = wanted[layer]
    return out


def _anchored(name: str) -> str:
    # peft matches pattern keys with re.match(r"(.*\.)?(key)$"): the lookbehind forbids any prefix,
    # so "transformer.resblocks.1.mlp.c_fc" cannot also match "visual.transformer.resblocks.1.mlp.c_fc".
    return r"(?<![\s\S])" + re.escape(name)


@dataclass
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    scale_rank: bool = False  # also rank_pattern: r_l = max(1, round(r * s_l))
    targets: dict[str, float] = field(default_factory=dict)


def inject_lora(model: HookedVLM, scales: Mapping[str, float], r: int = 8, alpha: float = 16.0,
                dropout: float = 0.0, scale_rank: bool = False) -> LoraSpec:
    """Freeze the model and add peft LoRA adapters (in place) to each scaled block's Linear layers.

    ``lora_alpha = alpha`` with ``alpha_pattern[module] = alpha * s_l`` (and, with ``scale_rank``,
    ``rank_pattern[module] = max(1, round(r * s_l))``). Checks afterwards that every adapted
    module got exactly its intended scaling ``alpha_l / r_l``.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    if not (isinstance(r, int) and r > 0):
        raise ValueError(f"LoRA rank must be a positive integer, got {r!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    targets = lora_targets(model, scales)
    if not targets:
        raise ValueError("no LoRA targets: no block group has a positive scale (LoRA adapts blocks only)")
    ranks = {n: (max(1, round(r * s)) if scale_rank else r) for n, s in targets.items()}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules="^(?:" + "|".join(re.escape(n) for n in targets) + ")$",
                        alpha_pattern={_anchored(n): alpha * s for n, s in targets.items()},
                        rank_pattern={_anchored(n): ranks[n] for n in targets} if scale_rank else {})
    for p in model.model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, model.model)
    modules = dict(model.model.named_modules())
    for n, s in targets.items():
        layer = modules.get(n)
        if not isinstance(layer, LoraLayer):
            raise RuntimeError(f"peft did not adapt {n}")
        want = alpha * s / ranks[n]
        got = layer.scaling["default"]
        if not math.isclose(got, want, rel_tol=1e-6) or layer.r["default"] != ranks[n]:
            raise RuntimeError(f"peft gave {n} scaling {got} / rank {layer.r['default']}, expected {want} / {ranks[n]}")
    return LoraSpec(r, alpha, dropout, scale_rank, targets)


def merge_lora(model: HookedVLM) -> HookedVLM:
    """Fold every LoRA adapter into its base Linear and put the base Linear back (in place).

    The base Linear is the original module object, so negtrace hooks registered on it keep
    working; before merging, a hook on an adapted Linear would see the base output only.
    """
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.model.get_submodule(parent) if parent else model.model, child, module.base_layer)
    return model


# -- everything a loop needs -----------------------------------------------------------------

@dataclass
class Setup:
    """What :func:`setup_training` built: the optimizer, its groups, the final per-group scales."""

    optimizer: torch.optim.Optimizer
    method: str
    scales: dict[str, float]
    groups: list[dict]
    lora: LoraSpec | None = None
    handles: list = field(default_factory=list)


def setup_training(model: HookedVLM, scales, base_lr: float, *, method: Method = "lr", optimizer: str = "adamw",
                   unscaled: str | float = "frozen", weight_decay: float = 0.0, towers: tuple[str, ...] = ("text",),
                   lora_r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0, lora_scale_rank: bool = False,
                   optimizer_kwargs: dict | None = None) -> Setup:
    """Build the optimizer (and adapters / hooks) for ``method``; see the module docstring."""
    _check_lr(base_lr)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {OPTIMIZERS}")
    kwargs = dict(optimizer_kwargs or {})
    if method == "lora":
        _, final = _group_scales(model, scales, unscaled, towers)
        spec = inject_lora(model, final, lora_r, lora_alpha, lora_dropout, lora_scale_rank)
        params = [p for n, p in model.model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        groups = [{"params": params, "lr": base_lr, "weight_decay": weight_decay, "name": "lora", "scale": 1.0}]
        setup = Setup(make_optimizer(groups, optimizer, **kwargs), method, final, groups, lora=spec)
    else:
        groups = param_groups(model, scales, base_lr, unscaled=unscaled, weight_decay=weight_decay, method=method,
                              towers=towers)
        opt = make_optimizer(groups, optimizer, **kwargs)
        handles = apply_grad_scaling(groups, opt) if method == "grad" else []
        setup = Setup(opt, method, {g["name"]: g["scale"] for g in groups}, groups, handles=handles)
    return setup
