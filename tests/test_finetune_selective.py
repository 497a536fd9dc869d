import math
import warnings

import pytest
import torch

from negtrace.finetune.data import Example
from negtrace.finetune.loop import selective_finetune
from negtrace.finetune.selective import (
    GradScalingWarning,
    make_optimizer,
    make_scheduler,
    param_groups,
    setup_training,
)
from negtrace.models.random_models import biomedclip_layout, hf_clip, tiny_open_clip

SCALES = {"text.blocks.0": 1.0, "text.blocks.1": 0.1, "text.blocks.2": 0.01}


def _examples(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["effusion", "pneumothorax", "edema", "cardiomegaly", "consolidation", "opacity", "fracture", "nodule"]
    return [Example(torch.randn(3, 32, 32, generator=g), f"there is no {words[i % 8]} {i}",
                    (f"there is a {words[i % 8]} {i}",), key=str(i)) for i in range(n)]


def _block_params(model, layer):
    return {n: p.detach().clone() for n, p in model.model.transformer.resblocks[layer].named_parameters()}


def _update_rms(model, before, layer):
    """RMS of the change of the block's effective weights (LoRA merged in: W + scaling * B A)."""
    from peft.tuners.lora import LoraLayer

    block = model.model.transformer.resblocks[layer]
    sq, n = 0.0, 0
    for module in block.modules():
        if isinstance(module, LoraLayer):
            delta = module.get_delta_weight("default")
            sq += float((delta.detach() ** 2).sum())
            n += delta.numel()
    if n:
        return math.sqrt(sq / n)
    for name, p in block.named_parameters():
        d = p.detach() - before[name]
        sq += float((d ** 2).sum())
        n += d.numel()
    return math.sqrt(sq / n)


def _run(method, optimizer="adamw", steps=3):
    model = tiny_open_clip(seed=0)
    before = {layer: _block_params(model, layer) for layer in range(3)}
    selective_finetune(model, SCALES, _examples(8), method=method, optimizer=optimizer, lr=1e-3, steps=steps,
                       batch_size=4, grad_clip=None, schedule="constant", progress=False, lora_r=4)
    return [_update_rms(model, before[layer], layer) for layer in range(3)]


def test_lr_and_lora_updates_follow_scales_but_grad_hooks_do_not_under_adamw():
    """MUST SHOW: AdamW with scales (1, 0.1, 0.01) on blocks 0-2."""
    for method in ("lr", "lora"):
        u = _run(method)
        ratios = [x / u[0] for x in u]
        assert u[0] > u[1] > u[2] > 0, (method, u)
        # roughly proportional: within a factor 2 of the scale ratios 0.1 and 0.01
        assert 0.05 < ratios[1] < 0.2 and 0.005 < ratios[2] < 0.02, (method, ratios)
    # gradient hooks under AdamW: Adam divides by the gradient RMS, so a constant factor cancels
    with pytest.warns(GradScalingWarning, match="Kingma & Ba"):
        u = _run("grad")
    ratios = [x / u[0] for x in u]
    assert min(ratios) > 0.5, ratios  # roughly equal updates, nowhere near 0.1 / 0.01


def test_grad_hooks_equal_lr_groups_under_sgd():
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradScalingWarning)  # SGD: no warning
        u_grad = _run("grad", optimizer="sgd", steps=2)
    u_lr = _run("lr", optimizer="sgd", steps=2)
    assert u_grad == pytest.approx(u_lr, rel=1e-4)  # SGD: lr * s * g == lr * (s * g)


def test_param_groups_lr_and_frozen_rest():
    model = tiny_open_clip(seed=0)
    groups = param_groups(model, SCALES, 2e-4)
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx({k: 2e-4 * s for k, s in SCALES.items()})
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.resblocks.{layer}.{n}" for layer in range(3)
                         for n, _ in model.model.transformer.resblocks[layer].named_parameters()}
    groups = param_groups(model, SCALES, 1.0, unscaled=0.5)
    assert {g["name"]: g["scale"] for g in groups}["vision.blocks.0"] == 0.5
    assert {g["name"]: g["scale"] for g in groups}["text.blocks.3"] == 0.5
    full = param_groups(model, "full", 1.0)
    assert sum(len(g["params"]) for g in full) == len(list(model.model.parameters()))


def test_scheduler_preserves_group_ratios():
    model = tiny_open_clip(seed=0)
    opt = make_optimizer(param_groups(model, SCALES, 1e-3), "adamw")
    sched = make_scheduler(opt, total_steps=10, warmup_steps=3, kind="cosine")
    seen = []
    for _ in range(10):
        lrs = [g["lr"] for g in opt.param_groups]
        assert [x / lrs[0] for x in lrs] == pytest.approx([1.0, 0.1, 0.01])
        seen.append(lrs[0])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-3 / 3) and max(seen) == pytest.approx(1e-3)  # warm-up then decay


@pytest.mark.parametrize("scales, match", [
    ({"text.blocks.9": 1.0}, "does not have|do not have|does not|this model does not"),
    ({"text.blocks.0": -0.5}, "finite and >= 0"),
    ({"text.blocks.0": float("nan")}, "finite and >= 0"),
    ("shuffled", "needs CTE scales"),
])
def test_bad_scales(tiny_clip, scales, match):
    with pytest.raises(ValueError, match=match):
        param_groups(tiny_clip, scales, 1e-3)


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan")])
def test_bad_learning_rate(tiny_clip, lr):
    with pytest.raises(ValueError, match="learning rate must be a positive"):
        param_groups(tiny_clip, SCALES, lr)


@pytest.mark.parametrize("family", ["open_clip", "biomedclip", "hf_clip"])
def test_lora_alpha_pattern_per_layer(tmp_path, family):
    from peft.tuners.lora import LoraLayer

    model = {"open_clip": lambda: tiny_open_clip(0), "biomedclip": lambda: biomedclip_layout(tmp_path / "b"),
             "hf_clip": lambda: hf_clip(tmp_path / "h")}[family]()
    scales = {"text.blocks.0": 1.0, "text.blocks.1": 0.25, "vision.blocks.1": 0.5}
    setup = setup_training(model, scales, 1e-3, method="lora", lora_r=4, lora_alpha=8.0)
    owner = {}
    for tower in ("text", "vision"):
        for layer, blk in enumerate(model.adapters[tower].blocks()):
            for m in blk.modules():
                owner[id(m)] = f"{tower}.blocks.{layer}"
    adapted = [m for m in model.model.modules() if isinstance(m, LoraLayer)]
    assert adapted
    by_group = {}
    for m in adapted:
        by_group.setdefault(owner[id(m)], set()).add(m.scaling["default"])
    assert by_group == {g: {8.0 * s / 4} for g, s in scales.items()}
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert setup.lora.targets and all(s in scales.values() for s in setup.lora.targets.values())
