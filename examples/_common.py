"""Shared plumbing of the ``trace_*.py`` examples: tracing inputs, the sweep and the report.

This file is not an example by itself (``tests/test_examples.py`` runs every
``examples/*.py`` whose name does not start with ``_``). Each example only says how to get
its model; everything after that is the same for every model family:

1. tracing pairs: negated statements and their affirmative counterparts from negtrace's
   pair templates (``negtrace.data.pairs``), kept only if both sides have the same number of
   tokens under *this* model's tokenizer (patching needs aligned positions);
2. one image: a normal phantom chest radiograph (``negtrace.data.phantom``, no download),
   for which every negated statement is true, or ``--image PATH`` (PNG/JPEG/DICOM);
3. ``negtrace.patch`` over the residual stream, attention and MLP outputs of the text tower,
   then ``negtrace.aggregate`` (role-aligned mean with bootstrap CIs);
4. a printed summary (strongest layer per site), and files under ``--out``:
   ``heatmap.html`` (``heatmap.pdf`` with ``--pdf``), ``cte.safetensors`` + ``cte.json``
   (reload with ``negtrace.CTEResult.load(out / "cte")``) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

FINDINGS = ("Pleural Effusion", "Pneumothorax", "Consolidation", "Cardiomegaly")
TEMPLATES = ("there_is_no", "without")  # "there is no X." / "chest x-ray without X."


def parser(description: str, weights_help: str) -> argparse.ArgumentParser:
    """The command line every example shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help=weights_help)
    p.add_argument("--offline-random", action="store_true",
                   help="build the same architecture with random weights (no download; effects are not meaningful)")
    p.add_argument("--size", choices=["tiny", "base"], default="tiny",
                   help="with --offline-random: tiny (seconds on a CPU) or base (the published shapes)")
    p.add_argument("--image", default=None, help="image to trace against (default: a rendered normal phantom)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<example name>)")
    p.add_argument("--findings", nargs="+", default=list(FINDINGS), help="findings to build negated statements for")
    p.add_argument("--templates", nargs="+", default=list(TEMPLATES),
                   help="pair template ids from negtrace.data.pairs.DEFAULT_TEMPLATES (there_is_no, no_new, "
                        "no_evidence, without, is_absent, negative_for, not_seen)")
    p.add_argument("--corrupt", choices=["pair", "noise"], default="pair",
                   help="pair: affirmative counterpart; noise: Gaussian noise on the cue embeddings")
    p.add_argument("--samples", type=int, default=5, help="noise samples per example (--corrupt noise)")
    p.add_argument("--pdf", action="store_true", help="also write heatmap.pdf (needs Chrome/Chromium for kaleido)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    return p


def tracing_pairs(model, findings=FINDINGS, templates=TEMPLATES):
    """Negated / affirmative minimal pairs whose two sides tokenize to equal lengths."""
    from negtrace.data.pairs import DEFAULT_TEMPLATES, build_tracing_pairs

    chosen = [t for t in DEFAULT_TEMPLATES if t.template_id in templates]
    built = build_tracing_pairs(list(findings), chosen,
                                count_tokens=lambda text: int(model.tokenizer([text]).lengths[0]))
    if not built.pairs:
        raise SystemExit(f"no tracing pair survived this tokenizer: {built.stats}")
    return built.pairs, built.stats


def phantom_image(size: int = 224, seed: int = 0):
    """A normal frontal phantom radiograph (no findings) as an RGB PIL image."""
    from PIL import Image

    from negtrace.data.phantom import PhantomSpec, render

    gray = render(PhantomSpec(), size=max(32, size), seed=seed)
    return Image.fromarray(np.round(gray * 255).astype(np.uint8), mode="L").convert("RGB")


def _strongest(agg, site: str) -> dict:
    """Block with the largest mean CTE over roles, and the largest single cell.

    Row 0 (the embedding) is left out: restoring the clean cue embedding restores the whole
    input, so its CTE at the cue is 1 by construction and says nothing about processing.
    """
    per_layer = agg.per_layer(site, "mean").numpy()[1:]
    layer = 1 + int(np.argmax(np.where(np.isfinite(per_layer), per_layer, -np.inf)))
    grid = agg.site(site).numpy()[1:]
    top_layer, top_pos = np.unravel_index(int(np.argmax(np.where(np.isfinite(grid), grid, -np.inf))), grid.shape)
    return {"layer": layer, "mean_cte": float(per_layer[layer - 1]),
            "top_cell": {"layer": int(top_layer) + 1, "role": agg.labels[top_pos],
                         "cte": float(grid[top_layer, top_pos])}}


def _layer_name(layer: int) -> str:
    return "emb" if layer == 0 else f"block {layer}"


def trace(model, args, *, model_label: str, random_weights: bool) -> dict:
    """Steps 1-4 of the module docstring for an already-loaded ``model``; returns the summary."""
    import torch

    import negtrace as nt
    from negtrace.evaluate import load_image

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, pair_stats = tracing_pairs(model, args.findings, args.templates)
    pil = load_image(args.image) if args.image else phantom_image(model.image_size[0], args.seed)
    image = model.preprocess(pil)[None]

    started = time.perf_counter()
    kwargs = dict(corrupt="noise", samples=args.samples) if args.corrupt == "noise" else \
        dict(corrupted=[p.corrupted for p in pairs])
    results = nt.patch(model, clean=[p.clean for p in pairs], image=image, sites=("resid", "attn", "mlp"),
                       seed=args.seed, progress=False, **kwargs)
    agg = nt.aggregate(results)
    seconds = time.perf_counter() - started

    summary = {
        "model": model_label, "random_weights": random_weights, "corruption": args.corrupt,
        "image": args.image or f"phantom (normal, {pil.size[0]} px)", "n_pairs": len(pairs),
        "n_flagged": sum(r.flagged for r in results), "pairs_dropped": pair_stats["n_dropped"],
        "patch_seconds": round(seconds, 3),
        "mean_clean_logit": agg.clean_metric, "mean_corrupted_logit": agg.corrupted_metric,
        "strongest": {site: _strongest(agg, site) for site in agg.sites},
    }
    agg.save(out / "cte")
    fig = nt.heatmap(agg, title=f"{model_label}: causal tracing of negation "
                                f"({'random weights' if random_weights else 'trained weights'}, n={len(pairs)})")
    nt.save_figure(fig, out / "heatmap.html")
    if args.pdf:
        nt.save_figure(fig, out / "heatmap.pdf")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
    _print(summary, out)
    return summary


def _print(summary: dict, out: Path) -> None:
    warn = "  [random weights: the pipeline is real, the effects are not]" if summary["random_weights"] else ""
    print(f"model: {summary['model']}{warn}")
    print(f"traced {summary['n_pairs']} negated statements ({summary['n_flagged']} flagged for a tiny "
          f"denominator, {summary['pairs_dropped']} pairs dropped for unequal token counts) against "
          f"{summary['image']} in {summary['patch_seconds']:.1f} s")
    print(f"mean image-text logit: negated {summary['mean_clean_logit']:.3f}, "
          f"affirmative {summary['mean_corrupted_logit']:.3f}")
    print("strongest block per site (mean CTE over position roles; the embedding row is left out):")
    for site, s in summary["strongest"].items():
        top = s["top_cell"]
        mean = "n/a" if not math.isfinite(s["mean_cte"]) else f"{s['mean_cte']:.3f}"
        print(f"  {site:>5}: {_layer_name(s['layer']):>8} (mean CTE {mean}); "
              f"top cell {_layer_name(top['layer'])} / {top['role']}: {top['cte']:.3f}")
    print(f"wrote {out}/heatmap.html, cte.safetensors, cte.json, summary.json")


def default_out(args, name: str) -> None:
    if args.out is None:
        args.out = str(Path("runs") / name)
