"""Tests of the report-text generator (negtrace.data.reports)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from negtrace.data import phantom as P
from negtrace.data.findings import FINDINGS
from negtrace.data.reports import Report, negation_rates, report_caption, split_sentences, write_report

# Words by which the CheXpert labeler (stanfordmlgroup/chexpert-labeler, phrases/mention) finds
# each finding; a negated finding must be named by one of them.
MENTIONS = {
    "Enlarged Cardiomediastinum": ("mediastin",),
    "Cardiomegaly": ("heart", "cardiac", "cardiomegaly", "cardiomediastinal"),
    "Lung Opacity": ("opacit",),
    "Lung Lesion": ("nodule", "mass"),
    "Edema": ("edema", "congestion"),
    "Consolidation": ("consolidat",),
    "Pneumonia": ("pneumonia",),
    "Atelectasis": ("atelectasis",),
    "Pneumothorax": ("pneumothora",),
    "Pleural Effusion": ("effusion",),
    "Pleural Other": ("pleural thickening",),
    "Fracture": ("fracture",),
    "Support Devices": ("tube", "line", "catheter", "pacemaker"),
}
NEGATION = re.compile(r"\b(no|not|without|normal|unremarkable)\b", re.I)


def one(name: str, **attrs) -> P.PhantomSpec:
    return P.PhantomSpec.build({name: attrs})


def text_of(report: Report) -> str:
    return f"{report.findings} {report.impression}".lower()


def test_same_seed_same_report_and_seeds_vary():
    spec = P.sample_specs(1, seed=2)[0]
    assert write_report(spec, 7) == write_report(spec, 7)
    assert write_report(spec, (1, 2, 3)) == write_report(spec, (1, 2, 3))
    texts = {write_report(spec, s).findings for s in range(20)}
    assert len(texts) > 5
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert write_report(spec, rng_a) == write_report(spec, rng_b)


@pytest.mark.parametrize("spec,expected", [
    (one("Pleural Effusion", side="left", size="small"), ["small", "left", "pleural effusion"]),
    (one("Pleural Effusion", side="bilateral", size="large"), ["large", "bilateral", "effusions"]),
    (one("Pneumothorax", side="right", size="moderate"), ["moderate right", "pneumothorax"]),
    (one("Cardiomegaly", ctr=0.6), ["moderate"]),
    (one("Lung Lesion", side="left", zone="lower", diameter_mm=42.0), ["4.2 cm", "mass", "left lower lobe"]),
    (one("Consolidation", side="right", zone="upper", size="large"), ["right upper lobe", "consolidation"]),
    (one("Edema", severity="severe"), ["edema"]),
    (one("Fracture", side="right", rib=7), ["right", "7th", "rib", "fracture"]),
    (one("Pleural Other", side="left"), ["left", "pleural thickening"]),
    (one("Enlarged Cardiomediastinum", width_mm=110.0), ["mediastinum", "widen"]),
])
def test_present_findings_are_described_with_their_attributes(spec, expected):
    for seed in range(8):
        findings = write_report(spec, seed).findings.lower()
        for word in expected:
            assert word in findings, (word, findings)
        assert spec.present[0] not in write_report(spec, seed).mentioned_absent


def test_cardiomegaly_grade_follows_ctr():
    def grades(ctr):
        return {w for s in range(10) for w in ("mild", "moderate", "severe", "marked")
                if w in write_report(one("Cardiomegaly", ctr=ctr), s).findings.lower()}
    assert grades(0.53) == {"mild"} and grades(0.6) == {"moderate"} and grades(0.68) <= {"severe", "marked"}


def test_devices_are_named_together():
    spec = one("Support Devices", devices=["endotracheal_tube", "central_line"])
    for seed in range(10):
        text = write_report(spec, seed).findings.lower()
        assert ("endotracheal" in text or "et tube" in text) and ("jugular" in text or "ij" in text)


def test_mentioned_absent_are_negated_in_the_text_and_match_label_zero():
    every = dict.fromkeys(FINDINGS, 1.0)
    for i, spec in enumerate(P.sample_specs(60, seed=9)):
        report = write_report(spec, i, negation_rates_override=every)
        assert set(report.mentioned_absent) == set(FINDINGS) - set(spec.present)
        sentences = split_sentences(report.findings) + split_sentences(report.impression)
        for name in report.mentioned_absent:
            assert any(NEGATION.search(s) and any(m in s.lower() for m in MENTIONS[name]) for s in sentences), name
        labels = P.chexpert_labels(spec, report.mentioned_absent)
        assert {n for n in FINDINGS if labels[n] == 0.0} == set(report.mentioned_absent)
        assert {n for n in FINDINGS if labels[n] == 1.0} == set(spec.present)


def test_no_negation_when_rates_are_zero():
    never = dict.fromkeys(FINDINGS, 0.0)
    for i, spec in enumerate(P.sample_specs(40, seed=1)):
        report = write_report(spec, i, negation_rates_override=never)
        assert report.mentioned_absent == ()
        for s in split_sentences(report.findings):
            absent_named = [n for n in FINDINGS if not spec.has(n) and any(m in s.lower() for m in MENTIONS[n])]
            assert not (NEGATION.search(s) and absent_named), s


def test_negation_frequency_follows_chexpert_rates():
    normal = [P.PhantomSpec()] * 3000
    counts = {name: 0 for name in FINDINGS}
    for i, spec in enumerate(normal):
        for name in write_report(spec, i).mentioned_absent:
            counts[name] += 1
    rates = negation_rates(normal_study=True)
    for name in ("Pneumothorax", "Pleural Effusion", "Consolidation", "Cardiomegaly"):
        p = rates[name]
        assert abs(counts[name] / len(normal) - p) < 4 * np.sqrt(p * (1 - p) / len(normal)) + 1e-3, name
    assert rates["Pneumothorax"] > rates["Lung Lesion"]  # commonly negated findings are, rare ones aren't


def test_normal_and_abnormal_impressions():
    normal = write_report(P.PhantomSpec(), 0)
    assert "acute" in normal.impression.lower() or "normal" in normal.impression.lower()
    sick = write_report(one("Pneumothorax", side="left", size="large"), 0)
    assert "pneumothorax" in sick.impression.lower()


def test_caption_is_short_and_keeps_negations():
    every = dict.fromkeys(FINDINGS, 1.0)
    for i, spec in enumerate(P.sample_specs(30, seed=4)):
        report = write_report(spec, i, negation_rates_override=every)
        caption = report_caption(report)
        assert 0 < len(caption.split()) <= 60
        assert not re.search(r"(^|\s)\d+\.\s", caption)  # no list numbering
    report = write_report(one("Pleural Effusion", side="left", size="small"), 0,
                          negation_rates_override={"Pneumothorax": 1.0})
    assert "pneumothorax" in report_caption(report).lower()
    assert len(report_caption(report, max_words=3).split()) <= 3


def test_split_sentences_keeps_decimals():
    assert split_sentences("1. A 0.7 cm nodule. 2. Small effusion. No pneumothorax.") == [
        "A 0.7 cm nodule.", "Small effusion.", "No pneumothorax."]
