"""Radiology-report text for phantom specs, in the style of MIMIC-CXR / Open-i reports.

:func:`write_report` describes the present findings with their attributes ("Small left pleural
effusion.", "Moderate cardiomegaly.") and, like a radiologist, states *some* absent findings
("No pneumothorax.", "Heart size is normal."). Which absent findings are stated follows the
real CheXpert rates at which each finding is explicitly negated when it is not present
(``negation_rate_given_not_present_{normal,abnormal}_study`` in ``resources/chexpert_stats.json``),
because CheXpert's 0 labels come from exactly such statements (Irvin et al., AAAI 2019). The
phrasings are checked against the CheXpert labeler's mention phrases, so a negated sentence
names its finding the way the labeler would find it. Statements that name no label
("The lungs are clear.", "No acute cardiopulmonary process.") are added as real reports do;
they do not count as negations.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from negtrace.data.findings import FINDINGS
from negtrace.data.phantom import (
    DEVICES,
    Finding,
    PhantomSpec,
    Seed,
    load_chexpert_stats,
    rng_stream,
)

__all__ = ["Report", "write_report", "report_caption", "negation_rates", "split_sentences"]


@dataclass(frozen=True)
class Report:
    """FINDINGS and IMPRESSION text, and the absent findings the text explicitly negates."""

    findings: str
    impression: str
    mentioned_absent: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"FINDINGS: {self.findings}\n\nIMPRESSION: {self.impression}"


def negation_rates(normal_study: bool) -> dict[str, float]:
    """P(finding explicitly negated | finding not present) in CheXpert, for studies with no
    present finding other than support devices (``normal_study``) or with one."""
    stats = load_chexpert_stats()
    key = "normal_study" if normal_study else "abnormal_study"
    return dict(stats[f"negation_rate_given_not_present_{key}"])


# ---------------------------------------------------------------------------------------
# Wording helpers
# ---------------------------------------------------------------------------------------

def _choose(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return _cap(text if text.endswith(".") else text + ".")


def _join(items: Sequence[str], conj: str) -> str:
    if len(items) <= 2:
        return f" {conj} ".join(items)
    return ", ".join(items[:-1]) + f", {conj} " + items[-1]


_LOBES = {
    ("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
    ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
    ("left", "middle"): "lingula", ("left", "lower"): "left lower lobe",
}


@dataclass(frozen=True)
class _Place:
    """A location worded two ways: before a noun ("right lower lobe consolidation") and after
    one ("consolidation in the right lower lobe")."""

    before: str
    after: str


def _lobe(side: str, zone: str, rng: np.random.Generator) -> _Place:
    if side == "bilateral":
        return _choose(rng, {
            "upper": (_Place("bilateral upper lobe", "in both upper lobes"),),
            "middle": (_Place("right middle lobe and lingular", "in the right middle lobe and lingula"),),
            "lower": (_Place("bilateral lower lobe", "in both lower lobes"), _Place("bibasilar", "at both lung bases")),
        }[zone])
    lobe = _LOBES[(side, zone)]
    before = "lingular" if lobe == "lingula" else lobe
    return _Place(before, f"in the {lobe}")


def _zone(side: str, zone: str, rng: np.random.Generator) -> _Place:
    if side == "bilateral":
        return _choose(rng, {
            "upper": (_Place("bilateral upper lung", "in both upper lungs"),),
            "middle": (_Place("bilateral mid lung", "in both mid lungs"),),
            "lower": (_Place("bibasilar", "at both lung bases"), _Place("bilateral lower lung", "in both lower lungs")),
        }[zone])
    return _choose(rng, {
        "upper": (_Place(f"{side} upper lung", f"in the {side} upper lung"),
                  _Place(f"{side} upper lung zone", f"in the {side} upper lung zone")),
        "middle": (_Place(f"{side} mid lung", f"in the {side} mid lung"),),
        "lower": (_Place(f"{side} basilar", f"at the {side} lung base"),
                  _Place(f"{side} lower lung", f"in the {side} lower lung")),
    }[zone])


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _heart_grade(ctr: float) -> str:
    return "mild" if ctr <= 0.55 else ("moderate" if ctr <= 0.62 else "severe")


# ---------------------------------------------------------------------------------------
# Present findings
# ---------------------------------------------------------------------------------------

def _consolidation(f: Finding, rng: np.random.Generator, pneumonia: bool) -> str:
    adj = _choose(rng, {"small": ("patchy", "focal", "small"), "moderate": ("", "patchy", "dense"),
                        "large": ("extensive", "dense", "confluent")}[f.size])
    place = _lobe(f.side, f.zone, rng)
    text = _choose(rng, (f"{adj} {place.before} consolidation", f"{adj} consolidation {place.after}",
                         f"there is {adj} consolidation {place.after}"))
    if pneumonia:
        text += _choose(rng, (", consistent with pneumonia", ", compatible with pneumonia"))
    return _sentence(text)


def _pneumonia(f: Finding, rng: np.random.Generator) -> str:
    place = _lobe(f.side, f.zone, rng)
    extent = {"small": "", "moderate": "", "large": _choose(rng, ("extensive ", "multifocal "))}[f.size]
    return _sentence(_choose(rng, (f"{extent}{place.before} pneumonia",
                                   f"findings consistent with {extent}{place.before} pneumonia",
                                   f"{extent}pneumonia {place.after}")))


def _lung_opacity(f: Finding, rng: np.random.Generator) -> str:
    adj = _choose(rng, {"small": ("patchy", "hazy", "subtle"), "moderate": ("patchy", "hazy", "airspace"),
                        "large": ("extensive", "confluent", "extensive patchy")}[f.size])
    plural = f.side == "bilateral"
    noun = "opacities" if plural else "opacity"
    place = _zone(f.side, f.zone, rng)
    there = "there are" if plural else f"there is {'an' if adj[0] in 'aeiou' else 'a'}"
    return _sentence(_choose(rng, (f"{adj} {noun} {place.after}", f"{adj} {place.before} {noun}",
                                   f"{there} {adj} {noun} {place.after}")))


def _atelectasis(f: Finding, rng: np.random.Generator) -> str:
    kind = _choose(rng, ("linear", "plate-like", "subsegmental", "discoid"))
    place = _zone(f.side, f.zone, rng)
    return _sentence(_choose(rng, (f"{kind} atelectasis {place.after}", f"{kind} {place.before} atelectasis",
                                   f"{place.before} {kind} atelectasis")))


def _edema(f: Finding, rng: np.random.Generator) -> str:
    return _sentence(_choose(rng, {
        "mild": ("mild pulmonary edema", "mild interstitial pulmonary edema",
                 "mild pulmonary vascular congestion and interstitial edema", "there is mild pulmonary edema"),
        "moderate": ("moderate pulmonary edema", "moderate interstitial and perihilar edema",
                     "there is moderate pulmonary edema"),
        "severe": ("severe pulmonary edema", "severe diffuse pulmonary edema", "marked pulmonary edema"),
    }[f.severity]))


def _lesion(f: Finding, rng: np.random.Generator) -> str:
    place = _lobe(f.side, f.zone, rng)
    d = f.diameter_mm
    if d >= 30:
        size = f"{d / 10:.1f} cm"
        return _sentence(_choose(rng, (f"{size} mass {place.after}", f"{place.before} mass measuring {size}",
                                       f"there is a {size} {place.before} mass")))
    size = _choose(rng, (f"{round(d):d} mm", f"{d / 10:.1f} cm"))
    return _sentence(_choose(rng, (f"{size} nodule {place.after}", f"{size} {place.before} pulmonary nodule",
                                   f"{place.before} nodule measuring {size}")))


def _pneumothorax(f: Finding, rng: np.random.Generator) -> str:
    if f.side == "bilateral":
        return _sentence(f"{f.size} bilateral pneumothoraces")
    apical = f.size == "small" and rng.random() < 0.5
    where = f"{f.side} apical" if apical else f.side
    return _sentence(_choose(rng, (f"{f.size} {where} pneumothorax", f"there is a {f.size} {where} pneumothorax")))


def _effusion(f: Finding, rng: np.random.Generator) -> str:
    if f.side == "bilateral":
        return _sentence(_choose(rng, (f"{f.size} bilateral pleural effusions", f"bilateral {f.size} pleural effusions",
                                       f"there are {f.size} bilateral pleural effusions")))
    options = [f"{f.size} {f.side} pleural effusion", f"there is a {f.size} {f.side} pleural effusion"]
    if f.size == "small":
        options.append(f"small {f.side} pleural effusion blunting the costophrenic angle")
    return _sentence(_choose(rng, options))


def _pleural_other(f: Finding, rng: np.random.Generator) -> str:
    where = "bilateral" if f.side == "bilateral" else f.side
    return _sentence(_choose(rng, (f"{where} pleural thickening", f"mild {where} pleural thickening",
                                   f"there is {where} pleural thickening")))


def _fracture(f: Finding, rng: np.random.Generator) -> str:
    if f.rib is None:
        return _sentence(f"{f.side} lateral rib fracture")
    rib = _ordinal(f.rib)
    return _sentence(_choose(rng, (f"fracture of the {f.side} {rib} rib", f"{f.side} lateral {rib} rib fracture",
                                   f"mildly displaced fracture of the {f.side} {rib} posterolateral rib")))


def _cardiomegaly(f: Finding, rng: np.random.Generator) -> str:
    grade = _heart_grade(f.ctr)
    adverb = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}[grade]
    return _sentence(_choose(rng, (f"{grade} cardiomegaly", f"the heart is {adverb} enlarged",
                                   f"{grade} enlargement of the cardiac silhouette")))


def _widened_mediastinum(f: Finding, rng: np.random.Generator) -> str:
    return _sentence(_choose(rng, ("the mediastinum is widened", "widened mediastinum",
                                   f"widening of the mediastinum, measuring approximately {f.width_mm / 10:.1f} cm")))


_DEVICE_NAMES = {
    "endotracheal_tube": ("endotracheal tube", "ET tube"),
    "central_line": ("right internal jugular central venous catheter", "right IJ central line",
                     "right internal jugular line"),
    "pacemaker": ("left-sided pacemaker", "left chest wall pacemaker"),
    "enteric_tube": ("enteric tube", "nasogastric tube"),
}
_DEVICE_DETAIL = {
    "endotracheal_tube": "{} terminates above the carina",
    "central_line": "{} terminates in the distal SVC",
    "pacemaker": "{} with leads in the right atrium and right ventricle",
    "enteric_tube": "{} courses below the diaphragm with the tip in the stomach",
}


def _devices(f: Finding, rng: np.random.Generator) -> list[str]:
    names = {d: _choose(rng, _DEVICE_NAMES[d]) for d in DEVICES if d in f.devices}
    if rng.random() < 0.5:
        return [_sentence(_DEVICE_DETAIL[d].format(n)) for d, n in names.items()]
    verb = "is" if len(names) == 1 else "are"
    listed = _join(list(names.values()), "and")
    return [_sentence(_choose(rng, (f"{listed} in place", f"{listed} {verb} in standard position")))]


# ---------------------------------------------------------------------------------------
# Absent findings
# ---------------------------------------------------------------------------------------

# Nouns that radiologists fold into one negated list ("No focal consolidation, pleural
# effusion, or pneumothorax."), in the order they are usually written.
_LISTABLE = {
    "Consolidation": ("focal consolidation", "consolidation"),
    "Lung Opacity": ("focal airspace opacity", "focal opacity"),
    "Pleural Effusion": ("pleural effusion",),
    "Edema": ("pulmonary edema",),
    "Pneumothorax": ("pneumothorax",),
}
_SINGLE = {
    "Pneumothorax": ("no pneumothorax", "there is no pneumothorax", "no evidence of pneumothorax",
                     "no pneumothorax is seen", "no pneumothorax is identified"),
    "Pleural Effusion": ("no pleural effusion", "there is no pleural effusion", "no pleural effusions",
                         "no evidence of pleural effusion"),
    "Consolidation": ("no focal consolidation", "there is no focal consolidation", "no consolidation",
                      "no evidence of consolidation"),
    "Lung Opacity": ("no focal airspace opacity", "no focal opacity", "no airspace opacities"),
    "Edema": ("no pulmonary edema", "there is no pulmonary edema", "no evidence of pulmonary edema",
              "no overt pulmonary edema"),
    "Pneumonia": ("no evidence of pneumonia", "no radiographic evidence of pneumonia", "no pneumonia"),
    "Atelectasis": ("no atelectasis", "no evidence of atelectasis"),
    "Lung Lesion": ("no suspicious pulmonary nodules", "no pulmonary nodules or masses", "no focal pulmonary nodule"),
    "Cardiomegaly": ("heart size is normal", "the heart is normal in size", "normal heart size",
                     "the heart is not enlarged", "no cardiomegaly"),
    "Enlarged Cardiomediastinum": ("mediastinal contours are normal", "the mediastinal silhouette is within normal limits",
                                   "normal mediastinal contours", "the mediastinal contours are unremarkable"),
    "Fracture": ("no acute displaced rib fracture", "no displaced fracture is seen", "no acute fracture",
                 "no rib fractures are identified"),
    "Pleural Other": ("no pleural thickening",),
    "Support Devices": ("no lines or tubes are present",),
}
_HEART_AND_MEDIASTINUM = ("heart size and mediastinal contours are normal",
                          "the cardiomediastinal silhouette is within normal limits",
                          "normal cardiomediastinal silhouette",
                          "the cardiac and mediastinal silhouettes are unremarkable")


def _negated_list(names: list[str], rng: np.random.Generator) -> str:
    nouns = [_choose(rng, _LISTABLE[n]) for n in names]
    listed = _join(nouns, "or")
    verb = _choose(rng, ("is seen", "is identified"))
    return _sentence(_choose(rng, (f"no {listed}", f"there is no {listed}", f"no evidence of {listed}",
                                   f"no {listed} {verb}")))


def _negations(absent: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    """Negation sentences for the chosen absent findings, grouped by report section."""
    out: dict[str, list[str]] = {"lungs": [], "heart": [], "bones": [], "devices": []}
    pending = [n for n in FINDINGS if n in absent]
    listable = [n for n in pending if n in _LISTABLE]
    if len(listable) >= 2 and rng.random() < 0.7:
        out["lungs"].append(_negated_list(listable, rng))
        pending = [n for n in pending if n not in listable]
    if "Cardiomegaly" in pending and "Enlarged Cardiomediastinum" in pending and rng.random() < 0.7:
        out["heart"].append(_sentence(_choose(rng, _HEART_AND_MEDIASTINUM)))
        pending = [n for n in pending if n not in ("Cardiomegaly", "Enlarged Cardiomediastinum")]
    for name in pending:
        section = {"Cardiomegaly": "heart", "Enlarged Cardiomediastinum": "heart", "Fracture": "bones",
                   "Support Devices": "devices"}.get(name, "lungs")
        out[section].append(_sentence(_choose(rng, _SINGLE[name])))
    return out


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------

_PARENCHYMA = ("Lung Opacity", "Consolidation", "Pneumonia", "Atelectasis", "Edema", "Lung Lesion")
_IMPRESSION_ORDER = ("Pneumothorax", "Pleural Effusion", "Consolidation", "Pneumonia", "Edema", "Lung Opacity",
                     "Lung Lesion", "Cardiomegaly", "Enlarged Cardiomediastinum", "Atelectasis", "Fracture",
                     "Pleural Other", "Support Devices")
_DEVICE_SUMMARIES = ("Support lines and tubes as described above.", "Lines and tubes in standard position.")
_NORMAL_IMPRESSIONS = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                       "No acute intrathoracic process.", "No acute cardiopulmonary disease.")


def _same_place(a: Finding | None, b: Finding | None) -> bool:
    return a is not None and b is not None and (a.side, a.zone) == (b.side, b.zone)


def _describe(spec: PhantomSpec, rng: np.random.Generator) -> dict[str, list[str]]:
    """Sentences for the present findings, keyed by finding name."""
    pneumonia_with_consolidation = _same_place(spec.get("Consolidation"), spec.get("Pneumonia"))
    out: dict[str, list[str]] = {}
    for f in spec.findings:
        if f.name == "Consolidation":
            out[f.name] = [_consolidation(f, rng, pneumonia_with_consolidation)]
        elif f.name == "Pneumonia":
            out[f.name] = [] if pneumonia_with_consolidation else [_pneumonia(f, rng)]
        elif f.name == "Support Devices":
            out[f.name] = _devices(f, rng)
        else:
            out[f.name] = [_DESCRIBERS[f.name](f, rng)]
    return out


_DESCRIBERS = {
    "Lung Opacity": _lung_opacity, "Atelectasis": _atelectasis, "Edema": _edema, "Lung Lesion": _lesion,
    "Pneumothorax": _pneumothorax, "Pleural Effusion": _effusion, "Pleural Other": _pleural_other,
    "Fracture": _fracture, "Cardiomegaly": _cardiomegaly, "Enlarged Cardiomediastinum": _widened_mediastinum,
}


def _as_generator(rng: np.random.Generator | Seed) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else rng_stream("report", rng)


def write_report(spec: PhantomSpec, rng: np.random.Generator | Seed = 0,
                 negation_rates_override: Mapping[str, float] | None = None) -> Report:
    """FINDINGS and IMPRESSION for ``spec``; deterministic for a given seed (or generator state).

    Each absent finding is negated with its CheXpert rate P(label 0 | not present), taken
    from normal or abnormal studies to match ``spec`` (``negation_rates_override`` replaces
    them, e.g. ``dict.fromkeys(FINDINGS, 1.0)`` to negate every absent finding).
    """
    rng = _as_generator(rng)
    rates = dict(negation_rates(spec.is_normal))
    if negation_rates_override is not None:
        rates.update(negation_rates_override)
    absent = [n for n in FINDINGS if not spec.has(n) and rng.random() < rates.get(n, 0.0)]
    present = _describe(spec, rng)
    negated = _negations(absent, rng)

    # Findings section in the usual reading order: lines and tubes, lungs, pleura, heart, bones.
    body: list[str] = list(present.get("Support Devices", [])) + negated["devices"]
    for name in _PARENCHYMA:
        body += present.get(name, [])
    if not any(spec.has(n) for n in _PARENCHYMA) and rng.random() < 0.6:
        body.append(_choose(rng, ("The lungs are clear.", "Lungs are clear bilaterally.",
                                  "The lungs are well expanded and clear.")))
    moved: list[str] = []  # a negated pneumothorax often closes an abnormal impression instead
    lung_negations = negated["lungs"]
    if not spec.is_normal and rng.random() < 0.3:
        moved = [s for s in lung_negations if s.lower().rstrip(".") in _SINGLE["Pneumothorax"]]
    body += [s for s in lung_negations if s not in moved]
    for name in ("Pleural Effusion", "Pneumothorax", "Pleural Other", "Cardiomegaly", "Enlarged Cardiomediastinum"):
        body += present.get(name, [])
    body += negated["heart"]
    body += present.get("Fracture", []) + negated["bones"]
    if not spec.has("Fracture") and "Fracture" not in absent and rng.random() < 0.3:
        body.append(_choose(rng, ("No acute osseous abnormality.", "The osseous structures are intact.")))

    impression = _impression(spec, rng) + moved
    return Report(findings=" ".join(body), impression=" ".join(impression),
                  mentioned_absent=tuple(n for n in FINDINGS if n in absent))


def _impression(spec: PhantomSpec, rng: np.random.Generator) -> list[str]:
    if spec.is_normal:
        lines = [_choose(rng, _NORMAL_IMPRESSIONS if spec.findings or rng.random() < 0.8
                         else ("Normal chest radiograph.",))]
        if spec.findings:
            lines.append(_choose(rng, _DEVICE_SUMMARIES))
        return lines
    brief = _describe(spec, rng)
    items = [s for name in _IMPRESSION_ORDER if name != "Support Devices" for s in brief.get(name, [])]
    if len(items) >= 2 and rng.random() < 0.4:
        return [f"{i}. {s}" for i, s in enumerate(items, 1)]
    return items


def split_sentences(text: str) -> list[str]:
    """Sentences of report text, without list numbering ("1. ")."""
    parts = re.split(r"(?<=\.)\s+", text.strip())
    parts = [p.strip() for p in parts if p.strip() and not re.fullmatch(r"\d+\.", p.strip())]
    return [re.sub(r"^\d+\.\s+", "", p) for p in parts]


def _restates_findings(sentence: str) -> bool:
    """Whether an impression sentence only repeats a positive statement of the findings section
    (normal impressions, device summaries and negations add information and are kept)."""
    low = sentence.lower().rstrip(".")
    keep = {s.lower().rstrip(".") for s in (*_NORMAL_IMPRESSIONS, *_DEVICE_SUMMARIES, "Normal chest radiograph.")}
    negations = {s for options in _SINGLE.values() for s in options}
    return low not in keep and low not in negations


def report_caption(report: Report, max_words: int = 60) -> str:
    """A short caption for CLIP-style training: the findings sentences, then impression
    sentences that add to them, cut at a sentence boundary to at most ``max_words`` words."""
    sentences = split_sentences(report.findings)
    sentences += [s for s in split_sentences(report.impression) if not _restates_findings(s) and s not in sentences]
    if not sentences:  # hand-made reports may have everything in the impression
        sentences = split_sentences(report.impression)
    words_used = 0
    kept: list[str] = []
    for s in sentences:
        n = len(s.split())
        if words_used + n > max_words:
            if not kept:
                kept.append(" ".join(s.split()[:max_words]))
            break
        kept.append(s)
        words_used += n
    return " ".join(kept)
