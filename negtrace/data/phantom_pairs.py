"""Phantom tracing pairs: negated statements tied to phantom images where they are true.

The main job (`negtrace demo`) traces "there is no {finding}." against "there is a {finding}."
on freshly rendered phantoms in which the finding is absent (and the report says so), so the
clean, negated statement is the correct description of the image. Rendering is seeded, so the
pairs are the same on every machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..patching.result import _atomic
from .findings import FINDINGS
from .labels import read_labels
from .pairs import DEFAULT_TEMPLATES, build_tracing_pairs
from .phantom import build_phantom_dataset

# Findings rendered as large, unambiguous shapes, whose negation a radiologist states routinely.
DEMO_FINDINGS: tuple[str, ...] = ("Pleural Effusion", "Pneumothorax", "Cardiomegaly", "Consolidation", "Edema",
                                  "Fracture")


def write_phantom_pairs(folder: str | os.PathLike, tokenize, size: int, *, n_images: int = 48,
                        images_per_finding: int = 4, findings: Sequence[str] = DEMO_FINDINGS,
                        template_ids: Sequence[str] = ("there_is_no",), seed: int = 7,
                        progress: bool = True) -> Path:
    """Render ``n_images`` phantoms into ``folder`` and write ``folder/pairs.jsonl``.

    Each line holds ``clean``, ``corrupted``, ``image`` (relative to ``folder``), ``finding``
    and ``template_id``; pairs whose two sides tokenize to different lengths under ``tokenize``
    are left out. Returns the JSONL path.
    """
    for f in findings:
        if f not in FINDINGS:
            raise ValueError(f"unknown finding {f!r}; valid findings are: {', '.join(FINDINGS)}")
    templates = [t for t in DEFAULT_TEMPLATES if t.template_id in template_ids]
    if len(templates) != len(template_ids):
        known = ", ".join(t.template_id for t in DEFAULT_TEMPLATES)
        raise ValueError(f"unknown template id in {list(template_ids)}; known: {known}")
    root = Path(folder)
    build_phantom_dataset(root, 0, 0, n_images, size=size, seed=seed, progress=progress)
    table = read_labels(root / "labels_test.csv")
    pairs = build_tracing_pairs(findings, templates, tokenize=lambda text: tokenize([text]).tokens[0],
                                table=table, images_per_finding=images_per_finding, seed=seed)
    if not pairs.pairs:
        raise ValueError(f"no tracing pairs could be built ({pairs.stats}); render more images")
    lines = [json.dumps({"clean": p.clean, "corrupted": p.corrupted, "image": p.image_path, "finding": p.finding,
                         "template_id": p.template_id}) for p in pairs.pairs]
    path = root / "pairs.jsonl"
    _atomic(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return path
