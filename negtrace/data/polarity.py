"""Polarity multiple-choice benchmark from CheXpert labels, following NAST's protocol.

Protocol (NAST: Abbasi et al. 2026, arXiv 2602.12498; MCQ format after NegBench,
Alhamoud et al. 2025; labels from CheXpert, Irvin et al. 2019):

1. Keep studies with at least 3 absent (0) and 2 present (1) findings among the 13
   findings ("No Finding" excluded; uncertain and blank ignored).
2. Sample 3 of the study's certain findings, at least one absent and one present, so the
   correct option always mixes an affirmed and a negated finding.
3. Make 4 distinct label vectors over the 3 findings: the true one at a random position
   and 3 distractors, each flipping a different non-empty random subset of the findings.
4. Word every option twice. The *negated* form states absent findings with a negation
   pattern ("no X", "without X", "X absent", "free of X", "no evidence of X", "X not seen",
   "A, B, but not C", "No C, with A and B"); the *affirmative* form states each absent
   finding by its normal-anatomy counterpart ("normal heart size", "sharp costophrenic
   angles") in the same sentence frame. Present findings are worded identically in both.

One pattern and one wording per finding are drawn per item and used for all four options,
so options differ only in polarity; an option the item's pattern cannot express (a
conjunction with no present finding, say) falls back to ``"no"`` or, with nothing absent,
``"none"``. Each study's item depends only on ``seed`` and its study id.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from negtrace.data.findings import ABSENT, FINDINGS, PRESENT
from negtrace.data.labels import LabelTable
from negtrace.data.schema import PolarityItem

__all__ = [
    "FINDING_PHRASES",
    "NORMAL_PHRASES",
    "PATTERNS",
    "QUESTION",
    "MIN_ABSENT",
    "MIN_PRESENT",
    "NoEligibleStudiesError",
    "PolarityBenchmark",
    "eligible_studies",
    "render_option",
    "build_polarity",
]

MIN_ABSENT, MIN_PRESENT, N_FINDINGS, N_OPTIONS = 3, 2, 3, 4
QUESTION = "Which statement best describes this chest X-ray?"

# How a finding is named when stated (present, or negated). No phrase contains a negation
# word, "and", "or", "with" or a comma, so sentences parse back unambiguously.
FINDING_PHRASES: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": ("enlarged cardiomediastinum", "widened mediastinum", "mediastinal widening"),
    "Cardiomegaly": ("cardiomegaly", "enlarged cardiac silhouette", "enlarged heart"),
    "Lung Opacity": ("lung opacity", "pulmonary opacity", "parenchymal opacity"),
    "Lung Lesion": ("lung lesion", "pulmonary lesion", "focal lung lesion"),
    "Edema": ("pulmonary edema", "edema", "pulmonary oedema"),
    "Consolidation": ("consolidation", "airspace consolidation", "lung consolidation"),
    "Pneumonia": ("pneumonia", "pulmonary infection"),
    "Atelectasis": ("atelectasis", "atelectatic change"),
    "Pneumothorax": ("pneumothorax",),
    "Pleural Effusion": ("pleural effusion", "effusion", "pleural fluid"),
    "Pleural Other": ("pleural abnormality", "pleural thickening"),
    "Fracture": ("fracture", "bone fracture", "osseous fracture"),
    "Support Devices": ("support devices", "medical devices", "indwelling devices"),
}

# The normal-anatomy statement equivalent to each finding's absence (no negation words).
NORMAL_PHRASES: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": ("normal cardiomediastinal silhouette", "normal mediastinal contours",
                                   "normal mediastinal width"),
    "Cardiomegaly": ("normal heart size", "normal cardiac size", "normal-sized heart"),
    "Lung Opacity": ("clear lungs", "clear lung fields", "lucent lung fields"),
    "Lung Lesion": ("normal lung parenchyma", "homogeneous lung parenchyma", "uniform lung parenchyma"),
    "Edema": ("normal pulmonary vasculature", "normal pulmonary vascularity", "normal interstitial markings"),
    "Consolidation": ("clear airspaces", "well-aerated airspaces", "normal airspace lucency"),
    "Pneumonia": ("well-aerated lungs", "healthy-appearing lungs", "healthy lungs"),
    "Atelectasis": ("normal lung volumes", "well-inflated lung bases", "fully inflated lung bases"),
    "Pneumothorax": ("fully expanded lungs", "lungs expanded to the chest wall", "normal lung expansion"),
    "Pleural Effusion": ("sharp costophrenic angles", "sharp costophrenic sulci", "clear costophrenic angles"),
    "Pleural Other": ("smooth pleural surfaces", "normal pleural contours", "thin smooth pleura"),
    "Fracture": ("intact osseous structures", "intact bony thorax", "intact skeletal structures"),
    "Support Devices": ("native chest anatomy only", "only native structures", "native anatomy only"),
}

# Patterns an item may be drawn with; "none" is only a per-option fallback.
PATTERNS: tuple[str, ...] = ("no", "without", "absent", "free_of", "no_evidence", "not_seen", "but_not", "no_with")
_CONJUNCTIONS = ("but_not", "no_with")

Paraphrase = Callable[[str], str]


class NoEligibleStudiesError(ValueError):
    """No study of a label file satisfies the polarity filter."""


@dataclass
class PolarityBenchmark:
    """The built items plus what happened on the way (counts, seconds)."""

    items: list[PolarityItem]
    stats: dict[str, Any] = field(default_factory=dict)


# -- text --------------------------------------------------------------------------------

def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else (
        f"{words[0]} and {words[1]}" if len(words) == 2 else f"{', '.join(words[:-1])}, and {words[-1]}")


def _or(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else (
        f"{words[0]} or {words[1]}" if len(words) == 2 else f"{', '.join(words[:-1])}, or {words[-1]}")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _absent_clause(pattern: str, absent: list[str], normal: list[str]) -> tuple[str, str]:
    """(negated, affirmative) clause for the absent findings under a single-cue pattern."""
    if pattern == "no":
        return f"no {_or(absent)}", _and(normal)
    if pattern == "absent":
        return f"{_and(absent)} absent", _and(normal)
    if pattern == "free_of":
        return f"free of {_and(absent)}", _and(normal)
    if pattern == "no_evidence":
        return f"no evidence of {_or(absent)}", _and(normal)
    if pattern == "not_seen":
        return f"{_and(absent)} not seen", _and(normal)
    raise ValueError(f"{pattern!r} is not a single-cue pattern")


def render_option(pattern: str, present: list[str], absent: list[str], normal: list[str]) -> tuple[str, str]:
    """The (negated, affirmative) sentences of one option.

    ``present`` / ``absent`` are finding phrases in item order, ``normal`` the normal-anatomy
    phrases of the absent findings (same order). ``pattern`` must suit the option: the
    conjunction patterns need both present and absent findings, ``"none"`` no absent one.
    """
    if pattern == "none":
        if absent:
            raise ValueError("pattern 'none' is for options without absent findings")
        text = f"{_cap(_and(present))}."
        return text, text
    if not absent:
        raise ValueError(f"pattern {pattern!r} needs at least one absent finding")
    if pattern in _CONJUNCTIONS and not present:
        raise ValueError(f"pattern {pattern!r} needs at least one present finding")
    if pattern == "without":
        head = _and(present) if present else "chest radiograph"
        return f"{_cap(head)} without {_or(absent)}.", f"{_cap(head)} with {_and(normal)}."
    if pattern == "but_not":
        head = _cap(", ".join(present))
        return f"{head}, but not {_or(absent)}.", f"{head}, and {_and(normal)}."
    if pattern == "no_with":
        return f"No {_or(absent)}, with {_and(present)}.", f"{_cap(_and(normal))}, with {_and(present)}."
    negated, affirmative = _absent_clause(pattern, absent, normal)
    if present:
        head = _cap(_and(present))
        return f"{head}; {negated}.", f"{head}; {affirmative}."
    return f"{_cap(negated)}.", f"{_cap(affirmative)}."


def _option_pattern(item_pattern: str, n_present: int, n_absent: int) -> str:
    if n_absent == 0:
        return "none"
    if item_pattern in _CONJUNCTIONS and n_present == 0:
        return "no"
    return item_pattern


# -- sampling ----------------------------------------------------------------------------

def eligible_studies(table: LabelTable, require_frontal: bool = True) -> tuple[np.ndarray, dict[str, int]]:
    """Indices of studies passing the filter, and counts of why the others fail."""
    findings = table.findings
    n_absent = (findings == ABSENT).sum(axis=1)
    n_present = (findings == PRESENT).sum(axis=1)
    few_absent, few_present = n_absent < MIN_ABSENT, n_present < MIN_PRESENT
    keep = ~few_absent & ~few_present
    frontal_known = np.array([v is not None for v in table.views])
    not_frontal = frontal_known & np.array([(v or "").lower() != "frontal" for v in table.views])
    if require_frontal:
        keep &= ~not_frontal
    reasons = {
        "n_too_few_absent": int(few_absent.sum()),
        "n_too_few_present": int(few_present.sum()),
        "n_too_few_both": int((few_absent & few_present).sum()),
        "n_without_frontal_image": int((not_frontal & ~few_absent & ~few_present).sum()) if require_frontal else 0,
        "max_absent": int(n_absent.max(initial=0)),
        "max_present": int(n_present.max(initial=0)),
    }
    return np.flatnonzero(keep), reasons


def _item_rng(seed: int, study_id: str) -> random.Random:
    # String seeds are hashed with SHA-512, so the stream is stable across runs and platforms.
    return random.Random(f"negtrace-polarity:{seed}:{study_id}")


def _sample_findings(rng: random.Random, codes: np.ndarray) -> list[int]:
    certain = [j for j in range(len(FINDINGS)) if codes[j] in (PRESENT, ABSENT)]
    while True:
        chosen = rng.sample(certain, N_FINDINGS)
        values = {int(codes[j]) for j in chosen}
        if values == {PRESENT, ABSENT}:
            return chosen


_FLIP_MASKS = list(range(1, 2 ** N_FINDINGS))  # non-empty subsets of the 3 findings as bits


def _option_vectors(rng: random.Random, truth: tuple[int, ...]) -> tuple[list[tuple[int, ...]], int]:
    masks = rng.sample(_FLIP_MASKS, N_OPTIONS - 1)
    distractors = [tuple(v ^ ((m >> k) & 1) for k, v in enumerate(truth)) for m in masks]
    answer = rng.randrange(N_OPTIONS)
    options = distractors[:answer] + [truth] + distractors[answer:]
    return options, answer


def _make_item(table: LabelTable, i: int, seed: int, paraphrase: Paraphrase | None) -> PolarityItem:
    study = table.study_ids[i]
    rng = _item_rng(seed, study)
    codes = table.findings[i]
    chosen = _sample_findings(rng, codes)
    names = [FINDINGS[j] for j in chosen]
    truth = tuple(int(codes[j]) for j in chosen)
    vectors, answer = _option_vectors(rng, truth)
    item_pattern = rng.choice(PATTERNS)
    named = [rng.choice(FINDING_PHRASES[f]) for f in names]
    normal = [rng.choice(NORMAL_PHRASES[f]) for f in names]

    negated, affirmative, patterns = [], [], []
    for vector in vectors:
        present = [named[k] for k in range(N_FINDINGS) if vector[k] == PRESENT]
        absent_idx = [k for k in range(N_FINDINGS) if vector[k] == ABSENT]
        pattern = _option_pattern(item_pattern, len(present), len(absent_idx))
        neg, aff = render_option(pattern, present, [named[k] for k in absent_idx], [normal[k] for k in absent_idx])
        if paraphrase is not None:
            neg, aff = paraphrase(neg), paraphrase(aff)
        negated.append(neg)
        affirmative.append(aff)
        patterns.append(pattern)
    return PolarityItem(
        item_id=f"polarity/{study}",
        study_id=study,
        question=QUESTION,
        options_negated=negated,
        options_affirmative=affirmative,
        option_labels=[dict(zip(names, v, strict=True)) for v in vectors],
        answer=answer,
        findings=names,
        option_patterns=patterns,
        subject_id=table.subject_ids[i],
        image_path=table.image_paths[i],
        paraphrased=paraphrase is not None,
    )


def build_polarity(table: LabelTable, *, seed: int = 0, n_items: int | None = None,
                   paraphrase: Paraphrase | None = None, require_frontal: bool = True) -> PolarityBenchmark:
    """Build the polarity MCQ benchmark from a label table (one item per eligible study).

    ``n_items`` draws that many eligible studies (seeded, file order kept); ``None`` uses all.
    ``paraphrase`` (optional) rewrites every option text; the default needs nothing external.
    ``require_frontal`` drops studies whose only image is lateral (when views are known).
    Raises :class:`NoEligibleStudiesError` saying how many studies were read and why none
    qualified.
    """
    started = time.perf_counter()
    eligible, reasons = eligible_studies(table, require_frontal)
    stats: dict[str, Any] = {"source": table.source, "n_rows": table.n_rows, "n_studies": len(table),
                             "n_eligible": int(eligible.size), **reasons, "seed": seed}
    if eligible.size == 0:
        raise NoEligibleStudiesError(_no_eligible_message(table, reasons, require_frontal))
    if n_items is not None:
        if n_items < 1:
            raise ValueError(f"n_items must be positive, got {n_items}")
        if n_items < eligible.size:
            picker = np.random.default_rng(seed)
            eligible = np.sort(picker.choice(eligible, size=n_items, replace=False))
    items = [_make_item(table, int(i), seed, paraphrase) for i in eligible]
    stats["n_items"] = len(items)
    stats["pattern_counts"] = _count(item.pattern for item in items)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return PolarityBenchmark(items, stats)


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def _no_eligible_message(table: LabelTable, reasons: dict[str, int], require_frontal: bool) -> str:
    parts = [f"{reasons['n_too_few_absent']} had fewer than {MIN_ABSENT} absent findings "
             f"(most in any study: {reasons['max_absent']})",
             f"{reasons['n_too_few_present']} had fewer than {MIN_PRESENT} present findings "
             f"(most in any study: {reasons['max_present']})",
             f"{reasons['n_too_few_both']} had both problems"]
    if require_frontal and reasons["n_without_frontal_image"]:
        parts.append(f"{reasons['n_without_frontal_image']} otherwise eligible studies had no frontal image")
    return (f"{table.source}: read {len(table)} studies ({table.n_rows} rows) but none qualified for the "
            f"polarity benchmark, which needs at least {MIN_ABSENT} absent (0) and {MIN_PRESENT} present (1) "
            f"findings among the 13 findings (uncertain and blank labels are ignored): " + "; ".join(parts) + ".")
