"""Causal tracing in the vision tower: restore clean patch states into a corrupted image run.

Positions follow the residual stream of a ViT with one class token: position 0 is CLS and
positions ``1 .. gh*gw`` are the patches in row-major order (patch ``(r, c)`` is position
``1 + r * gw + c``). The three supported families all produce this layout (open_clip's
native ``VisionTransformer``, a timm ``VisionTransformer`` trunk as in BiomedCLIP, and
transformers' ``CLIPVisionModel``); a tower with register tokens or without a class token
is refused with an error, as is open_clip's attentional pooling (refused by its adapter).

Corruptions (the text is fixed and encoded once):

* ``pair``: a second image of the same size (e.g. the same study with the finding removed);
* ``noise``: Gaussian noise on chosen patches' embeddings, added after the patch embedding
  (before the class token and position embeddings), ``S`` samples, one seeded generator per
  example; the noise std is ``noise_scale`` times the empirical std of that image's patch
  embeddings (ROME's recipe, Meng et al. 2022, §2.1, with image patches for subject tokens).

Vision towers are bidirectional, so every position of every layer row is measured; the
batched restoration itself is the tower-generic machinery of :mod:`negtrace.patching.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..models.hooked import HookedVLM
from ..models.sites import hook_name
from ..negation.corrupt import noise_tensor
from .metrics import Metric, unit
from .result import CTEResult

VISION_METRICS = ("logit", "margin", "cosine")
PatchSpec = Sequence[int] | Bool[Tensor, "gh gw"] | Sequence[Sequence[bool]] | None


def patch_grid_shape(model: HookedVLM) -> tuple[int, int]:
    """(gh, gw) patch grid of the model's vision tower, or a clear error."""
    adapter = model.adapters["vision"]
    grid = getattr(adapter, "grid", None)
    if grid is None:
        raise NotImplementedError(f"vision tower {adapter.family} does not expose a patch grid; vision tracing "
                                  "supports ViT towers (open_clip, timm, transformers CLIP)")
    return int(grid[0]), int(grid[1])


def position_labels(grid: tuple[int, int]) -> list[str]:
    """``["CLS", "p(0,0)", "p(0,1)", ...]``: one label per residual position (they double as roles)."""
    gh, gw = grid
    return ["CLS"] + [f"p({r},{c})" for r in range(gh) for c in range(gw)]


def patch_indices(patches: PatchSpec, grid: tuple[int, int]) -> list[int]:
    """Sorted 0-based patch indices (row-major) from a list of indices or a boolean (gh, gw) mask.

    ``None`` selects every patch. Position of patch ``k`` in the residual stream is ``k + 1``."""
    gh, gw = grid
    n = gh * gw
    if patches is None:
        return list(range(n))
    mask = torch.as_tensor(patches) if not isinstance(patches, Tensor) else patches
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != (gh, gw):
            raise ValueError(f"a boolean patches= mask must have the patch-grid shape ({gh}, {gw}); "
                             f"got {tuple(mask.shape)}")
        chosen = mask.flatten().nonzero().flatten().tolist()
    else:
        if mask.is_floating_point() or mask.ndim != 1:
            raise TypeError("patches= must be a list of integer patch indices (row-major, 0-based) or a "
                            f"boolean ({gh}, {gw}) mask; got {mask.dtype} of shape {tuple(mask.shape)}")
        chosen = sorted(set(mask.tolist()))
        bad = [k for k in chosen if not 0 <= k < n]
        if bad:
            raise ValueError(f"patch indices {bad} are out of range: the {gh}x{gw} grid has patches 0..{n - 1}")
    if not chosen:
        raise ValueError("patches= selects no patch; choose at least one patch to corrupt")
    return chosen


def differing_positions(clean: Float[Tensor, "b 3 h w"], corrupted: Float[Tensor, "b 3 h w"],
                        grid: tuple[int, int]) -> list[list[int]]:
    """Residual positions (1-based patches) whose pixels differ between the two images, per example."""
    gh, gw = grid
    b, _, h, w = clean.shape
    ph, pw = h // gh, w // gw  # pixels beyond gh*ph (if any) are not seen by the patch embedding
    diff = (clean != corrupted)[..., : gh * ph, : gw * pw].any(1).view(b, gh, ph, gw, pw).any(4).any(2)
    return [(row.flatten().nonzero().flatten() + 1).tolist() for row in diff.cpu()]


def _batch_images(model: HookedVLM, value, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        if model.preprocess is None:
            raise TypeError(f"{what} must be preprocessed tensors (B, 3, H, W) for this model")
        many = value if isinstance(value, (list, tuple)) else [value]
        value = torch.stack([model.preprocess(im) for im in many])
    try:
        return model.check_images(value)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def vision_images(model: HookedVLM, image, images, what: str) -> tuple[Tensor | None, bool]:
    """(batch (B, 3, H, W) or None, single) from ``image=`` (one) or ``images=`` (a batch)."""
    if image is not None and images is not None:
        raise ValueError(f"pass {what}= (one image) or {what}s= (a batch), not both")
    if image is None and images is None:
        return None, True
    if image is not None:
        batch = _batch_images(model, image, what)
        if batch.shape[0] != 1:
            raise ValueError(f"{what}= takes one image; got a batch of {batch.shape[0]}: pass {what}s= instead")
        return batch, True
    return _batch_images(model, images, f"{what}s"), False


def _broadcast(n: int, what: str, count: int) -> None:
    if count not in (1, n):
        raise ValueError(f"got {count} {what} for {n} examples; pass one, or one per example")


def _vision_metric(model: HookedVLM, name: str | None, texts: list[str] | None, foils: list[str] | None,
                   clean: Tensor) -> Metric:
    """Metric of a patched image embedding; the text side is encoded once here."""
    name = name or ("logit" if texts else "cosine")
    if name not in VISION_METRICS:
        raise ValueError(f"metric {name!r} is not available for the vision tower; choose one of {VISION_METRICS}")
    if name == "cosine":
        return Metric("cosine", unit(model.encode_image(clean)))
    if not texts:
        raise ValueError(f"metric {name!r} needs a text (the statement whose image-text logit is traced)")
    scale = float(model.logit_scale)
    txt = unit(model.encode_text(texts))
    if name == "logit":
        return Metric("logit", txt, scale)
    if foils is None:
        raise ValueError("metric='margin' needs foil= (one foil caption per example)")
    # logit(e, text) - logit(e, foil) = scale * <unit(e), unit(text) - unit(foil)>: linear in the image side
    return Metric("margin", txt - unit(model.encode_text(foils)), scale, offset=torch.zeros(len(texts),
                                                                                             device=txt.device))


def patch_embeddings(model: HookedVLM, images: Tensor) -> Float[Tensor, "b n d"]:
    """Patch embeddings (``vision.hook_embed``: after patch embedding, before CLS and positions)."""
    saved: dict[str, Tensor] = {}

    def save(x, hook):
        saved["x"] = x.detach()
    with model.hooks(fwd_hooks=[(hook_name("vision", "embed"), save)]):
        model.embed("vision", images)
    return saved["x"]


def patch_noise(model: HookedVLM, images: Tensor, patches: list[int], samples: int, noise_scale: float,
                noise_std: float | None, seeds: list[int]) -> Float[Tensor, "bs n d"]:
    """(B * S, gh*gw, D) noise on ``patches`` (row b*S + s); example b draws from ``Generator(seeds[b])``."""
    emb = patch_embeddings(model, images).float()
    out = []
    for b in range(emb.shape[0]):
        std = noise_std if noise_std is not None else noise_scale * float(emb[b].std())
        g = torch.Generator().manual_seed(int(seeds[b]))
        out.append(noise_tensor((1, *emb.shape[1:]), [patches], samples, std, g))
    return torch.cat(out).to(images.device)


def _result(values: Tensor, heads: Tensor | None, m_clean: float, m_corr: float, *, sites, grid, text, metric,
            corruption, corrupted_positions, window, min_denominator) -> CTEResult:
    denom = m_clean - m_corr
    flagged = not math.isfinite(denom) or abs(denom) < min_denominator
    nan = float("nan")
    values = torch.full_like(values, nan) if flagged else (values - m_corr) / denom
    if heads is not None:
        heads = torch.full_like(heads, nan) if flagged else (heads - m_corr) / denom
    labels = position_labels(grid)
    return CTEResult(values=values, sites=tuple(sites), labels=labels, tower="vision", metric=metric,
                     corruption=corruption, clean_metric=m_clean, corrupted_metric=m_corr, flagged=flagged,
                     text=text or "", corrupted_text="", cue_positions=corrupted_positions, roles=list(labels),
                     head_values=heads, window=window, grid=grid)


def vision_batch(model: HookedVLM, texts: list[str] | None, clean: Tensor, corrupted: Tensor | None, *,
                 corrupt: str, patches: list[int] | None, sites: Sequence[str], heads: bool, metric: str | None,
                 foils: list[str] | None, window: int, samples: int, noise_scale: float, noise_std: float | None,
                 seeds: list[int], min_denominator: float, memory_mb: float,
                 progress: bool | None) -> list[CTEResult]:
    """Trace one batch of B images (B texts or None, B foils or None); one result per image."""
    from .engine import _baselines, _measure_cells, _row_budget, _Sweep

    grid = patch_grid_shape(model)
    B, S = clean.shape[0], samples
    noise = None
    if corrupt == "noise":
        noise = patch_noise(model, clean, patches, S, noise_scale, noise_std, seeds)
        corrupted = clean.repeat_interleave(S, 0)
        moved = [[k + 1 for k in patches]] * B
    else:
        moved = differing_positions(clean, corrupted, grid)
    with torch.inference_mode():
        m = _vision_metric(model, metric, texts, foils, clean)
        T = 1 + grid[0] * grid[1]
        sw = _Sweep(model, "vision", clean, corrupted, S, noise, sites, heads, m,
                    _row_budget(model, "vision", T, memory_mb))
        if sw.clean_h[0].shape[1] != T:
            raise NotImplementedError(f"vision tracing needs exactly one class token before the {grid[0]}x{grid[1]} "
                                      f"patches; this tower has {sw.clean_h[0].shape[1]} positions "
                                      "(register tokens or no class token are not supported)")
        m_clean, m_corr = _baselines(sw)
        restored, head_metric = _measure_cells(sw, [list(range(T))] * B, T, sites=sites, heads=heads, window=window,
                                               progress=progress)
    return [_result(torch.stack([restored[s][b] for s in sites]), None if head_metric is None else head_metric[b],
                    float(m_clean[b]), float(m_corr[b]), sites=sites, grid=grid, text=texts[b] if texts else None,
                    metric=m.name, corruption=corrupt, corrupted_positions=moved[b], window=window,
                    min_denominator=min_denominator) for b in range(B)]


def patch_vision(model: HookedVLM, texts: list[str] | None, *, image, images, corrupted_image, corrupted_images,
                 corrupt: str, patches: PatchSpec, sites: Sequence[str], heads: bool, metric: str | None,
                 foils: list[str] | None, window: int, samples: int, noise_scale: float, noise_std: float | None,
                 seed: int | Sequence[int], min_denominator: float, batch_size: int, memory_mb: float,
                 progress: bool | None) -> CTEResult | list[CTEResult]:
    """Vision-tower entry point behind ``patch(..., tower="vision")`` (arguments already typed there)."""
    from .engine import _example_seeds

    clean, single = vision_images(model, image, images, "image")
    if clean is None:
        raise ValueError("tower='vision' needs image= (one image) or images= (a batch)")
    corr, _ = vision_images(model, corrupted_image, corrupted_images, "corrupted_image")
    if corrupt not in ("pair", "noise"):
        raise ValueError(f"corrupt={corrupt!r} is not available for the vision tower; use 'pair' (with "
                         "corrupted_image=) or 'noise' (with patches=)")
    if corrupt == "pair":
        if corr is None:
            raise ValueError("corrupt='pair' on the vision tower needs corrupted_image= (or corrupted_images=, one "
                             "per image); or use corrupt='noise' with patches=")
        if patches is not None:
            raise ValueError("patches= selects patches to noise; it only applies with corrupt='noise'")
    elif corr is not None:
        raise ValueError("corrupt='noise' builds the corrupted run from the clean image; drop corrupted_image=")
    n = max(clean.shape[0], len(texts or [None]))  # examples: one per image, or one per text
    _broadcast(n, "images", clean.shape[0])
    if texts is not None:
        _broadcast(n, "texts", len(texts))
        texts = texts * n if len(texts) == 1 else texts
    if foils is not None:
        _broadcast(n, "foils", len(foils))
        foils = foils * n if len(foils) == 1 else foils
    if corr is not None:
        _broadcast(n, "corrupted images", corr.shape[0])
        corr = corr.expand(n, *corr.shape[1:])
    clean = clean.expand(n, *clean.shape[1:])
    chosen = patch_indices(patches, patch_grid_shape(model)) if corrupt == "noise" else None
    seeds = _example_seeds(seed, n)
    results: list[CTEResult] = []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        results += vision_batch(model, texts[sl] if texts else None, clean[sl], corr[sl] if corr is not None else None,
                                corrupt=corrupt, patches=chosen, sites=sites, heads=heads, metric=metric,
                                foils=foils[sl] if foils else None, window=window,
                                samples=samples if corrupt == "noise" else 1, noise_scale=noise_scale,
                                noise_std=noise_std, seeds=seeds[sl], min_denominator=min_denominator,
                                memory_mb=memory_mb, progress=progress)
    return results[0] if single and n == 1 else results
