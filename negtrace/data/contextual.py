"""Contextual clinical negation: structured claims and attribute-level negations.

After NAST's contextual clinical negation dataset (Abbasi et al. 2026, arXiv 2602.12498):
a claim names a finding and, where the data says so, its side (left/right/bilateral), lung
zone (upper/middle/lower) and severity (small/moderate/large or mild/moderate/severe).
Negations can target the finding ("no pneumothorax"), its location ("no right pleural
effusion" with a left one present, "no consolidation in the right lower zone") or its
severity ("pleural effusion, not large", "no large pneumothorax").

Each item is one (study, finding): a true *target* claim and false *distractors*; first
those about the same finding (the target's negated / attribute-swapped variants), then
false claims about the study's other findings to fill ``n_candidates``. Retrieval ranks
all candidates for the image; claim ranking compares the target with each variant.

Attributes come only from an attributes JSONL (:class:`~negtrace.data.schema.ImageAttributes`,
as the phantom world writes it). Studies without one get finding-level claims only;
nothing is invented for real label files.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from negtrace.data.findings import ABSENT, FINDINGS, PRESENT
from negtrace.data.labels import LabelTable
from negtrace.data.polarity import FINDING_PHRASES
from negtrace.data.schema import (
    SEVERITY_SCALES,
    SIDED_FINDINGS,
    SIDES,
    ZONED_FINDINGS,
    ZONES,
    ContextualClaim,
    ContextualItem,
    FindingAttributes,
    ImageAttributes,
    read_jsonl,
)

__all__ = [
    "CLAIM_NAMES",
    "ContextualBenchmark",
    "claim_text",
    "claim_holds",
    "make_claim",
    "candidate_claims",
    "read_attributes",
    "build_contextual",
]

CLAIM_NAMES: dict[str, str] = {f: FINDING_PHRASES[f][0] for f in FINDINGS}


@dataclass
class ContextualBenchmark:
    items: list[ContextualItem]
    stats: dict[str, Any] = field(default_factory=dict)


# -- claim text and truth ------------------------------------------------------------------

def _where(side: str | None, zone: str | None) -> str:
    if zone is None:
        return "bilateral" if side == "bilateral" else f"on the {side}"
    if side == "bilateral":
        return f"in both {zone} zones"
    return f"in the {side} {zone} zone" if side else f"in the {zone} zone"


def _describe(name: str, side: str | None, zone: str | None, severity: str | None) -> str:
    words = [w for w in (severity, side if zone is None else None, name) if w]
    text = " ".join(words)
    return f"{text} {_where(side, zone)}" if zone is not None else text


def claim_text(finding: str, present: bool, scope: str, side: str | None = None, zone: str | None = None,
               severity: str | None = None) -> str:
    """The sentence for a structured claim (see :class:`ContextualClaim` for the semantics)."""
    name = CLAIM_NAMES[finding]
    if scope == "none":
        text = _describe(name, side, zone, severity)
    elif scope == "finding":
        text = f"no {name}"
    elif scope == "location":
        text = f"{name}, not {_where(side, zone)}" if present else f"no {_describe(name, side, zone, None)}"
    elif scope == "severity":
        text = f"{name}, not {severity}" if present else f"no {severity} {name}"
    else:
        raise ValueError(f"unknown negation scope {scope!r}")
    return text[:1].upper() + text[1:] + "."


class UnknownAttributeError(ValueError):
    """A claim's truth depends on an attribute the data does not give."""


def _location_matches(side: str | None, zone: str | None, actual: FindingAttributes) -> bool:
    if side is not None:
        if actual.side is None:
            raise UnknownAttributeError("side unknown")
        # A bilateral finding is on the left and on the right.
        if side != actual.side and not (actual.side == "bilateral" and side in ("left", "right")):
            return False
    if zone is not None:
        if actual.zone is None:
            raise UnknownAttributeError("zone unknown")
        if zone != actual.zone:
            return False
    return True


def _severity_matches(severity: str | None, actual: FindingAttributes) -> bool:
    if severity is None:
        return True
    if actual.severity is None:
        raise UnknownAttributeError("severity unknown")
    return severity == actual.severity


def claim_holds(present: bool, scope: str, actual: FindingAttributes, side: str | None = None,
                zone: str | None = None, severity: str | None = None) -> bool:
    """Whether a claim is true given the finding's actual state.

    Raises :class:`UnknownAttributeError` if the answer depends on an attribute ``actual``
    lacks (only absent findings have every attribute settled).
    """
    if not actual.present:
        # Nothing about an absent finding can be affirmed; every negation of it holds.
        return not present
    if scope == "none":
        return _location_matches(side, zone, actual) and _severity_matches(severity, actual)
    if scope == "finding":
        return False
    if scope == "location":
        at_location = _location_matches(side, zone, actual)
        return not at_location if present else not (at_location and _severity_matches(severity, actual))
    if scope == "severity":
        same = _severity_matches(severity, actual)
        return not same if present else not (same and _location_matches(side, zone, actual))
    raise ValueError(f"unknown negation scope {scope!r}")


def make_claim(finding: str, present: bool, scope: str, actual: FindingAttributes, study_id: str,
               side: str | None = None, zone: str | None = None, severity: str | None = None) -> ContextualClaim:
    return ContextualClaim(
        finding=finding, present=present, text=claim_text(finding, present, scope, side, zone, severity),
        negation_scope=scope, holds=claim_holds(present, scope, actual, side, zone, severity),
        study_id=study_id, side=side, zone=zone, severity=severity)


def candidate_claims(finding: str, actual: FindingAttributes, study_id: str,
                     attributes_known: bool) -> list[ContextualClaim]:
    """Every claim about ``finding`` whose truth the data settles, true and false.

    Without ``attributes_known`` (a plain label file) only "X" and "no X" are made.
    """
    specs: list[tuple[bool, str, str | None, str | None, str | None]] = [
        (True, "none", None, None, None), (False, "finding", None, None, None)]
    if attributes_known:
        sides = SIDES if finding in SIDED_FINDINGS else ()
        zones = ZONES if finding in ZONED_FINDINGS else ()
        severities = SEVERITY_SCALES.get(finding, ())
        if actual.present:
            side, zone, sev = actual.side, actual.zone, actual.severity
            if side or zone or sev:
                specs.append((True, "none", side, zone, sev))
            specs += [(True, "none", s, zone, sev) for s in sides if side and s != side]
            specs += [(True, "none", side, z, sev) for z in zones if zone and z != zone]
            specs += [(True, "none", side, zone, v) for v in severities if sev and v != sev]
            if side:
                specs += [(p, "location", s, None, None) for s in sides for p in (True, False)]
            if zone:
                specs += [(p, "location", side, z, None) for z in zones for p in (True, False)]
            if sev:
                specs += [(p, "severity", None, None, v) for v in severities for p in (True, False)]
        else:
            specs += [(True, "none", s, None, None) for s in sides]
            specs += [(False, "location", s, None, None) for s in sides]
            specs += [(True, "none", None, None, v) for v in severities]
            specs += [(p, "severity", None, None, v) for v in severities for p in (True, False)]
    claims: dict[str, ContextualClaim] = {}
    for present, scope, side, zone, severity in specs:
        claim = make_claim(finding, present, scope, actual, study_id, side, zone, severity)
        claims.setdefault(claim.text, claim)
    return list(claims.values())


# -- inputs --------------------------------------------------------------------------------

def read_attributes(path) -> list[ImageAttributes]:
    """Load an attributes JSONL (one :class:`ImageAttributes` per line), with duplicate check."""
    records = read_jsonl(path, ImageAttributes)
    seen: set[str] = set()
    for record in records:
        if record.study_id in seen:
            raise ValueError(f"{path}: study_id {record.study_id!r} appears more than once")
        seen.add(record.study_id)
    return records


@dataclass
class _Study:
    study_id: str
    subject_id: str | None
    image_path: str | None
    known: dict[str, FindingAttributes]
    attributes_known: bool
    _claims: dict[str, list[ContextualClaim]] = field(default_factory=dict, repr=False)

    def claims(self, finding: str) -> list[ContextualClaim]:
        if finding not in self._claims:
            self._claims[finding] = candidate_claims(finding, self.known[finding], self.study_id,
                                                     self.attributes_known)
        return self._claims[finding]


class _Studies:
    """Label-table studies (built lazily: a full CheXpert file has 188k) plus attribute records.

    Attribute records attach to the table's study with the same id, else the same image
    path; without a table they define the studies.
    """

    def __init__(self, table: LabelTable | None, attributes: Sequence[ImageAttributes], complete: bool):
        self.table = table
        self.n_table = len(table) if table is not None else 0
        self.cache: dict[int, _Study] = {}
        rows = table.index() if table is not None else {}
        rows_by_image = {p: i for i, p in enumerate(table.image_paths) if p} if table is not None else {}
        unmatched: list[str] = []
        self.extra: list[ImageAttributes] = []  # studies defined by attribute records alone
        for record in attributes:
            row = rows.get(record.study_id)
            if row is None and record.image_path:
                row = rows_by_image.get(record.image_path)
            if table is None:
                self.extra.append(record)
                study = _Study(record.study_id, record.subject_id, record.image_path, {}, True)
                self.cache[self.n_table + len(self.extra) - 1] = study
            elif row is None:
                unmatched.append(record.study_id)
                continue
            else:
                study = self.cache.get(row) or self._from_row(row)
                self.cache[row] = study
            _attach(study, record, complete)
        if unmatched:
            raise ValueError(f"{len(unmatched)} attribute records match no study of the label file "
                             f"(by study_id or image_path): {', '.join(map(repr, unmatched[:10]))}")

    def __len__(self) -> int:
        return self.n_table + len(self.extra)

    def _from_row(self, i: int) -> _Study:
        table = self.table
        codes = table.findings[i]
        known = {FINDINGS[j]: FindingAttributes(present=bool(codes[j] == PRESENT))
                 for j in np.flatnonzero((codes == PRESENT) | (codes == ABSENT))}
        return _Study(table.study_ids[i], table.subject_ids[i], table.image_paths[i], known, False)

    def study(self, k: int) -> _Study:
        if k not in self.cache:
            self.cache[k] = self._from_row(k)
        return self.cache[k]

    def pairs(self) -> list[tuple[int, str]]:
        """Every (study index, finding) whose presence is known."""
        pairs: list[tuple[int, str]] = []
        if self.table is not None:
            codes = self.table.findings
            rows, cols = np.nonzero((codes == PRESENT) | (codes == ABSENT))
            plain = ~np.isin(rows, np.fromiter(self.cache, dtype=np.int64, count=len(self.cache)))
            pairs += zip(rows[plain].tolist(), [FINDINGS[c] for c in cols[plain].tolist()], strict=True)
        for k in sorted(self.cache):
            pairs += [(k, f) for f in FINDINGS if f in self.cache[k].known]
        return pairs


def _attach(study: _Study, record: ImageAttributes, complete: bool) -> None:
    findings = dict(record.findings)
    if complete:  # every present finding is listed, so the rest are absent
        findings.update({f: FindingAttributes(present=False) for f in FINDINGS if f not in findings})
    for finding, attrs in findings.items():
        label = study.known.get(finding)
        if label is not None and label.present != attrs.present:
            raise ValueError(f"study {study.study_id!r}: the labels say {finding} is "
                             f"{'present' if label.present else 'absent'} but the attributes say "
                             f"{'present' if attrs.present else 'absent'}")
        study.known[finding] = attrs
    study.attributes_known = True
    study.image_path = study.image_path or record.image_path
    study.subject_id = study.subject_id or record.subject_id


# -- items ---------------------------------------------------------------------------------

def _pick_target(rng: random.Random, true_claims: list[ContextualClaim]) -> ContextualClaim:
    """A true claim, with each (scope, polarity) kind equally likely."""
    kinds: dict[tuple[str, bool], list[ContextualClaim]] = {}
    for claim in true_claims:
        kinds.setdefault((claim.negation_scope, claim.present), []).append(claim)
    kind = rng.choice(sorted(kinds))
    return rng.choice(kinds[kind])


def _make_item(study: _Study, finding: str, seed: int, n_candidates: int) -> ContextualItem:
    rng = random.Random(f"negtrace-contextual:{seed}:{study.study_id}:{finding}")
    own = study.claims(finding)
    target = _pick_target(rng, [c for c in own if c.holds])
    variants = [c for c in own if not c.holds]
    rng.shuffle(variants)
    distractors = variants[: n_candidates - 1]
    if len(distractors) < n_candidates - 1:
        others = [c for f in study.known if f != finding for c in study.claims(f) if not c.holds]
        rng.shuffle(others)
        distractors += others[: n_candidates - 1 - len(distractors)]
    return ContextualItem(
        item_id=f"contextual/{study.study_id}/{finding}", study_id=study.study_id, target=target,
        distractors=distractors, subject_id=study.subject_id, image_path=study.image_path)


def build_contextual(table: LabelTable | None = None, attributes: Sequence[ImageAttributes] = (), *,
                     attributes_complete: bool = False, seed: int = 0, n_items: int | None = None,
                     n_candidates: int = 10) -> ContextualBenchmark:
    """Build contextual claim items: one per (study, finding) whose status is known.

    ``attributes`` (e.g. from :func:`read_attributes`) add side/zone/severity to the studies
    they match (by study id, else image path); with no ``table`` they define the studies.
    ``attributes_complete`` says each record lists every present finding, so unlisted
    findings are absent (true of the phantom world, whose label files leave most absent
    findings blank). ``n_items`` draws that many (study, finding) pairs (seeded).
    ``n_candidates`` caps target + distractors.
    """
    if table is None and not attributes:
        raise ValueError("build_contextual needs a label table, attribute records, or both")
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be at least 2, got {n_candidates}")
    started = time.perf_counter()
    studies = _Studies(table, attributes, attributes_complete)
    pairs = studies.pairs()
    if not pairs:
        raise ValueError(f"read {len(studies)} studies but none has a finding labelled present (1) or absent (0)")
    order = np.arange(len(pairs))
    if n_items is not None:
        if n_items < 1:
            raise ValueError(f"n_items must be positive, got {n_items}")
        if n_items < len(pairs):
            order = np.sort(np.random.default_rng(seed).choice(len(pairs), size=n_items, replace=False))
    items = [_make_item(studies.study(pairs[k][0]), pairs[k][1], seed, n_candidates) for k in order]
    scopes: dict[str, int] = {}
    for item in items:
        key = f"{item.target.negation_scope}/{'present' if item.target.present else 'absent'}"
        scopes[key] = scopes.get(key, 0) + 1
    stats = {"n_studies": len(studies), "n_studies_with_attributes": sum(s.attributes_known for s in studies.cache.values()),
             "n_pairs": len(pairs), "n_items": len(items), "target_kinds": dict(sorted(scopes.items())),
             "mean_candidates": round(float(np.mean([len(i.candidates) for i in items])), 2),
             "seed": seed, "seconds": round(time.perf_counter() - started, 3)}
    return ContextualBenchmark(items, stats)
