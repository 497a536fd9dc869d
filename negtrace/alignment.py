"""General image-text alignment checks: zero-shot finding AUC and image-report retrieval.

Zero-shot classification follows CheXzero (Tiu et al., Nat. Biomed. Eng. 2022): each finding
is scored by the softmax over a positive prompt ("{finding}.") and a negative one
("no {finding}."), and ranked against the labels by ROC AUC. Retrieval is recall@k of the
paired report among all reports of the split (and the reverse).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .data.findings import FINDINGS

POSITIVE_TEMPLATE = "{}."
NEGATIVE_TEMPLATE = "no {}."


def roc_auc(scores: Float[np.ndarray, " n"], labels: Bool[np.ndarray, " n"]) -> float:
    """ROC AUC by the Mann-Whitney U statistic (ties count one half); NaN if one class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    bounds = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(scores)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def prompt_pair(finding: str) -> tuple[str, str]:
    name = finding.lower()
    return POSITIVE_TEMPLATE.format(name), NEGATIVE_TEMPLATE.format(name)


@torch.inference_mode()
def zero_shot_auc(model, image_embeddings: Float[Tensor, "n d"], present: Bool[np.ndarray, "n f"],
                  findings: Sequence[str] = FINDINGS, mode: str = "pair") -> dict[str, float]:
    """Per-finding zero-shot AUC; ``present[i, j]`` says whether image i shows ``findings[j]``.

    ``mode="pair"`` scores by the softmax over "{finding}." vs "no {finding}." (CheXzero), which
    needs the model to read the negation; ``mode="positive"`` scores by the similarity to
    "{finding}." alone, which does not. ``image_embeddings`` are unit-normalised image
    embeddings. Findings without both positive and negative images get NaN (left out of the mean).
    """
    if mode not in ("pair", "positive"):
        raise ValueError(f"mode must be 'pair' or 'positive', got {mode!r}")
    present = np.asarray(present, dtype=bool)
    if present.shape != (image_embeddings.shape[0], len(findings)):
        raise ValueError(f"present must have shape ({image_embeddings.shape[0]}, {len(findings)}); "
                         f"got {present.shape}")
    prompts = [p for f in findings for p in prompt_pair(f)]
    text = model.encode_text(prompts, normalize=True).float().view(len(findings), 2, -1)
    img = image_embeddings.float().to(text.device)
    logits = torch.einsum("nd,fkd->nfk", img, text)
    score = logits.softmax(-1)[..., 0] if mode == "pair" else logits[..., 0]
    p_pos = score.cpu().numpy()
    out = {f: roc_auc(p_pos[:, j], present[:, j]) for j, f in enumerate(findings)}
    valid = [v for v in out.values() if v == v]
    out["mean"] = float(np.mean(valid)) if valid else float("nan")
    return out


def retrieval_recall(image_embeddings: Float[Tensor, "n d"], text_embeddings: Float[Tensor, "n d"],
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k of the paired item: image i's report is text i (unit-normalised embeddings)."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"need one report per image; got {tuple(image_embeddings.shape)} images and "
                         f"{tuple(text_embeddings.shape)} reports")
    sims = image_embeddings.float() @ text_embeddings.float().T
    target = torch.arange(sims.shape[0], device=sims.device)
    out: dict[str, float] = {}
    for direction, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        # rank of the true pair = number of candidates scoring strictly higher
        true = s[target, target]
        rank = (s > true[:, None]).sum(1)
        for k in ks:
            out[f"{direction}_R@{k}"] = float((rank < k).float().mean())
    return out


def summarize_auc(aucs: Mapping[str, float]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in aucs.items())
