"""Minimal pairs for causal tracing of negation, checked against a tokenizer.

A pair is a negated statement (the *clean* run) and its affirmative counterpart (the
*corrupted* run) that differ only in the negation cue ("there is no effusion." /
"there is a effusion."), as in the causal tracing of NAST (Abbasi et al. 2026). Patching
activations between the two runs needs equal token counts, so every pair is tokenized and
kept only if both sides have the same length; the rest are reported with the reason.

The builder is tokenizer-agnostic: pass ``count_tokens(text) -> int`` or
``tokenize(text) -> sequence``. With a label table, pairs are tied to images in which the
finding is labelled absent, so the clean (negated) statement is the true one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from negtrace.data.findings import ABSENT, FINDINGS, check_finding
from negtrace.data.labels import LabelTable
from negtrace.data.schema import TracingPair

__all__ = [
    "PairTemplate",
    "DEFAULT_TEMPLATES",
    "PAIR_NAMES",
    "DroppedPair",
    "PairSet",
    "whitespace_count",
    "build_tracing_pairs",
]


@dataclass(frozen=True)
class PairTemplate:
    """``text`` holds ``{cue}`` and ``{finding}``; the clean text uses ``cue``, the corrupted one ``counterpart``."""

    template_id: str
    text: str
    cue: str
    counterpart: str

    def __post_init__(self) -> None:
        if self.text.count("{cue}") != 1 or self.text.count("{finding}") != 1:
            raise ValueError(f"template {self.template_id!r} needs exactly one {{cue}} and one {{finding}}: {self.text!r}")
        if self.cue == self.counterpart or not self.cue:
            raise ValueError(f"template {self.template_id!r}: cue and counterpart must differ and be non-empty")

    def render(self, finding_phrase: str) -> tuple[str, str, tuple[int, int]]:
        """(clean, corrupted, cue span in clean)."""
        before, after = self.text.split("{cue}")
        prefix = before.replace("{finding}", finding_phrase)
        suffix = after.replace("{finding}", finding_phrase)
        start = len(prefix)
        return prefix + self.cue + suffix, prefix + self.counterpart + suffix, (start, start + len(self.cue))


DEFAULT_TEMPLATES: tuple[PairTemplate, ...] = (
    PairTemplate("there_is_no", "there is {cue} {finding}.", "no", "a"),
    PairTemplate("no_new", "{cue} {finding}.", "no", "new"),
    PairTemplate("no_evidence", "{cue} evidence of {finding}.", "no", "clear"),
    PairTemplate("without", "chest x-ray {cue} {finding}.", "without", "with"),
    PairTemplate("is_absent", "{finding} is {cue}.", "absent", "present"),
    PairTemplate("negative_for", "{cue} for {finding}.", "negative", "positive"),
    PairTemplate("not_seen", "{finding} is {cue} seen.", "not", "clearly"),
)

# Singular, article-friendly finding names for templates.
PAIR_NAMES: dict[str, str] = {
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung opacity",
    "Lung Lesion": "lung lesion",
    "Edema": "pulmonary edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "pleural abnormality",
    "Fracture": "fracture",
    "Support Devices": "support device",
}


@dataclass(frozen=True)
class DroppedPair:
    template_id: str
    finding: str
    reason: str


@dataclass
class PairSet:
    pairs: list[TracingPair]
    dropped: list[DroppedPair] = field(default_factory=list)

    @property
    def stats(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for d in self.dropped:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
        return {"n_pairs": len(self.pairs), "n_dropped": len(self.dropped), "dropped_by_reason": reasons}


def whitespace_count(text: str) -> int:
    """A stand-in tokenizer: the number of whitespace-separated words."""
    return len(text.split())


def _counter(count_tokens: Callable[[str], int] | None, tokenize: Callable[[str], Sequence] | None):
    if count_tokens is not None and tokenize is not None:
        raise ValueError("pass count_tokens or tokenize, not both")
    if tokenize is not None:
        return lambda text: len(tokenize(text))
    return count_tokens or whitespace_count


def _absent_images(table: LabelTable, finding: str, n: int, rng: np.random.Generator) -> list[int]:
    rows = np.flatnonzero(table.findings[:, FINDINGS.index(finding)] == ABSENT)
    if rows.size > n:
        rows = np.sort(rng.choice(rows, size=n, replace=False))
    return rows.tolist()


def build_tracing_pairs(
    findings: Sequence[str] | None = None,
    templates: Sequence[PairTemplate] = DEFAULT_TEMPLATES,
    *,
    count_tokens: Callable[[str], int] | None = None,
    tokenize: Callable[[str], Sequence] | None = None,
    names: dict[str, str] | None = None,
    table: LabelTable | None = None,
    images_per_finding: int = 0,
    seed: int = 0,
) -> PairSet:
    """Make (clean negated, corrupted affirmative) pairs for every finding x template.

    Pairs whose two sides tokenize to different lengths are dropped and listed in
    ``PairSet.dropped`` with the two counts. With ``table`` and ``images_per_finding > 0``,
    each kept pair is repeated for up to that many studies where the finding is absent
    (seeded draw), carrying the study's image path.
    """
    findings = list(FINDINGS if findings is None else findings)
    for f in findings:
        check_finding(f)
    names = {**PAIR_NAMES, **(names or {})}
    count = _counter(count_tokens, tokenize)
    if images_per_finding and table is None:
        raise ValueError("images_per_finding needs a label table")
    rng = np.random.default_rng(seed)

    texts: list[tuple[str, PairTemplate, str, str, tuple[int, int], int]] = []
    dropped: list[DroppedPair] = []
    for finding in findings:
        for template in templates:
            clean, corrupted, span = template.render(names[finding])
            n_clean, n_corrupted = count(clean), count(corrupted)
            if n_clean != n_corrupted:
                dropped.append(DroppedPair(template.template_id, finding,
                                           f"token counts differ ({n_clean} vs {n_corrupted})"))
                continue
            texts.append((finding, template, clean, corrupted, span, n_clean))

    pairs: list[TracingPair] = []
    image_rows: dict[str, list[int]] = {}
    for finding, template, clean, corrupted, span, n_tokens in texts:
        base = dict(clean=clean, corrupted=corrupted, finding=finding, template_id=template.template_id,
                    cue_start=span[0], cue_end=span[1], n_tokens=n_tokens)
        pair_id = f"{template.template_id}/{finding}"
        if not images_per_finding:
            pairs.append(TracingPair(pair_id=pair_id, **base))
            continue
        if finding not in image_rows:
            image_rows[finding] = _absent_images(table, finding, images_per_finding, rng)
        if not image_rows[finding]:
            dropped.append(DroppedPair(template.template_id, finding, "no study has this finding labelled absent"))
        for row in image_rows[finding]:
            pairs.append(TracingPair(pair_id=f"{pair_id}/{table.study_ids[row]}", image_path=table.image_paths[row],
                                     study_id=table.study_ids[row], subject_id=table.subject_ids[row], **base))
    return PairSet(pairs, dropped)
