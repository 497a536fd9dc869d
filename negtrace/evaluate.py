"""Evaluate a dual-encoder on the negation benchmarks: polarity MCQ and contextual claims.

Scores are cosine similarities between L2-normalised image and text embeddings.

Polarity MCQ (NAST, Abbasi et al. 2026; MCQ format after NegBench, Alhamoud et al. 2025):
an item is answered correctly when the true option's score is strictly higher than every
other option's (ties count as wrong, so a constant model scores 0, not 25%). Accuracy is
reported on the negated and the affirmative wording of the same items, with their gap
(affirmative minus negated; NAST reports 21.6% before and 4.2% after its fine-tuning),
per finding and per negation pattern.

Contextual claims: retrieval recall@k ranks the target among all candidates (a tie with a
distractor counts against the target); claim ranking is the share of (target, variant)
pairs where the target scores higher, pooled over pairs, plus the share of items where
the target beats every variant.

Confidence intervals are percentile bootstraps over items (pairs of one item stay
together), from a seeded ``numpy`` Generator, vectorised in chunks.

Models are duck-typed: ``encode_text(list[str]) -> (n, d)``, ``encode_image((n, 3, h, w))
-> (n, d)`` and ``preprocess(PIL image) -> (3, h, w)``; image embeddings may be passed
precomputed instead (keyed by study id).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from negtrace.data.findings import FINDINGS
from negtrace.data.schema import ContextualItem, PolarityItem, read_records

__all__ = [
    "DualEncoder",
    "ImageResolver",
    "load_image",
    "encode_texts",
    "encode_images",
    "image_embeddings_for",
    "bootstrap_ci",
    "polarity_correct",
    "polarity_metrics",
    "evaluate_polarity",
    "contextual_metrics",
    "evaluate_contextual",
    "polarity_figure",
    "contextual_figure",
    "save_results",
    "configure_eval",
    "run_eval",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")


class DualEncoder(Protocol):
    def encode_text(self, texts: list[str]) -> Float[Tensor, "n d"]: ...
    def encode_image(self, images: Float[Tensor, "n 3 h w"]) -> Float[Tensor, "n d"]: ...
    def preprocess(self, image: Image.Image) -> Float[Tensor, "3 h w"]: ...


# -- images --------------------------------------------------------------------------------

def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB PIL image from a JPEG/PNG, or from a DICOM file when pydicom is installed."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return _load_dicom(path)
    with Image.open(path) as img:
        return img.convert("RGB")


def _load_dicom(path: Path) -> Image.Image:
    try:
        import pydicom
    except ImportError:
        raise ImportError(f"{path} is a DICOM file; install pydicom (pip install 'negtrace[real-data]') "
                          "or convert the images to PNG/JPEG") from None
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim == 3 and pixels.shape[-1] != 3:
        pixels = pixels[0]  # multi-frame: first frame
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1 stores bright air; flip to the usual look
    low, high = np.percentile(pixels, [0.5, 99.5])
    scaled = np.clip((pixels - low) / max(high - low, 1e-6), 0, 1) * 255
    return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")


class ImageResolver:
    """Finds a record's image file under ``root``.

    * A record with an ``image_path`` (CheXpert ``Path`` column) is looked up as
      ``root/image_path``, then with leading folders dropped one at a time, so ``root`` may
      be the folder above ``CheXpert-v1.0-small`` or that folder itself.
    * A MIMIC-CXR record (subject and study id only) is looked up in MIMIC-CXR-JPG's layout,
      ``root/[files/]p{subject[:2]}/p{subject}/s{study}/``; the first image file by name is
      used (MIMIC's label file does not say which image is frontal).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")

    def candidates(self, image_path: str | None, study_id: str, subject_id: str | None) -> list[Path]:
        if image_path:
            parts = Path(image_path).parts
            return [self.root.joinpath(*parts[k:]) for k in range(len(parts))]
        if subject_id:
            subject, study = subject_id.lstrip("p"), study_id.lstrip("s")
            rel = Path(f"p{subject[:2]}", f"p{subject}", f"s{study}")
            return [self.root / "files" / rel, self.root / rel]
        return [self.root / study_id]

    def __call__(self, image_path: str | None, study_id: str, subject_id: str | None = None) -> Path:
        tried = self.candidates(image_path, study_id, subject_id)
        for candidate in tried:
            if candidate.is_file():
                return candidate
            if candidate.is_dir():
                files = sorted(p for p in candidate.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                if files:
                    return files[0]
        raise FileNotFoundError(f"no image for study {study_id!r}; tried {', '.join(map(str, tried[:3]))}")


# -- encoding ------------------------------------------------------------------------------

def _device(model: Any) -> torch.device | None:
    device = getattr(model, "device", None)
    return torch.device(device) if isinstance(device, str | torch.device) else None


def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return range(0, n, batch_size)


def encode_texts(model: DualEncoder, texts: Sequence[str], batch_size: int = 256,
                 progress: bool = True) -> Float[Tensor, "n d"]:
    """L2-normalised float32 CPU embeddings of ``texts``, encoded in batches."""
    texts = list(texts)
    out = []
    with torch.inference_mode():
        for start in tqdm(_batches(len(texts), batch_size), desc="texts", disable=not progress):
            emb = model.encode_text(texts[start:start + batch_size])
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


ImageLike = Image.Image | Tensor | str | os.PathLike


def encode_images(model: DualEncoder, images: Sequence[ImageLike], batch_size: int = 32,
                  progress: bool = True) -> Float[Tensor, "n d"]:
    """L2-normalised float32 CPU embeddings of images given as PIL images, preprocessed
    (3, h, w) tensors or file paths; PIL images and paths go through ``model.preprocess``."""
    images = list(images)
    device = _device(model)
    out = []
    with torch.inference_mode():
        for start in tqdm(_batches(len(images), batch_size), desc="images", disable=not progress):
            batch = torch.stack([_as_tensor(model, x) for x in images[start:start + batch_size]])
            if device is not None:
                batch = batch.to(device)
            emb = model.encode_image(batch)
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def _as_tensor(model: DualEncoder, image: ImageLike) -> Tensor:
    if isinstance(image, Tensor):
        return image
    if isinstance(image, str | os.PathLike):
        image = load_image(image)
    preprocess = getattr(model, "preprocess", None)
    if preprocess is None:
        raise ValueError("the model has no preprocess(); pass preprocessed tensors or image embeddings")
    return preprocess(image)


def image_embeddings_for(model: DualEncoder, records: Sequence[PolarityItem | ContextualItem], *,
                         image_root: str | os.PathLike | None = None,
                         images: Mapping[str, ImageLike] | None = None,
                         image_embeddings: Mapping[str, Tensor] | None = None,
                         batch_size: int = 32, progress: bool = True) -> Float[Tensor, "n d"]:
    """One normalised embedding per record, in record order.

    Per study id, the embedding comes from ``image_embeddings``, else the image from
    ``images`` (PIL, tensor or path; e.g. the phantom world's renders), else the file found
    under ``image_root``. Every missing image is reported before anything is encoded.
    """
    studies = list(dict.fromkeys(r.study_id for r in records))
    given = dict(image_embeddings or {})
    sources: dict[str, ImageLike] = {}
    missing: list[str] = []
    resolver = ImageResolver(image_root) if image_root is not None else None
    first = {r.study_id: r for r in reversed(records)}
    for study in studies:
        if study in given:
            continue
        if images is not None and study in images:
            sources[study] = images[study]
        elif resolver is not None:
            record = first[study]
            try:
                sources[study] = resolver(record.image_path, study, record.subject_id)
            except FileNotFoundError as e:
                missing.append(str(e))
        else:
            missing.append(f"no image or embedding for study {study!r}")
    if missing:
        where = f" under {image_root}" if image_root is not None else " (pass image_root, images or image_embeddings)"
        raise FileNotFoundError(f"{len(missing)} of {len(studies)} studies have no image{where}: "
                                + "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if sources:
        encoded = encode_images(model, list(sources.values()), batch_size, progress)
        given.update(zip(sources, encoded, strict=True))
    table = {s: torch.nn.functional.normalize(torch.as_tensor(given[s]).float().flatten(), dim=0) for s in studies}
    return torch.stack([table[r.study_id] for r in records])


def _text_table(model: DualEncoder, texts: Sequence[str], batch_size: int, progress: bool) -> dict[str, Tensor]:
    unique = list(dict.fromkeys(texts))
    return dict(zip(unique, encode_texts(model, unique, batch_size, progress), strict=True))


# -- statistics ----------------------------------------------------------------------------

def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the (weighted) mean of each column of ``values`` (n, k).

    Rows are resampled together, so columns of one item stay paired (e.g. negated and
    affirmative correctness for the gap). Returns (low, high), each of shape (k,).
    """
    values = np.asarray(values, dtype=np.float64)
    squeeze = values.ndim == 1
    values = values.reshape(len(values), -1)
    n, k = values.shape
    if n == 0:
        nan = np.full(k, np.nan)
        return (nan[0], nan[0]) if squeeze else (nan, nan)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    stats = np.empty((n_boot, k))
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        ws = w[idx]
        total = ws.sum(axis=1, keepdims=True)
        stats[start:start + len(idx)] = np.einsum("bn,bnk->bk", ws, values[idx]) / np.where(total == 0, 1, total)
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return (low[0], high[0]) if squeeze else (low, high)


def _summary(value: float, low: float, high: float, n: int) -> dict[str, Any]:
    return {"value": float(value), "ci": [float(low), float(high)], "n": int(n)}


# -- polarity ------------------------------------------------------------------------------

def polarity_correct(scores: Float[np.ndarray, "n 4"], answers: np.ndarray) -> np.ndarray:
    """Boolean per item: the answer's score is strictly above every other option's."""
    scores = np.asarray(scores, dtype=np.float64)
    answers = np.asarray(answers)
    rows = np.arange(len(scores))
    others = scores.copy()
    others[rows, answers] = -np.inf
    return scores[rows, answers] > others.max(axis=1)


def _neg_aff_gap(correct_neg: np.ndarray, correct_aff: np.ndarray, n_boot: int, seed: int,
                 alpha: float) -> dict[str, Any]:
    cols = np.stack([correct_neg, correct_aff, correct_aff.astype(float) - correct_neg], axis=1).astype(float)
    low, high = bootstrap_ci(cols, n_boot, seed, alpha)
    means = cols.mean(axis=0) if len(cols) else np.full(3, np.nan)
    n = len(cols)
    return {"accuracy_negated": _summary(means[0], low[0], high[0], n),
            "accuracy_affirmative": _summary(means[1], low[1], high[1], n),
            "gap": _summary(means[2], low[2], high[2], n)}


def polarity_metrics(scores_negated: Float[np.ndarray, "n 4"], scores_affirmative: Float[np.ndarray, "n 4"],
                     items: Sequence[PolarityItem], n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> dict[str, Any]:
    """Accuracies, gap and breakdowns from option scores (rows aligned with ``items``)."""
    answers = np.array([item.answer for item in items])
    neg = polarity_correct(scores_negated, answers)
    aff = polarity_correct(scores_affirmative, answers)
    result: dict[str, Any] = {"task": "polarity", "n_items": len(items), "chance": 0.25,
                              **_neg_aff_gap(neg, aff, n_boot, seed, alpha)}
    per_finding = {}
    for finding in FINDINGS:
        mask = np.array([finding in item.findings for item in items], dtype=bool)
        if mask.any():
            per_finding[finding] = _neg_aff_gap(neg[mask], aff[mask], n_boot, seed, alpha)
    patterns = np.array([item.pattern for item in items])
    per_pattern = {p: _neg_aff_gap(neg[patterns == p], aff[patterns == p], n_boot, seed, alpha)
                   for p in sorted(set(patterns.tolist()))}
    result.update(per_finding=per_finding, per_pattern=per_pattern,
                  bootstrap={"n_boot": n_boot, "seed": seed, "alpha": alpha, "unit": "item"})
    return result


def evaluate_polarity(model: DualEncoder, items: Sequence[PolarityItem], *,
                      image_root: str | os.PathLike | None = None,
                      images: Mapping[str, ImageLike] | None = None,
                      image_embeddings: Mapping[str, Tensor] | None = None,
                      text_batch_size: int = 256, image_batch_size: int = 32, n_boot: int = 1000,
                      seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Score every option of every item against the item's image; see :func:`polarity_metrics`."""
    items = list(items)
    if not items:
        raise ValueError("no polarity items to evaluate")
    img = image_embeddings_for(model, items, image_root=image_root, images=images,
                               image_embeddings=image_embeddings, batch_size=image_batch_size, progress=progress)
    texts = [t for item in items for t in (*item.options_negated, *item.options_affirmative)]
    table = _text_table(model, texts, text_batch_size, progress)
    neg = torch.stack([torch.stack([table[t] for t in item.options_negated]) for item in items])
    aff = torch.stack([torch.stack([table[t] for t in item.options_affirmative]) for item in items])
    scores_neg = torch.einsum("nd,nkd->nk", img, neg).numpy()
    scores_aff = torch.einsum("nd,nkd->nk", img, aff).numpy()
    return polarity_metrics(scores_neg, scores_aff, items, n_boot, seed)


# -- contextual ----------------------------------------------------------------------------

def _claim_kind(claim) -> str:
    return f"{claim.negation_scope}/{'present' if claim.present else 'absent'}"


def contextual_metrics(candidate_scores: Sequence[np.ndarray], items: Sequence[ContextualItem],
                       ks: Sequence[int] = (1, 5), n_boot: int = 1000, seed: int = 0,
                       alpha: float = 0.05) -> dict[str, Any]:
    """Recall@k and claim-ranking accuracy from per-item candidate scores (target first)."""
    n = len(items)
    width = max(len(s) for s in candidate_scores)
    scores = np.full((n, width), -np.inf)
    variant = np.zeros((n, width), dtype=bool)
    for i, (s, item) in enumerate(zip(candidate_scores, items, strict=True)):
        if len(s) != len(item.candidates):
            raise ValueError(f"item {item.item_id}: {len(s)} scores for {len(item.candidates)} candidates")
        scores[i, :len(s)] = s
        variant[i, 1:len(s)] = [d.finding == item.target.finding for d in item.distractors]
    target = scores[:, :1]
    rank = 1 + (scores[:, 1:] >= target).sum(axis=1)  # ties rank the target below the distractor
    result: dict[str, Any] = {"task": "contextual", "n_items": n,
                              "mean_candidates": float(np.mean([len(s) for s in candidate_scores]))}
    recall_cols = np.stack([rank <= k for k in ks], axis=1).astype(float)
    low, high = bootstrap_ci(recall_cols, n_boot, seed, alpha)
    result["retrieval"] = {f"recall@{k}": _summary(recall_cols[:, j].mean(), low[j], high[j], n)
                           for j, k in enumerate(ks)}
    wins = (target > scores) & variant
    n_variants = variant.sum(axis=1)
    result["ranking"] = _ranking(wins, variant, n_variants, n_boot, seed, alpha)

    by_target: dict[str, Any] = {}
    kinds = np.array([_claim_kind(item.target) for item in items])
    for kind in sorted(set(kinds.tolist())):
        m = kinds == kind
        lo, hi = bootstrap_ci(recall_cols[m], n_boot, seed, alpha)
        by_target[kind] = {"retrieval": {f"recall@{k}": _summary(recall_cols[m, j].mean(), lo[j], hi[j], m.sum())
                                         for j, k in enumerate(ks)},
                           "ranking": _ranking(wins[m], variant[m], n_variants[m], n_boot, seed, alpha)}
    by_variant: dict[str, Any] = {}
    variant_kinds = np.full((n, width), "", dtype=object)
    for i, item in enumerate(items):
        variant_kinds[i, 1:len(item.candidates)] = [_claim_kind(d) for d in item.distractors]
    for kind in sorted({k for k in variant_kinds[variant].tolist()}):
        m = variant & (variant_kinds == kind)
        rows = m.any(axis=1)
        by_variant[kind] = _ranking(wins[rows] & m[rows], m[rows], m[rows].sum(axis=1), n_boot, seed, alpha)
    result.update(per_target_kind=by_target, per_variant_kind=by_variant,
                  bootstrap={"n_boot": n_boot, "seed": seed, "alpha": alpha, "unit": "item"})
    return result


def _ranking(wins: np.ndarray, variant: np.ndarray, n_variants: np.ndarray, n_boot: int, seed: int,
             alpha: float) -> dict[str, Any]:
    keep = n_variants > 0
    wins, n_variants = wins[keep], n_variants[keep]
    n_wins = wins.sum(axis=1)
    per_item = n_wins / np.maximum(n_variants, 1)
    pooled = n_wins.sum() / max(n_variants.sum(), 1)
    low, high = bootstrap_ci(per_item, n_boot, seed, alpha, weights=n_variants)
    all_won = (n_wins == n_variants).astype(float)
    low_all, high_all = bootstrap_ci(all_won, n_boot, seed, alpha)
    return {"pair_accuracy": {**_summary(pooled, low, high, len(per_item)), "n_pairs": int(n_variants.sum())},
            "item_accuracy": _summary(all_won.mean() if len(all_won) else np.nan, low_all, high_all, len(all_won))}


def evaluate_contextual(model: DualEncoder, items: Sequence[ContextualItem], *,
                        image_root: str | os.PathLike | None = None,
                        images: Mapping[str, ImageLike] | None = None,
                        image_embeddings: Mapping[str, Tensor] | None = None,
                        ks: Sequence[int] = (1, 5), text_batch_size: int = 256, image_batch_size: int = 32,
                        n_boot: int = 1000, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Retrieval and claim ranking for contextual items; see :func:`contextual_metrics`."""
    items = list(items)
    if not items:
        raise ValueError("no contextual items to evaluate")
    img = image_embeddings_for(model, items, image_root=image_root, images=images,
                               image_embeddings=image_embeddings, batch_size=image_batch_size, progress=progress)
    table = _text_table(model, [c.text for item in items for c in item.candidates], text_batch_size, progress)
    scores = [(torch.stack([table[c.text] for c in item.candidates]) @ img[i]).numpy()
              for i, item in enumerate(items)]
    return contextual_metrics(scores, items, ks, n_boot, seed)


# -- reporting -----------------------------------------------------------------------------

def _bar(go, name: str, labels: list[str], entries: list[dict[str, Any]], color: str):
    values = [e["value"] for e in entries]
    return go.Bar(name=name, x=labels, y=values, marker_color=color,
                  error_y=dict(type="data", symmetric=False,
                               array=[e["ci"][1] - e["value"] for e in entries],
                               arrayminus=[e["value"] - e["ci"][0] for e in entries]))


def polarity_figure(result: Mapping[str, Any], title: str = "Polarity MCQ accuracy"):
    """Grouped bars of negated vs affirmative accuracy: overall, per finding, per pattern."""
    import plotly.graph_objects as go

    groups = [("all items", result)] + [(f, r) for f, r in result["per_finding"].items()] + \
             [(f"pattern: {p}", r) for p, r in result["per_pattern"].items()]
    labels = [f"{name} (n={r['accuracy_negated']['n']})" for name, r in groups]
    fig = go.Figure([
        _bar(go, "negated wording", labels, [r["accuracy_negated"] for _, r in groups], "#d62728"),
        _bar(go, "affirmative wording", labels, [r["accuracy_affirmative"] for _, r in groups], "#1f77b4"),
    ])
    gap = result["gap"]
    fig.update_layout(barmode="group", yaxis=dict(title="accuracy", range=[0, 1]), xaxis_tickangle=-40,
                      title=f"{title}: gap (affirmative - negated) = {gap['value']:.3f} "
                            f"[{gap['ci'][0]:.3f}, {gap['ci'][1]:.3f}]")
    fig.add_hline(y=result.get("chance", 0.25), line_dash="dot", annotation_text="chance")
    return fig


def contextual_figure(result: Mapping[str, Any], title: str = "Contextual claims"):
    """Bars of recall@k and ranking accuracy, overall and per target / variant kind."""
    import plotly.graph_objects as go

    entries = [(k, v) for k, v in result["retrieval"].items()]
    entries.append(("ranking: pairs", result["ranking"]["pair_accuracy"]))
    entries.append(("ranking: items", result["ranking"]["item_accuracy"]))
    entries += [(f"vs {kind}", r["pair_accuracy"]) for kind, r in result["per_variant_kind"].items()]
    fig = go.Figure([_bar(go, "score", [f"{k} (n={v['n']})" for k, v in entries], [v for _, v in entries],
                          "#2ca02c")])
    fig.update_layout(yaxis=dict(title="rate", range=[0, 1]), xaxis_tickangle=-40,
                      title=f"{title} (mean {result['mean_candidates']:.1f} candidates per image)")
    return fig


def save_results(result: Mapping[str, Any], out_dir: str | os.PathLike, figure=None) -> dict[str, Path]:
    """Write ``results.json`` (and ``figure.html``, self-contained) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json"}
    tmp = paths["results"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, paths["results"])
    if figure is not None:
        paths["figure"] = out / "figure.html"
        figure.write_html(paths["figure"], include_plotlyjs=True)
    return paths


def _json_safe(obj: Any) -> Any:
    """Non-finite floats (an empty breakdown's NaN) become null, keeping the file strict JSON."""
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# -- command line --------------------------------------------------------------------------

def configure_eval(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``negtrace eval``."""
    parser.add_argument("--model", required=True, help="model spec understood by negtrace.load")
    parser.add_argument("--benchmark", required=True, type=Path,
                        help="a polarity or contextual JSONL written by 'negtrace build'")
    parser.add_argument("--images", type=Path, help="folder the benchmark's image paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and figure.html")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items")
    parser.add_argument("--text-batch-size", type=int, default=256)
    parser.add_argument("--image-batch-size", type=int, default=32)
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--device", help="device for the model (default: negtrace.load's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_eval(args: argparse.Namespace) -> int:
    """Run ``negtrace eval``; returns the process exit code."""
    try:
        kind, records = read_records(args.benchmark)
    except (OSError, ValueError) as e:
        print(f"negtrace eval: {e}", file=sys.stderr)
        return 2
    evaluators: dict[str, tuple[Callable, Callable]] = {
        "polarity": (evaluate_polarity, polarity_figure),
        "contextual": (evaluate_contextual, contextual_figure),
    }
    if kind not in evaluators:
        print(f"negtrace eval: {args.benchmark} holds {kind!r} records; eval scores polarity or contextual "
              "benchmarks", file=sys.stderr)
        return 2
    if args.limit is not None:
        records = records[:args.limit]
    from negtrace import load  # imported here: loading models pulls in heavy dependencies

    model = load(args.model, **({"device": args.device} if args.device else {}))
    evaluate, figure = evaluators[kind]
    try:
        result = evaluate(model, records, image_root=args.images, text_batch_size=args.text_batch_size,
                          image_batch_size=args.image_batch_size, n_boot=args.n_boot, seed=args.seed,
                          progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"negtrace eval: {e}", file=sys.stderr)
        return 2
    result = {"model": args.model, "benchmark": str(args.benchmark), **result}
    paths = save_results(result, args.out, figure(result, title=f"{args.model}: {kind}"))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
