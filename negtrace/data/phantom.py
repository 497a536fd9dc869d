"""Procedural frontal (PA) chest-radiograph phantoms with controllable CheXpert findings.

Every image is drawn from a :class:`PhantomSpec` (which findings are present, with which
attributes) and an integer seed (the patient's anatomy, textures and noise). Rendering is
vectorised numpy on a millimetre grid; the result is a float32 image in [0, 1] that reads like a
radiograph: dense structures (bone, heart, fluid) bright, aerated lung dark.

Conventions
    * Sides are the patient's. On a PA radiograph the patient's right is on the image's left.
    * Geometry is in millimetres over a square field of view of :data:`FOV_MM`; the image size
      only sets the sampling, so one spec and seed give the same anatomy at every size (only
      the pixel noise differs).
    * Random streams are keyed by purpose (anatomy, noise, each finding), so adding or removing
      one finding changes nothing outside that finding's region: :func:`render_pair` relies on it.

Finding prevalences and co-occurrences come from the CheXpert training labels (Irvin et al.,
AAAI 2019), summarised in ``resources/chexpert_stats.json`` (see ``resources/README.md``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Bool, Float

from negtrace.data.findings import FINDINGS, LABEL_COLUMNS, NO_FINDING, check_finding

__all__ = [
    "CTR_THRESHOLD",
    "DEVICES",
    "FOV_MM",
    "GENERATOR_VERSION",
    "CHEXPERT_COLUMNS",
    "SEVERITIES",
    "SIDES",
    "SIZES",
    "ZONES",
    "Finding",
    "PhantomSpec",
    "DatasetSummary",
    "load_chexpert_stats",
    "PairwiseMaxEnt",
    "fit_pairwise_maxent",
    "rng_stream",
    "Seed",
    "finding_model",
    "sample_specs",
    "render",
    "render_pair",
    "finding_region",
    "anatomy_masks",
    "chexpert_labels",
    "label_row",
    "coarse_attributes",
    "build_phantom_dataset",
]

GENERATOR_VERSION = 1  # bump when rendering changes, so resumed datasets re-render
FOV_MM = 380.0  # a 14x17 inch cassette is 356x432 mm; the thorax fills ~3/4 of the width
# Cardiomegaly: cardiothoracic ratio above 0.5 on a PA film (Danzer, Am J Med Sci 1919).
CTR_THRESHOLD = 0.5
# A mediastinum wider than 8 cm on a frontal film is conventionally called widened.
WIDE_MEDIASTINUM_MM = 80.0

SIDES: tuple[str, ...] = ("left", "right", "bilateral")
ONE_SIDE: tuple[str, ...] = ("left", "right")
ZONES: tuple[str, ...] = ("upper", "middle", "lower")
SIZES: tuple[str, ...] = ("small", "moderate", "large")
SEVERITIES: tuple[str, ...] = ("mild", "moderate", "severe")
DEVICES: tuple[str, ...] = ("endotracheal_tube", "central_line", "pacemaker", "enteric_tube")
SEXES: tuple[str, ...] = ("Female", "Male")

# CheXpert train.csv header (Irvin et al. 2019).
CHEXPERT_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABEL_COLUMNS)


# ---------------------------------------------------------------------------------------
# Findings and specs
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Choice:
    options: tuple[str, ...]
    required: bool = True

    def check(self, where: str, value: Any) -> None:
        if value not in self.options:
            raise ValueError(f"{where} must be one of {', '.join(self.options)}; got {value!r}")


@dataclass(frozen=True)
class _Range:
    lo: float
    hi: float
    lo_open: bool = False
    integer: bool = False
    required: bool = True
    why: str = ""

    def check(self, where: str, value: Any) -> None:
        kind = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{where} must be {'an integer' if self.integer else 'a number'}; got {value!r}")
        too_low = value <= self.lo if self.lo_open else value < self.lo
        if too_low or value > self.hi or not np.isfinite(value):
            bracket = "(" if self.lo_open else "["
            raise ValueError(f"{where} must be in {bracket}{self.lo}, {self.hi}]{self.why}; got {value!r}")


@dataclass(frozen=True)
class _Subset:
    options: tuple[str, ...]
    required: bool = True

    def check(self, where: str, value: Any) -> None:
        if not isinstance(value, tuple) or not value:
            raise ValueError(f"{where} must be a non-empty tuple of {', '.join(self.options)}; got {value!r}")
        bad = [v for v in value if v not in self.options]
        if bad or len(set(value)) != len(value):
            raise ValueError(f"{where} must list distinct items of {', '.join(self.options)}; got {value!r}")


_LOCATED = {"side": _Choice(SIDES), "zone": _Choice(ZONES), "size": _Choice(SIZES)}
# Which attributes each finding takes; any other attribute given is an error.
_SCHEMA: dict[str, dict[str, Any]] = {
    "Enlarged Cardiomediastinum": {
        "width_mm": _Range(WIDE_MEDIASTINUM_MM, 160.0, lo_open=True, why=" (a mediastinum > 8 cm is widened)")},
    "Cardiomegaly": {"ctr": _Range(CTR_THRESHOLD, 0.8, lo_open=True, why=" (cardiomegaly means CTR > 0.5)")},
    "Lung Opacity": dict(_LOCATED),
    "Lung Lesion": {"side": _Choice(ONE_SIDE), "zone": _Choice(ZONES), "diameter_mm": _Range(4.0, 80.0)},
    "Edema": {"severity": _Choice(SEVERITIES)},
    "Consolidation": dict(_LOCATED),
    "Pneumonia": dict(_LOCATED),
    "Atelectasis": {"side": _Choice(SIDES), "zone": _Choice(ZONES)},
    "Pneumothorax": {"side": _Choice(SIDES), "size": _Choice(SIZES)},
    "Pleural Effusion": {"side": _Choice(SIDES), "size": _Choice(SIZES)},
    "Pleural Other": {"side": _Choice(SIDES)},
    "Fracture": {"side": _Choice(ONE_SIDE), "rib": _Range(3, 9, integer=True, required=False)},
    "Support Devices": {"devices": _Subset(DEVICES)},
}
_ATTRIBUTES = ("side", "zone", "size", "severity", "ctr", "width_mm", "diameter_mm", "rib", "devices")


@dataclass(frozen=True)
class Finding:
    """One present finding and its attributes; which attributes apply depends on ``name``:

    * Enlarged Cardiomediastinum: ``width_mm`` (mediastinal width, > 80)
    * Cardiomegaly: ``ctr`` (cardiothoracic ratio, > 0.5)
    * Lung Opacity, Consolidation, Pneumonia: ``side``, ``zone``, ``size`` (extent)
    * Lung Lesion: ``side`` (left/right), ``zone``, ``diameter_mm``
    * Edema: ``severity``
    * Atelectasis: ``side``, ``zone``
    * Pneumothorax, Pleural Effusion: ``side``, ``size``
    * Pleural Other (pleural thickening): ``side``
    * Fracture: ``side`` (left/right), optional ``rib`` (3-9)
    * Support Devices: ``devices`` (a subset of :data:`DEVICES`)

    Sides are the patient's; anything impossible raises ``ValueError`` naming the problem.
    """

    name: str
    side: str | None = None
    zone: str | None = None
    size: str | None = None
    severity: str | None = None
    ctr: float | None = None
    width_mm: float | None = None
    diameter_mm: float | None = None
    rib: int | None = None
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_finding(self.name)
        if isinstance(self.devices, list):
            object.__setattr__(self, "devices", tuple(self.devices))
        schema = _SCHEMA[self.name]
        for attr in _ATTRIBUTES:
            value = getattr(self, attr)
            unset = value is None or value == ()
            if attr not in schema:
                if not unset:
                    takes = ", ".join(schema) or "no attributes"
                    raise ValueError(f"{self.name} takes no {attr!r} (it takes: {takes}); got {value!r}")
            elif unset:
                if schema[attr].required:
                    raise ValueError(f"{self.name} requires {attr!r}")
            else:
                schema[attr].check(f"{self.name} {attr}", value)

    def to_dict(self) -> dict[str, Any]:
        """The name and the attributes that are set (JSON-ready)."""
        out: dict[str, Any] = {"name": self.name}
        for attr in _ATTRIBUTES:
            value = getattr(self, attr)
            if value is not None and value != ():
                out[attr] = list(value) if attr == "devices" else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        data = dict(data)
        if "devices" in data:
            data["devices"] = tuple(data["devices"])
        return cls(**data)


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that is *meant* to be in one image: the present findings and the patient.

    ``heart_ctr`` and ``mediastinal_width_mm`` are the patient's normal baselines; a present
    Cardiomegaly or Enlarged Cardiomediastinum overrides them (see :attr:`ctr`).
    """

    findings: tuple[Finding, ...] = ()
    sex: str = "Male"
    age: int = 60
    heart_ctr: float = 0.44
    mediastinal_width_mm: float = 64.0

    def __post_init__(self) -> None:
        findings = tuple(self.findings)
        for f in findings:
            if not isinstance(f, Finding):
                raise TypeError(f"findings must be Finding objects; got {f!r}")
        object.__setattr__(self, "findings", tuple(sorted(findings, key=lambda f: FINDINGS.index(f.name))))
        names = [f.name for f in self.findings]
        if len(set(names)) != len(names):
            raise ValueError(f"a finding is listed twice: {names}")
        _Choice(SEXES).check("sex", self.sex)
        _Range(0, 100, integer=True).check("age", self.age)
        _Range(0.35, CTR_THRESHOLD, why=" (a normal heart; use a Cardiomegaly finding to enlarge it)").check(
            "heart_ctr", self.heart_ctr)
        _Range(45.0, WIDE_MEDIASTINUM_MM, why=" (normal; use Enlarged Cardiomediastinum to widen it)").check(
            "mediastinal_width_mm", self.mediastinal_width_mm)

    @classmethod
    def build(cls, findings: Mapping[str, Mapping[str, Any]] | Iterable[str] = (), **patient: Any) -> PhantomSpec:
        """Convenience: ``PhantomSpec.build({"Pleural Effusion": {"side": "left", "size": "small"}})``."""
        if isinstance(findings, Mapping):
            items = [Finding(name, **dict(attrs)) for name, attrs in findings.items()]
        else:
            items = [Finding(name) for name in findings]
        return cls(findings=tuple(items), **patient)

    @property
    def present(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.findings)

    def get(self, name: str) -> Finding | None:
        check_finding(name)
        return next((f for f in self.findings if f.name == name), None)

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def without(self, name: str) -> PhantomSpec:
        """The same patient with ``name`` absent."""
        check_finding(name)
        return replace(self, findings=tuple(f for f in self.findings if f.name != name))

    def with_finding(self, finding: Finding) -> PhantomSpec:
        """The same patient with ``finding`` added (replacing one of the same name)."""
        return replace(self, findings=(*self.without(finding.name).findings, finding))

    @property
    def ctr(self) -> float:
        """The cardiothoracic ratio the image is rendered with."""
        cardio = self.get("Cardiomegaly")
        return cardio.ctr if cardio is not None else self.heart_ctr

    @property
    def mediastinum_mm(self) -> float:
        """The mediastinal width the image is rendered with."""
        ecm = self.get("Enlarged Cardiomediastinum")
        return ecm.width_mm if ecm is not None else self.mediastinal_width_mm

    @property
    def is_normal(self) -> bool:
        """No finding present other than support devices (CheXpert's "No Finding" rule)."""
        return all(f.name == "Support Devices" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"findings": [f.to_dict() for f in self.findings], "sex": self.sex, "age": self.age,
                "heart_ctr": self.heart_ctr, "mediastinal_width_mm": self.mediastinal_width_mm}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhantomSpec:
        data = dict(data)
        data["findings"] = tuple(Finding.from_dict(f) for f in data.get("findings", ()))
        return cls(**data)


# ---------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------

Seed = int | Sequence[int]


def _seed_tuple(seed: Seed) -> tuple[int, ...]:
    items = (seed,) if isinstance(seed, (int, np.integer)) else tuple(seed)
    if not items or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in items):
        raise ValueError(f"seed must be a non-negative int or a sequence of them; got {seed!r}")
    return tuple(int(s) for s in items)


def rng_stream(purpose: str, seed: Seed, *index: int) -> np.random.Generator:
    """An independent random stream per purpose ("anatomy", "report", ...) and seed: the
    purpose tag leads the seed sequence, so streams of different purposes never collide."""
    tag = zlib.crc32(purpose.encode())
    return np.random.default_rng(np.random.SeedSequence([tag, *_seed_tuple(seed), *index]))


# ---------------------------------------------------------------------------------------
# Real label statistics and the finding co-occurrence model
# ---------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def load_chexpert_stats() -> dict[str, Any]:
    """The CheXpert label statistics shipped in ``resources/chexpert_stats.json``."""
    text = resources.files("negtrace.data").joinpath("resources/chexpert_stats.json").read_text()
    return json.loads(text)


def _state_matrix(n: int) -> np.ndarray:
    """All 2**n binary vectors, one per row (bit i of the row index is finding i)."""
    return ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float64)


_NON_DEVICE = np.array([name != "Support Devices" for name in FINDINGS])


def _features(states: np.ndarray) -> np.ndarray:
    """Single, pairwise and "no finding" indicator features of each state."""
    n = states.shape[1]
    iu = np.triu_indices(n, 1)
    pairs = states[:, iu[0]] * states[:, iu[1]]
    none = (states[:, _NON_DEVICE] == 0).all(axis=1, keepdims=True).astype(np.float64)
    return np.concatenate([states, pairs, none], axis=1)


@dataclass(frozen=True)
class PairwiseMaxEnt:
    """Maximum-entropy distribution over present/absent vectors of the 13 findings that matches
    given prevalences, pairwise co-occurrences and the rate of "nothing but devices present".

    ``log p(x) = h.x + sum_{i<j} J_ij x_i x_j + g [x has no non-device finding] - log Z``; with
    13 findings the 8192 states are enumerated exactly, so fitting and sampling are exact.
    """

    h: tuple[float, ...]
    J: tuple[tuple[float, ...], ...]
    g: float

    def log_probs(self) -> np.ndarray:
        states = _state_matrix(len(FINDINGS))
        J = np.array(self.J)
        iu = np.triu_indices(len(FINDINGS), 1)
        theta = np.concatenate([np.array(self.h), J[iu], [self.g]])
        logits = _features(states) @ theta
        return logits - _logsumexp(logits)

    def probs(self) -> np.ndarray:
        return np.exp(self.log_probs())

    def marginals(self) -> np.ndarray:
        return self.probs() @ _state_matrix(len(FINDINGS))

    def with_prevalence(self, prevalence: Mapping[str, float]) -> PairwiseMaxEnt:
        """Refit the single-finding terms to new prevalences, keeping the interactions."""
        target = self.marginals()
        for name, p in prevalence.items():
            check_finding(name)
            if not 0.0 < p < 1.0:
                raise ValueError(f"prevalence of {name} must be in (0, 1); got {p!r}")
            target[FINDINGS.index(name)] = p
        states = _state_matrix(len(FINDINGS))
        base = self.log_probs()[:, None]  # fixed interaction part (h enters through states)
        fixed = base.ravel() - states @ np.array(self.h)
        h = _newton(states, target, offset=fixed, init=np.array(self.h))
        return replace(self, h=tuple(h.tolist()))


def _logsumexp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def _newton(features: np.ndarray, target: np.ndarray, offset: np.ndarray | float = 0.0,
            init: np.ndarray | None = None, tol: float = 1e-11, max_iter: int = 200) -> np.ndarray:
    """Maximise theta.target - log sum_s exp(features_s.theta + offset_s) (a concave problem)."""
    theta = np.zeros(features.shape[1]) if init is None else init.astype(np.float64).copy()

    def objective(th: np.ndarray) -> tuple[float, np.ndarray]:
        logits = features @ th + offset
        lz = _logsumexp(logits)
        return float(th @ target - lz), np.exp(logits - lz)

    value, p = objective(theta)
    for _ in range(max_iter):
        mean = p @ features
        grad = target - mean
        if np.abs(grad).max() < tol:
            break
        hess = (features * p[:, None]).T @ features - np.outer(mean, mean)
        step = np.linalg.solve(hess + 1e-12 * np.eye(len(theta)), grad)
        t = 1.0
        while t > 1e-8:
            new_value, new_p = objective(theta + t * step)
            if new_value >= value - 1e-15:
                break
            t *= 0.5
        theta, value, p = theta + t * step, new_value, new_p
    return theta


def fit_pairwise_maxent(prevalence: Sequence[float], cooccurrence: Sequence[Sequence[float]],
                        none_rate: float) -> PairwiseMaxEnt:
    """Fit :class:`PairwiseMaxEnt` to P(x_i=1) (``prevalence``), P(x_i=1, x_j=1)
    (``cooccurrence``, 13x13) and P(no non-device finding) (``none_rate``)."""
    n = len(FINDINGS)
    co = np.asarray(cooccurrence, dtype=np.float64)
    iu = np.triu_indices(n, 1)
    target = np.concatenate([np.asarray(prevalence, dtype=np.float64), co[iu], [none_rate]])
    theta = _newton(_features(_state_matrix(n)), target)
    J = np.zeros((n, n))
    J[iu] = theta[n:-1]
    return PairwiseMaxEnt(h=tuple(theta[:n].tolist()), J=tuple(map(tuple, J.tolist())), g=float(theta[-1]))


@lru_cache(maxsize=1)
def _real_model() -> PairwiseMaxEnt:
    fit = load_chexpert_stats()["maxent"]
    return PairwiseMaxEnt(h=tuple(fit["h"]), J=tuple(map(tuple, fit["J"])), g=float(fit["g"]))


def finding_model(prevalence: Mapping[str, float] | float | None = None) -> PairwiseMaxEnt:
    """The co-occurrence model of CheXpert, optionally with some prevalences overridden
    (a float overrides all 13)."""
    model = _real_model()
    if prevalence is None:
        return model
    if isinstance(prevalence, (int, float)):
        prevalence = dict.fromkeys(FINDINGS, float(prevalence))
    return model.with_prevalence(prevalence)


# ---------------------------------------------------------------------------------------
# Sampling specs
# ---------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float]) -> Any:
    w = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def _sample_location(rng: np.random.Generator, zone_w=(0.2, 0.25, 0.55)) -> dict[str, str]:
    return {"side": _pick(rng, SIDES, (0.35, 0.4, 0.25)), "zone": _pick(rng, ZONES, zone_w),
            "size": _pick(rng, SIZES, (0.45, 0.4, 0.15))}


def _sample_finding(name: str, rng: np.random.Generator, present: frozenset[str]) -> dict[str, Any]:
    """Plausible attributes of one present finding (rough clinical frequencies)."""
    if name == "Enlarged Cardiomediastinum":
        return {"width_mm": round(float(rng.uniform(85.0, 125.0)), 1)}
    if name == "Cardiomegaly":
        return {"ctr": round(float(rng.uniform(0.55, 0.70)), 3)}
    if name in ("Lung Opacity", "Consolidation", "Pneumonia"):
        return _sample_location(rng)
    if name == "Lung Lesion":
        # Nodules dominate; diameters roughly log-normal around 1.5 cm.
        return {"side": _pick(rng, ONE_SIDE, (0.45, 0.55)), "zone": _pick(rng, ZONES, (0.5, 0.3, 0.2)),
                "diameter_mm": round(float(np.clip(rng.lognormal(np.log(15.0), 0.5), 5.0, 60.0)), 1)}
    if name == "Edema":
        return {"severity": _pick(rng, SEVERITIES, (0.45, 0.4, 0.15))}
    if name == "Atelectasis":
        return {"side": _pick(rng, SIDES, (0.3, 0.3, 0.4)), "zone": _pick(rng, ZONES, (0.05, 0.25, 0.7))}
    if name == "Pneumothorax":
        return {"side": _pick(rng, SIDES, (0.48, 0.48, 0.04)), "size": _pick(rng, SIZES, (0.55, 0.3, 0.15))}
    if name == "Pleural Effusion":
        # Effusions in heart failure are usually bilateral.
        bilateral = 0.6 if ("Edema" in present or "Cardiomegaly" in present) else 0.35
        side = _pick(rng, SIDES, (0.4 * (1 - bilateral), 0.6 * (1 - bilateral), bilateral))
        return {"side": side, "size": _pick(rng, SIZES, (0.5, 0.35, 0.15))}
    if name == "Pleural Other":
        return {"side": _pick(rng, SIDES, (0.4, 0.4, 0.2))}
    if name == "Fracture":
        return {"side": _pick(rng, ONE_SIDE, (0.5, 0.5)), "rib": int(rng.integers(3, 10))}
    if name == "Support Devices":
        devices = tuple(d for d, p in zip(DEVICES, (0.45, 0.7, 0.2, 0.35), strict=True) if rng.random() < p)
        return {"devices": devices or (_pick(rng, DEVICES, (0.45, 0.7, 0.2, 0.35)),)}
    raise AssertionError(name)


def _sample_patient(rng: np.random.Generator) -> dict[str, Any]:
    stats = load_chexpert_stats()
    sex = _pick(rng, SEXES, [stats["sex"][s] for s in SEXES])
    edges, freq = stats["age"]["edges"], stats["age"]["freq"]
    k = int(rng.choice(len(freq), p=np.asarray(freq) / np.sum(freq)))
    age = int(rng.integers(max(18, edges[k]), max(19, edges[k + 1])))
    return {"sex": sex, "age": age, "heart_ctr": round(float(rng.uniform(0.38, 0.48)), 3),
            "mediastinal_width_mm": round(float(rng.uniform(55.0, 72.0)), 1)}


def sample_specs(n: int, seed: Seed = 0, prevalence: Mapping[str, float] | float | None = None) -> list[PhantomSpec]:
    """Draw ``n`` specs whose findings follow CheXpert's prevalences and pairwise co-occurrences.

    Which findings are present is drawn from :class:`PairwiseMaxEnt` fitted to the real labels
    (``prevalence`` overrides marginals and keeps the interactions); attributes are then drawn
    per finding. Spec ``i`` depends only on ``(seed, i)``, so a longer list extends a shorter one.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    cdf = np.cumsum(finding_model(prevalence).probs())
    cdf /= cdf[-1]
    specs = []
    for i in range(n):
        rng = rng_stream("spec", seed, i)
        state = int(np.searchsorted(cdf, rng.random(), side="right"))
        present = frozenset(name for b, name in enumerate(FINDINGS) if state >> b & 1)
        findings = {name: _sample_finding(name, rng, present) for name in FINDINGS if name in present}
        if "Pneumonia" in findings and "Consolidation" in findings:
            # One airspace process described twice ("consolidation consistent with pneumonia").
            findings["Pneumonia"] = dict(findings["Consolidation"])
        specs.append(PhantomSpec.build(findings, **_sample_patient(rng)))
    return specs


# ---------------------------------------------------------------------------------------
# Rendering primitives
# ---------------------------------------------------------------------------------------

F32 = np.float32


def _smoothstep(e0: float | np.ndarray, e1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    """0 below e0, 1 above e1, C1 in between (exactly 0/1 outside: finding supports stay compact)."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _tube(d: np.ndarray, half: float | np.ndarray) -> np.ndarray:
    """Projected density of a cylinder of radius ``half`` at distance ``d`` from its axis."""
    return np.sqrt(np.clip(1.0 - (d / half) ** 2, 0.0, None))


@lru_cache(maxsize=64)
def _upsample_weights(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index and smoothstep weight of each pixel centre, for a ``cells``-cell lattice."""
    pos = (np.arange(size) + 0.5) / size * cells
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    t = pos - i0
    return i0, (t * t * (3 - 2 * t)).astype(F32)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Smoothly interpolate a (c+1, c+1) lattice onto a (size, size) image (no BLAS: tiny
    matrix products are slower than gathers when threads compete for two cores)."""
    i0, t = _upsample_weights(size, grid.shape[0] - 1)
    rows = grid[i0] * (1 - t[:, None]) + grid[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t[None, :]) + rows[:, i0 + 1] * t[None, :]


def _noise(rng: np.random.Generator, size: int, cells: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Smooth multi-octave value noise, zero-mean, roughly unit variance."""
    out = np.zeros((size, size), dtype=F32)
    for c, w in zip(cells, weights, strict=True):
        out += F32(w) * _upsample(rng.standard_normal((c + 1, c + 1)).astype(F32), size)
    return out / F32(np.sqrt(np.sum(np.square(weights))) * 0.75)


def _segment_distance(x: np.ndarray, y: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance (mm) from every grid point to a polyline ``pts`` (k, 2) of (x, y) vertices."""
    a, b = pts[:-1, :, None, None].astype(F32), pts[1:, :, None, None].astype(F32)
    ab = b - a
    px, py = x[None] - a[:, 0], y[None] - a[:, 1]
    t = np.clip((px * ab[:, 0] + py * ab[:, 1]) / np.maximum((ab**2).sum(axis=1), F32(1e-9)), 0.0, 1.0)
    return np.sqrt(((px - t * ab[:, 0]) ** 2 + (py - t * ab[:, 1]) ** 2).min(axis=0))


def _polyline_tube(f: _Frame, pts: np.ndarray, half: float) -> np.ndarray:
    """A tube of radius ``half`` along a polyline, evaluated only in its bounding box."""
    out = np.zeros((f.size, f.size), dtype=F32)
    offset = np.array([FOV_MM / 2, 0.0])
    lo = np.floor((pts.min(axis=0) + offset - half) / f.px).astype(int) - 1
    hi = np.ceil((pts.max(axis=0) + offset + half) / f.px).astype(int) + 1
    lo_x, hi_x = (int(np.clip(v, 0, f.size)) for v in (lo[0], hi[0]))
    lo_y, hi_y = (int(np.clip(v, 0, f.size)) for v in (lo[1], hi[1]))
    if lo_x >= hi_x or lo_y >= hi_y:
        return out
    d = _segment_distance(f.x[:, lo_x:hi_x], f.y[lo_y:hi_y], pts)
    out[lo_y:hi_y, lo_x:hi_x] = _tube(d, F32(half))
    return out


def _smooth_polyline(pts: Sequence[tuple[float, float]], n: int = 24) -> np.ndarray:
    """Catmull-Rom curve through the control points, as an ``n``-vertex polyline."""
    p = np.asarray(pts, dtype=np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    segs = len(p) - 3
    s = np.linspace(0, segs, n)
    k = np.minimum(s.astype(int), segs - 1)
    t = (s - k)[:, None]
    p0, p1, p2, p3 = p[k], p[k + 1], p[k + 2], p[k + 3]
    return 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)


# ---------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------

_HEART_BASE = 0.55  # lower half-height of the heart relative to the upper one
_PATIENT_SIDE = {"right": 0, "left": 1}  # index 0 = image left = patient right
_SIGN = (-1.0, 1.0)


def _side_indices(side: str) -> tuple[int, ...]:
    return (0, 1) if side == "bilateral" else (_PATIENT_SIDE[side],)


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient geometry (mm) and exposure, drawn from the seed; index 0 = patient right."""

    x_mid: float
    half_width: tuple[float, float]
    y_apex: float
    u_apex: tuple[float, float]
    y_dome: tuple[float, float]
    y_cp: tuple[float, float]
    u_dome: tuple[float, float]
    y_carina: float
    trachea_half: float
    heart_b: float
    heart_right_frac: float
    heart_shear: float
    heart_p: float
    knob_r: float
    rib_v0: float
    rib_spacing: float
    rib_growth: float
    rib_arch: tuple[float, float]
    rib_half: float
    chest_wall: float
    bone: float
    gastric_bubble: bool
    breasts: bool
    gamma: float
    contrast: float
    offset: float
    noise_sigma: float

    @property
    def thoracic_width(self) -> float:
        """Widest internal thoracic diameter (inner rib margins), the CTR denominator."""
        return self.half_width[0] + self.half_width[1]

    @property
    def heart_cy(self) -> float:
        """Height of the heart's widest row, just above the right hemidiaphragm."""
        return self.y_dome[0] - 0.15 * self.heart_b


def _sample_anatomy(seed: Seed, sex: str, age: int) -> _Anatomy:
    rng = rng_stream("anatomy", seed)
    scale = 1.0 if sex == "Male" else 0.93
    w = 140.0 * scale * rng.uniform(0.93, 1.07)
    asym = rng.uniform(-0.03, 0.03)
    y_apex = rng.normal(58.0, 5.0)
    height = rng.uniform(185.0, 215.0) * scale
    y_dome_r = y_apex + height
    y_dome_l = y_dome_r + rng.uniform(5.0, 20.0)  # the left hemidiaphragm usually sits lower
    cp_depth = rng.uniform(28.0, 42.0)
    return _Anatomy(
        x_mid=float(rng.normal(0.0, 3.0)),
        half_width=(w * (1 + asym), w * (1 - asym)),
        y_apex=float(y_apex),
        u_apex=(w * rng.uniform(0.38, 0.46), w * rng.uniform(0.38, 0.46)),
        y_dome=(float(y_dome_r), float(y_dome_l)),
        y_cp=(float(y_dome_r + cp_depth), float(y_dome_l + cp_depth * rng.uniform(0.9, 1.1))),
        u_dome=(w * rng.uniform(0.4, 0.5), w * rng.uniform(0.4, 0.5)),
        y_carina=float(y_apex + rng.uniform(62.0, 78.0) * scale),
        trachea_half=float(rng.uniform(7.0, 9.0) * scale),
        heart_b=float(rng.uniform(75.0, 90.0) * scale),
        heart_right_frac=float(rng.uniform(0.28, 0.36)),
        heart_shear=float(rng.uniform(0.05, 0.2)),
        heart_p=float(rng.uniform(2.0, 2.4)),
        knob_r=float(rng.uniform(12.0, 16.0)),
        rib_v0=float(y_apex - rng.uniform(6.0, 12.0)),
        rib_spacing=float(height / rng.uniform(8.6, 9.4)),
        rib_growth=float(rng.uniform(0.0, 0.04)),
        rib_arch=(float(rng.uniform(50.0, 62.0)), float(rng.uniform(58.0, 72.0))),
        rib_half=float(rng.uniform(5.0, 6.2) * scale),
        chest_wall=float(rng.uniform(18.0, 30.0)),
        bone=float(rng.uniform(0.85, 1.1) * (1.0 - 0.002 * max(age - 50, 0))),
        gastric_bubble=bool(rng.random() < 0.7),
        breasts=sex == "Female",
        gamma=float(rng.uniform(0.85, 1.15)),
        contrast=float(rng.uniform(0.9, 1.1)),
        offset=float(rng.normal(0.0, 0.025)),
        noise_sigma=float(rng.uniform(0.006, 0.016)),
    )


@dataclass
class _Frame:
    """The pixel grid in mm plus per-side lung geometry, shared by anatomy and findings."""

    size: int
    px: float
    x: np.ndarray  # (1, S) mm from image centre, + = image right (patient left)
    y: np.ndarray  # (S, 1) mm from the top
    anat: _Anatomy
    ctr: float  # rendered heart and mediastinum ...
    mediastinum_mm: float
    ref_ctr: float  # ... and the patient's normal ones, which findings are placed against
    ref_mediastinum_mm: float
    u: list[np.ndarray] = field(default_factory=list)  # per side: distance from midline (1, S)
    t: list[np.ndarray] = field(default_factory=list)  # per side: 0 at apex, 1 at costophrenic angle (S, 1)
    lateral: list[np.ndarray] = field(default_factory=list)  # lateral lung edge u (S, 1)
    medial: list[np.ndarray] = field(default_factory=list)  # medial lung edge u without heart (S, 1)
    diaphragm: list[np.ndarray] = field(default_factory=list)  # diaphragm y over u (1, S)
    lung_base: list[np.ndarray] = field(default_factory=list)  # soft lung mask before heart (S, S)
    heart: np.ndarray | None = None
    mediastinum: np.ndarray | None = None

    def soft(self, sd: np.ndarray) -> np.ndarray:
        """Anti-aliased inside-mask of a signed distance (mm, + inside)."""
        return _smoothstep(-0.7 * self.px, 0.7 * self.px, sd)

    def lung_height(self, k: int) -> float:
        return self.anat.y_dome[k] - self.anat.y_apex

    def heart_half_widths(self, ctr: float) -> tuple[float, float]:
        w = ctr * self.anat.thoracic_width
        return w * self.anat.heart_right_frac, w * (1 - self.anat.heart_right_frac)

    # Findings are placed against the patient's normal heart and mediastinum, so that
    # enlarging either (a finding itself) moves nothing else: render_pair relies on it.
    def heart_edge(self, k: int, y: float | np.ndarray) -> np.ndarray:
        """How far the normal heart reaches from the midline towards side ``k`` at height(s) ``y``."""
        a = self.anat
        y = np.asarray(y, dtype=np.float64)
        dy = np.abs(y - a.heart_cy) / np.where(y < a.heart_cy, a.heart_b, _HEART_BASE * a.heart_b)
        reach = self.heart_half_widths(self.ref_ctr)[k] * np.clip(1 - dy**a.heart_p, 0.0, None) ** (1 / a.heart_p)
        return np.where(dy < 1, np.maximum(0.0, reach + _SIGN[k] * a.heart_shear * (y - a.heart_cy)), 0.0)

    def medial_edge(self, k: int, y: float | np.ndarray) -> np.ndarray:
        """The medial border of lung ``k`` at height(s) ``y`` (normal mediastinum, heart or apex)."""
        y = np.asarray(y, dtype=np.float64)
        i = np.clip(np.rint(y / self.px - 0.5).astype(int), 0, self.size - 1)
        med = np.where(y < self.anat.heart_cy, self.ref_mediastinum_mm * (0.45, 0.55)[k], 0.0)
        return np.maximum.reduce([self.medial[k][i, 0], self.heart_edge(k, y), med])

    def lateral_edge(self, k: int, y: float) -> float:
        i = int(np.clip(round((y / self.px) - 0.5), 0, self.size - 1))
        return float(self.lateral[k][i, 0])

    def point(self, k: int, u: float, y: float) -> tuple[float, float]:
        """Image (x, y) mm of a point ``u`` mm from the midline towards side ``k``."""
        return self.anat.x_mid + _SIGN[k] * u, y


def _make_frame(size: int, anat: _Anatomy, spec: PhantomSpec) -> _Frame:
    px = FOV_MM / size
    c = (np.arange(size, dtype=F32) + F32(0.5)) * F32(px)
    f = _Frame(size=size, px=px, x=(c - F32(FOV_MM / 2))[None, :], y=c[:, None], anat=anat, ctr=spec.ctr,
               mediastinum_mm=spec.mediastinum_mm, ref_ctr=spec.heart_ctr,
               ref_mediastinum_mm=spec.mediastinal_width_mm)
    for k in (0, 1):
        _add_lung_geometry(f, k)
    f.heart = _heart_mask(f)
    f.mediastinum = _mediastinum_mask(f)
    return f


def _add_lung_geometry(f: _Frame, k: int) -> None:
    a = f.anat
    u = _SIGN[k] * (f.x - F32(a.x_mid))
    t = np.clip((f.y - F32(a.y_apex)) / F32(a.y_cp[k] - a.y_apex), 0.0, 1.0)
    w, ua = a.half_width[k], a.u_apex[k]
    lateral = ua + (w - ua) * np.sqrt(1 - (1 - t) ** 2.6)  # rounded apex, near-vertical lower wall
    medial = ua * (1 - np.sqrt(1 - (1 - t) ** 6))
    ud = a.u_dome[k]
    curv_lat = (a.y_cp[k] - a.y_dome[k]) / (w - ud) ** 2
    curv_med = 0.35 * curv_lat
    du = u - F32(ud)
    diaphragm = a.y_dome[k] + np.where(du > 0, curv_lat, curv_med) * du * du
    sd = np.minimum(np.minimum(u - medial, lateral - u), np.minimum(diaphragm - f.y, f.y - F32(a.y_apex)))
    # Horizontal distances overstate closeness where the outline is nearly horizontal
    # (apex, domes); dividing by the gradient makes the anti-aliasing even all round.
    gy, gx = np.gradient(sd, f.px)
    sd = sd / np.maximum(np.sqrt(gx * gx + gy * gy), 1.0)
    f.u.append(u)
    f.t.append(t)
    f.lateral.append(lateral)
    f.medial.append(medial)
    f.diaphragm.append(diaphragm)
    f.lung_base.append(f.soft(sd).astype(F32))


def _heart_mask(f: _Frame) -> np.ndarray:
    a = f.anat
    right, left = f.heart_half_widths(f.ctr)
    dy = f.y - F32(a.heart_cy)
    dx = f.x - F32(a.x_mid) - F32(a.heart_shear) * dy  # the apex points down and to the left
    half = np.where(dx < 0, F32(right), F32(left))
    # Tall rounded upper part (atria, outflow), short flat base that sinks below the diaphragm.
    b = np.where(dy < 0, F32(a.heart_b), F32(_HEART_BASE * a.heart_b))
    q = (np.abs(dx) / half) ** a.heart_p + (np.abs(dy) / b) ** a.heart_p
    sd = (1 - q ** (1 / a.heart_p)) * np.minimum(half, b)
    return f.soft(sd).astype(F32)


def _smooth_max(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """max(a, b) with the crease rounded over ``k`` mm (a smooth union of two shapes)."""
    h = np.clip(1 - np.abs(a - b) / k, 0.0, 1.0)
    return np.maximum(a, b) + h * h * (k / 4)


def _mediastinum_mask(f: _Frame) -> np.ndarray:
    """Upper mediastinum: widest at the aortic arch (``mediastinum_mm`` there), narrowing into
    the thoracic inlet, with the aortic knob bulging on the patient's left."""
    a = f.anat
    dx = f.x - F32(a.x_mid)
    w = f.mediastinum_mm
    y_arch = a.y_carina - 14.0
    profile = 0.72 + 0.28 * np.exp(-(((f.y - F32(y_arch)) / F32(70.0)) ** 2))
    sd_col = np.minimum(np.minimum(dx + F32(0.45 * w) * profile, F32(0.55 * w) * profile - dx),
                        F32(a.heart_cy) - f.y)
    knob_x = a.x_mid + 0.55 * w - 0.2 * a.knob_r
    knob = a.knob_r - np.sqrt((f.x - F32(knob_x)) ** 2 + ((f.y - F32(y_arch)) / F32(1.2)) ** 2)
    return f.soft(_smooth_max(sd_col, knob, 10.0)).astype(F32)


def _below_diaphragm(f: _Frame, shift: float) -> np.ndarray:
    """Soft indicator of lying below the diaphragm (moved down by ``shift`` mm)."""
    left = f.x > F32(f.anat.x_mid)
    line = np.where(left, f.diaphragm[1], f.diaphragm[0]) + F32(shift)
    return _smoothstep(line - 3.0, line + 12.0, f.y).astype(F32)


def _lung_air(f: _Frame) -> np.ndarray:
    """Air thickness in the lungs (0-1): thinner at the apices and along the mediastinum."""
    air = np.zeros((f.size, f.size), dtype=F32)
    for k in (0, 1):
        frac = np.clip((f.u[k] - f.medial[k]) / np.maximum(f.lateral[k] - f.medial[k], 1.0), 0.0, 1.0)
        across = 0.55 + 0.45 * np.clip(np.sin(np.pi * np.clip(frac * 1.1, 0.0, 1.0)), 0.0, 1.0) ** 0.6
        down = 0.55 + 0.45 * _smoothstep(0.0, 0.4, f.t[k])
        air += f.lung_base[k] * (across * down).astype(F32)
    return air * (1 - f.heart) * (1 - f.mediastinum)


def _hilum(f: _Frame, k: int) -> tuple[float, float]:
    a = f.anat
    u = f.ref_mediastinum_mm * (0.45, 0.55)[k] + 6.0
    return f.point(k, u, a.y_carina + (28.0, 22.0)[k])  # the left pulmonary artery arches higher


_R_MAX = 240.0  # radial extent (mm) of the vessel tables


def _vessel_tree(rng: np.random.Generator, trunks: int = 8, depth: int = 3) -> np.ndarray:
    """Vessels as rows (start angle, curvature, start r, end r, width), grown level by level:
    each vessel forks twice along its length into thinner, shorter, diverging branches."""
    th = np.linspace(-1.7, 1.6, trunks) + rng.uniform(-0.2, 0.2, trunks)
    level = np.stack([th, rng.normal(0.0, 0.005, trunks), np.zeros(trunks), rng.uniform(80.0, 130.0, trunks),
                      rng.uniform(4.0, 5.5, trunks)], axis=1)
    levels = [level]
    for _ in range(depth):
        p = np.repeat(level, 2, axis=0)
        n = len(p)
        length = p[:, 3] - p[:, 2]
        rb = p[:, 2] + rng.uniform(0.3, 0.75, n) * length
        start = p[:, 0] + p[:, 1] * (rb - p[:, 2]) + rng.normal(0.0, 0.3, n)
        level = np.stack([start, rng.normal(0.0, 0.005, n), rb, rb + length * rng.uniform(0.5, 0.7, n),
                          p[:, 4] * 0.7], axis=1)
        levels.append(level)
    return np.concatenate(levels)


def _vessel_table(rng: np.random.Generator, n_theta: int = 192, n_r: int = 48, window: int = 12) -> np.ndarray:
    """Branching vessels in polar coordinates around a hilum: rows r, columns angle.

    Angle 0 points laterally, -pi/2 up. Vessels fan out from the hilum, fork, wander, taper
    and fade towards the periphery: the "lung markings" of a normal chest film. Each vessel is
    splatted only at radii where it exists and within ``window`` angle bins of its centre line.
    """
    v = _vessel_tree(rng)
    r_all = np.linspace(0.0, _R_MAX, n_r)
    vi, ri = np.nonzero((r_all[None, :] > v[:, 2:3] - 3.0) & (r_all[None, :] < v[:, 3:4]))
    th0, curve, r0, r1, w0 = (v[vi, c] for c in range(5))
    r = r_all[ri]
    along = np.clip((r - r0) / (r1 - r0), 0.0, 1.0)
    width = w0 * (1 - 0.6 * along)
    centre = th0 + curve * (r - r0) + 0.06 * np.sin(r / 13.0 + 7 * th0) * (r > r0)  # gentle wiggle
    amp = _smoothstep(r0 - 3.0, r0 + 3.0, r) * (1 - _smoothstep(r1 - 20.0, r1, r)) * (w0 / 5.0) * (1 - 0.5 * along)
    step = 2 * np.pi / n_theta
    bins = np.rint((centre + np.pi) / step).astype(np.int64)[:, None] + np.arange(-window, window + 1)
    z = (bins * step - np.pi - centre[:, None]) * np.maximum(r, 1.0)[:, None] / (0.5 * width[:, None])
    weights = amp[:, None] * np.exp(-0.5 * np.minimum(z * z, 30.0))
    flat = ri[:, None] * n_theta + np.mod(bins, n_theta)
    table = np.bincount(flat.ravel(), weights=weights.ravel(), minlength=n_r * n_theta).reshape(n_r, n_theta)
    return np.minimum(table, 1.5).astype(F32)


def _lung_markings(f: _Frame, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((f.size, f.size), dtype=F32)
    for k in (0, 1):
        table = _vessel_table(rng)
        rows, cols = np.nonzero(f.lung_base[k].any(axis=1))[0], np.nonzero(f.lung_base[k].any(axis=0))[0]
        if not len(rows):
            continue
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        n_r, n_theta = table.shape
        hx, hy = _hilum(f, k)
        dx = _SIGN[k] * (f.x[:, box[1]] - F32(hx))
        dy = f.y[box[0]] - F32(hy)
        ri = np.clip(np.sqrt(dx * dx + dy * dy) / F32(_R_MAX / (n_r - 1)), 0, n_r - 1.001)
        ti = (np.arctan2(dy, dx) + F32(np.pi)) / F32(2 * np.pi / n_theta)
        r0, t0 = ri.astype(np.int32), np.floor(ti).astype(np.int32)
        fr, ft = ri - r0, ti - t0
        t0 %= n_theta
        t1 = (t0 + 1) % n_theta
        top = table[r0, t0] * (1 - ft) + table[r0, t1] * ft
        bot = table[r0 + 1, t0] * (1 - ft) + table[r0 + 1, t1] * ft
        out[box] += f.lung_base[k][box] * (top * (1 - fr) + bot * fr)
    return out * (1 - f.heart) * (1 - f.mediastinum)


def _rib_coordinate(f: _Frame, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior-rib level ``v`` (constant along a rib), lateral fraction, and rib centres."""
    a = f.anat
    un = f.u[k] / F32(a.half_width[k])
    rise, fall = a.rib_arch
    v = f.y + F32(rise) * un - F32(fall) * un * un  # posterior ribs arch up then curve down laterally
    spacing = a.rib_spacing * (1 + a.rib_growth * np.arange(12))
    centres = a.rib_v0 + np.concatenate([[0.0], np.cumsum(spacing[:-1])])
    return v, un, centres


def _rib_profile(d: np.ndarray, half: float) -> np.ndarray:
    """Cross-section of a rib: a shell whose cortex projects brighter than its middle."""
    shell = _tube(d, half)
    return shell * (0.55 + 0.45 * (1 - shell))


def _ribs(f: _Frame) -> np.ndarray:
    a = f.anat
    out = np.zeros((f.size, f.size), dtype=F32)
    for k in (0, 1):
        v, un, centres = _rib_coordinate(f, k)
        idx = np.arange(len(centres), dtype=np.float64)
        phase = np.interp(v, centres, idx, left=-1.0, right=len(centres)).astype(F32)
        nearest = np.clip(np.rint(phase), 0, len(centres) - 1)
        d = v - np.asarray(centres, dtype=F32)[nearest.astype(int)]
        half = F32(a.rib_half) * (0.8 + 0.3 * np.clip(un, 0, 1))
        posterior = _rib_profile(d, half) * _smoothstep(0.08, 0.2, un) * (1 - _smoothstep(1.02, 1.14, un))
        # Anterior ribs continue from the lateral wall down and medially, fading at the cartilage.
        va = f.y - F32(62.0) * (1 - np.clip(un, 0, 1)) ** 1.1
        centres_a = centres - a.rib_arch[0] + a.rib_arch[1] + 4.0
        phase_a = np.interp(va, centres_a, idx, left=-1.0, right=len(centres)).astype(F32)
        nearest_a = np.clip(np.rint(phase_a), 0, len(centres) - 1).astype(int)
        da = va - np.asarray(centres_a, dtype=F32)[nearest_a]
        anterior = _tube(da, 1.25 * half) * _smoothstep(0.3, 0.55, un) * (1 - _smoothstep(1.0, 1.1, un))
        out += posterior + 0.4 * anterior
    return out


def _clavicles(f: _Frame) -> np.ndarray:
    a = f.anat
    out = np.zeros((f.size, f.size), dtype=F32)
    for k in (0, 1):
        u0, u1 = 12.0, a.half_width[k] + 45.0
        s = (f.u[k] - F32(u0)) / F32(u1 - u0)
        sc = np.clip(s, 0, 1)
        centre = a.y_apex + 22.0 + (-44.0) * sc + 6.0 * np.sin(2 * np.pi * sc)
        half = 7.0 + 3.0 * (1 - sc)
        along = _smoothstep(-0.02, 0.04, s) * (1 - _smoothstep(0.97, 1.0, s))
        out += _rib_profile(f.y - centre.astype(F32), half) * along
    return out


def _spine(f: _Frame) -> np.ndarray:
    a = f.anat
    dx = f.x - F32(a.x_mid)
    column = _tube(dx, F32(20.0))
    bodies = 0.8 + 0.2 * np.cos(2 * np.pi * (f.y - F32(a.y_apex)) / F32(24.0))  # disc spaces lucent
    pedicles = sum(np.exp(-0.5 * ((dx - F32(s)) / F32(3.0)) ** 2) for s in (-13.0, 13.0))
    return (column * bodies + 0.35 * pedicles * (bodies - 0.6)).astype(F32)


def _body(f: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """Inside-the-body mask and soft-tissue thickness (0-1): neck, sloping shoulders, chest
    wall and upper abdomen."""
    a = f.anat
    w = max(a.half_width) + a.chest_wall
    neck = 58.0
    adx = np.abs(f.x - F32(a.x_mid))
    beyond = np.maximum(adx - F32(neck), 0.0)
    shoulder_top = F32(a.y_apex - 55.0) + F32(0.35) * beyond + F32(0.002) * beyond**2  # trapezius slope
    below_shoulder = np.where(adx < neck, F32(1e3), f.y - shoulder_top)
    half = w + 40.0 * (1 - _smoothstep(a.y_apex, a.y_apex + 120.0, f.y)) - 0.12 * np.clip(f.y - max(a.y_cp), 0, None)
    inside = f.soft(np.minimum(half - adx, 2.0 * below_shoulder))
    thickness = np.sqrt(np.clip(1 - (adx / half) ** 2, 0.0, 1.0)) ** 0.5
    return inside.astype(F32), (inside * (0.35 + 0.65 * thickness)).astype(F32)


def _soft_extras(f: _Frame) -> np.ndarray:
    """Humeral heads, breast shadows and the gastric air bubble."""
    a = f.anat
    out = np.zeros((f.size, f.size), dtype=F32)
    for k in (0, 1):
        hx, hy = f.point(k, a.half_width[k] + a.chest_wall + 42.0, a.y_apex - 8.0)
        r = np.sqrt((f.x - F32(hx)) ** 2 + (f.y - F32(hy)) ** 2)
        out += 0.22 * a.bone * _rib_profile(r, 30.0)
        if a.breasts:
            bx, by = f.point(k, 0.62 * a.half_width[k], a.y_dome[k] - 18.0)
            e = ((f.x - F32(bx)) / F32(80.0)) ** 2 + ((f.y - F32(by)) / F32(62.0)) ** 2
            out += 0.07 * _smoothstep(0.0, 0.35, 1 - e) * _smoothstep(by - 70.0, by + 10.0, f.y)
    if a.gastric_bubble:
        gx, gy = f.point(1, 0.45 * a.half_width[1], a.y_dome[1] + 22.0)
        e = ((f.x - F32(gx)) / F32(28.0)) ** 2 + ((f.y - F32(gy)) / F32(15.0)) ** 2
        out -= 0.09 * _smoothstep(0.0, 0.6, 1 - e)
    return out


def _trachea(f: _Frame) -> np.ndarray:
    a = f.anat
    cx, cy = a.x_mid + 2.0, a.y_carina
    # The right main bronchus is shorter and steeper than the left.
    pts_r = np.array([[cx, -20.0], [cx, cy], [cx - 20.0, cy + 28.0]])
    pts_l = np.array([[cx, cy], [cx + 36.0, cy + 26.0]])
    return np.maximum(_polyline_tube(f, pts_r, a.trachea_half), _polyline_tube(f, pts_l, a.trachea_half))


# ---------------------------------------------------------------------------------------
# Findings as layers
# ---------------------------------------------------------------------------------------

@dataclass
class _Layer:
    """What one finding does to the image; ``support`` is where it changes anything."""

    fill: np.ndarray | None = None  # fraction of lung air replaced by fluid/tissue (0-1)
    density: np.ndarray | None = None  # added density (bone, metal, pleural line ...)
    markings: np.ndarray | None = None  # multiplies the vessel markings (1 = unchanged)

    @property
    def support(self) -> np.ndarray:
        parts = [np.abs(p) > 0 for p in (self.fill, self.density) if p is not None]
        if self.markings is not None:
            parts.append(self.markings != 1)
        return np.logical_or.reduce(parts)


def _zone_centre(f: _Frame, k: int, zone: str, rng: np.random.Generator, lateral: float = 0.55) -> tuple[float, float]:
    """A point in the given lung zone (thirds of the apex-to-dome height), with jitter."""
    a = f.anat
    t = {"upper": 0.2, "middle": 0.5, "lower": 0.76}[zone] + rng.uniform(-0.06, 0.06)
    y = a.y_apex + t * f.lung_height(k)
    med, lat = float(f.medial_edge(k, y)), f.lateral_edge(k, y)
    u = med + (lateral + rng.uniform(-0.1, 0.1)) * (lat - med)
    return f.point(k, u, y)


def _side_mask(f: _Frame, k: int) -> np.ndarray:
    return (f.lung_base[k] > 0).astype(F32)


def _airspace(f: _Frame, finding: Finding, rng: np.random.Generator, level: float, patchy: float) -> _Layer:
    """Consolidation-like opacity: an irregular blob in one zone, restricted to the lung."""
    radius = {"small": 24.0, "moderate": 38.0, "large": 56.0}[finding.size]
    fill = np.zeros((f.size, f.size), dtype=F32)
    shape = _noise(rng, f.size, (6, 12), (1.0, 0.5))
    texture = _noise(rng, f.size, (24, 48), (1.0, 0.7))
    for k in _side_indices(finding.side):
        cx, cy = _zone_centre(f, k, finding.zone, rng)
        rx, ry = radius * rng.uniform(0.85, 1.2), radius * rng.uniform(0.75, 1.1)
        dist = np.sqrt(((f.x - F32(cx)) / F32(rx)) ** 2 + ((f.y - F32(cy)) / F32(ry)) ** 2)
        blob = _smoothstep(0.0, 0.6, 1.0 - dist + 0.22 * shape)
        fill += blob * np.clip(1 - patchy * (0.5 + 0.5 * texture), 0.0, 1.0) * _side_mask(f, k)
    return _Layer(fill=np.clip(level * fill, 0.0, 1.0))


def _consolidation(f: _Frame, finding: Finding, rng: np.random.Generator) -> _Layer:
    layer = _airspace(f, finding, rng, level=0.9, patchy=0.25)
    # Air bronchograms: thin lucent branches crossing the dense region.
    ridges = np.abs(_noise(rng, f.size, (8, 16), (1.0, 0.4)))
    bronchi = 1 - _smoothstep(0.0, 0.15, ridges)
    layer.fill = layer.fill * (1 - 0.25 * bronchi * _smoothstep(0.5, 0.8, layer.fill))
    return layer


def _atelectasis(f: _Frame, finding: Finding, rng: np.random.Generator) -> _Layer:
    """Plate-like (discoid) atelectasis: thin dense bands, roughly horizontal."""
    fill = np.zeros((f.size, f.size), dtype=F32)
    for k in _side_indices(finding.side):
        for _ in range(int(rng.integers(1, 3))):
            cx, cy = _zone_centre(f, k, finding.zone, rng)
            length = rng.uniform(40.0, 70.0)
            angle = _SIGN[k] * rng.uniform(-0.2, 0.1)
            half = rng.uniform(1.5, 2.6)
            ca, sa = np.cos(angle), np.sin(angle)
            along = (f.x - F32(cx)) * F32(ca) + (f.y - F32(cy)) * F32(sa)
            across = -(f.x - F32(cx)) * F32(sa) + (f.y - F32(cy)) * F32(ca)
            ends = _smoothstep(0.0, 0.25, 1 - np.abs(along) / F32(length / 2))
            fill += _smoothstep(2.0 * half, 0.0, np.abs(across)) * ends * _side_mask(f, k)
    return _Layer(fill=np.clip(0.6 * fill, 0.0, 1.0))


def _edema(f: _Frame, finding: Finding, rng: np.random.Generator) -> _Layer:
    """Bilateral perihilar haze plus Kerley B lines at the lateral lung bases."""
    amp, reach, n_lines = {"mild": (0.3, 95.0, 4), "moderate": (0.5, 120.0, 7), "severe": (0.78, 150.0, 10)}[
        finding.severity]
    texture = _noise(rng, f.size, (8, 16), (1.0, 0.6))
    fill = np.zeros((f.size, f.size), dtype=F32)
    for k in (0, 1):
        hx, hy = _hilum(f, k)
        r = np.sqrt(((f.x - F32(hx)) / F32(1.0)) ** 2 + ((f.y - F32(hy)) / F32(1.25)) ** 2)
        haze = np.clip(1 - r / F32(reach), 0.0, 1.0) ** 1.2
        fill += amp * haze * np.clip(0.8 + 0.3 * texture, 0.0, 1.2) * _side_mask(f, k)
        for _ in range(n_lines):
            y = f.anat.y_apex + rng.uniform(0.62, 0.92) * f.lung_height(k)
            lat = f.lateral_edge(k, y)
            length = rng.uniform(8.0, 16.0)
            x0, _ = f.point(k, lat - length, y)
            x1, _ = f.point(k, lat + 2.0, y)
            lo, hi = min(x0, x1), max(x0, x1)
            band = _tube(f.y - F32(y), F32(0.9)) * _smoothstep(lo, lo + 3.0, f.x) * (1 - _smoothstep(hi - 3.0, hi, f.x))
            fill += 0.5 * band * _side_mask(f, k)
    return _Layer(fill=np.clip(fill, 0.0, 1.0))


def _lesion(f: _Frame, finding: Finding, rng: np.random.Generator) -> _Layer:
    k = _PATIENT_SIDE[finding.side]
    cx, cy = _zone_centre(f, k, finding.zone, rng, lateral=0.6)
    radius = finding.diameter_mm / 2
    dx, dy = f.x - F32(cx), f.y - F32(cy)
    ang = np.arctan2(dy, dx)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    lobulated = radius * (1 + 0.07 * np.sin(3 * ang + p1) + 0.05 * np.sin(5 * ang + p2))
    r = np.sqrt(dx * dx + dy * dy) / lobulated
    edge = f.px / radius
    dome = np.sqrt(np.clip(1 - r * r, 0.0, 1.0)) * _smoothstep(1.0 + edge, 1.0 - edge, r)
    # A nodule only replaces as much air as it is thick, so small nodules are faint.
    level = float(np.clip(0.3 + finding.diameter_mm / 45.0, 0.35, 0.95))
    return _Layer(fill=(level * dome ** 0.6 * _side_mask(f, k)).astype(F32))


def _pneumothorax(f: _Frame, finding: Finding, rng: np.random.Generator) -> _Layer:
    """Air between chest wall and a visible visceral pleural line; no vessels lateral to it."""
    frac = {"small": 0.12, "moderate": 0.25, "large": 0.45}[finding.size]
    air_gap = np.zeros((f.size, f.size), dtype=F32)
    line = np.zeros((f.size, f.size), dtype=F32)
    for k in _side_indices(finding.side):
        # In an upright patient the air collects apically and laterally.
        medial = f.medial_edge(k, f.y).astype(F32)
        width = frac * (f.lateral[k] - medial) * (1.2 - 0.5 * f.t[k])
        if finding.size == "small":
            width = width * (1 - _smoothstep(0.45, 0.8, f.t[k]))
        width = width * rng.uniform(0.9, 1.1)
        pleura = f.lateral[k] - width
        inside = f.lung_base[k] * (1 - f.heart) * (1 - f.mediastinum)
        gap = f.soft(f.u[k] - pleura) * inside * (width > 1.0)
        air_gap += gap
        line += _tube(f.u[k] - pleura, F32(max(0.8, 0.5 * f.px))) * inside * (width > 1.0)
    keep = 1 - air_gap
    return _Layer(density=(0.12 * line - 0.08 * air_gap).astype(F32), markings=keep.astype(F32))


def _effusion(f: _Frame, finding: Finding, rng: np.random.Generator) -> _Layer:
    """Dependent fluid: blunts the costophrenic angle (small) or forms a meniscus (larger)."""
    fill = np.zeros((f.size, f.size), dtype=F32)
    for k in _side_indices(finding.side):
        a = f.anat
        h = f.lung_height(k)
        level, rise, soft = {
            "small": (a.y_dome[k] + 0.5 * (a.y_cp[k] - a.y_dome[k]), 22.0, 6.0),
            "moderate": (a.y_dome[k] - 0.2 * h, 38.0, 12.0),
            "large": (a.y_dome[k] - 0.48 * h, 50.0, 16.0),
        }[finding.size]
        level += rng.uniform(-4.0, 4.0)
        frac = np.clip((f.u[k] - f.medial[k]) / np.maximum(f.lateral[k] - f.medial[k], 1.0), 0.0, 1.0)
        surface = level - rise * frac**2  # the meniscus climbs the lateral chest wall
        # Fluid thins out towards its surface, so the opacity fades upward into the lung.
        fill += 0.97 * _smoothstep(surface - 0.5 * soft, surface + 1.5 * soft, f.y) * _side_mask(f, k)
    return _Layer(fill=np.clip(fill, 0.0, 1.0).astype(F32))


def _pleural_thickening(f: _Frame, finding: Finding, rng: np.random.Generator) -> _Layer:
    fill = np.zeros((f.size, f.size), dtype=F32)
    texture = _noise(rng, f.size, (12,), (1.0,))
    for k in _side_indices(finding.side):
        thick = rng.uniform(4.0, 8.0) * (1 + 0.25 * texture)
        t0, t1 = sorted(rng.uniform(0.1, 0.8, 2))
        t1 = max(t1, t0 + 0.25)
        extent = _smoothstep(t0 - 0.05, t0, f.t[k]) * (1 - _smoothstep(t1, t1 + 0.05, f.t[k]))
        band = _smoothstep(-thick, -0.5 * thick, f.u[k] - f.lateral[k])
        fill += band * extent * _side_mask(f, k)
    return _Layer(fill=np.clip(0.9 * fill, 0.0, 1.0).astype(F32))


def _fracture(f: _Frame, finding: Finding, rng: np.random.Generator) -> _Layer:
    """A lateral rib fracture: a lucent gap and a displaced outer fragment."""
    k = _PATIENT_SIDE[finding.side]
    rib = finding.rib if finding.rib is not None else int(rng.integers(4, 9))
    v, un, centres = _rib_coordinate(f, k)
    centre = F32(centres[rib - 1])  # rib numbers count from the first rib
    half = F32(f.anat.rib_half) * (0.8 + 0.3 * np.clip(un, 0, 1))
    at = rng.uniform(0.6, 0.82)
    shift = F32(rng.uniform(2.5, 4.5) * rng.choice([-1, 1]))
    frag = rng.uniform(0.12, 0.2)
    # Displacement largest at the fracture, fading along the outer fragment.
    taper = _smoothstep(at, at + 0.01, un) * (1 - _smoothstep(at + 0.5 * frag, at + frag, un))
    window = (np.abs(v - centre) < 3 * f.anat.rib_half) & (un > at - 0.05) & (un < at + frag + 0.05)
    original = _rib_profile(v - centre, half)
    shifted = _rib_profile(v - centre - shift * taper, half)
    gap = _smoothstep(0.006, 0.002, np.abs(un - at - 0.004))
    lateral_clip = 1 - _smoothstep(1.02, 1.14, un)
    scale = _BONE * f.anat.bone * lateral_clip
    delta = ((shifted * (1 - gap) - original) * scale * window).astype(F32)
    return _Layer(density=delta)


def _devices(f: _Frame, finding: Finding, rng: np.random.Generator) -> _Layer:
    a = f.anat
    dens = np.zeros((f.size, f.size), dtype=F32)
    xm, cy = a.x_mid, a.y_carina

    def line(pts: Sequence[tuple[float, float]], half: float, amp: float) -> np.ndarray:
        return amp * _polyline_tube(f, _smooth_polyline(pts), max(half, 0.45 * f.px))

    if "endotracheal_tube" in finding.devices:
        tip = cy - rng.uniform(30.0, 55.0)
        for dx, amp in ((-4.5, 0.07), (4.5, 0.07), (2.0, 0.14)):  # walls and radiopaque stripe
            dens += line([(xm + 2.0 + dx, -10.0), (xm + 2.0 + dx, tip)], 0.8, amp)
    if "central_line" in finding.devices:  # right internal jugular, tip at the cavoatrial junction
        tip = cy + rng.uniform(20.0, 45.0)
        pts = [(xm - 55.0, -10.0), (xm - 42.0, a.y_apex - 5.0), (xm - 26.0, a.y_apex + 40.0),
               (xm - 18.0, cy + 5.0), (xm - 15.0, tip)]
        dens += line(pts, 1.1, 0.2)
    if "enteric_tube" in finding.devices:
        pts = [(xm + 4.0, -10.0), (xm + 6.0, cy), (xm + 14.0, a.y_dome[1] - 15.0),
               (xm + 40.0, a.y_dome[1] + 25.0), (xm + 60.0, a.y_dome[1] + 35.0)]
        dens += line(pts, 1.3, 0.12)
    if "pacemaker" in finding.devices:
        gx, gy = f.point(1, 0.6 * a.half_width[1], a.y_apex + 30.0)
        hw, hh, rad = 22.0, 18.0, 7.0
        qx = np.abs(f.x - F32(gx)) - F32(hw - rad)
        qy = np.abs(f.y - F32(gy)) - F32(hh - rad)
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2) + np.minimum(np.maximum(qx, qy), 0)
        can = f.soft(F32(rad) - outside)
        header = _smoothstep(gy - hh + 9.0, gy - hh + 8.0, f.y)
        dens += can * (0.75 - 0.3 * header)
        hx, hy = _heart_apex(f)
        ra = [(gx - 10.0, gy - 12.0), (xm + 25.0, a.y_apex + 12.0), (xm - 8.0, cy + 10.0),
              (xm - 22.0, a.heart_cy - 35.0), (xm - 12.0, a.heart_cy - 45.0)]
        rv = [(gx - 6.0, gy - 12.0), (xm + 30.0, a.y_apex + 16.0), (xm - 5.0, cy + 15.0),
              (xm - 18.0, a.heart_cy - 20.0), (hx - 15.0, hy - 8.0)]
        dens += line(ra, 1.1, 0.3) + line(rv, 1.1, 0.3)
    return _Layer(density=dens)


def _heart_apex(f: _Frame) -> tuple[float, float]:
    a = f.anat
    y = a.heart_cy + 0.35 * a.heart_b
    return f.point(1, 0.75 * float(f.heart_edge(1, y)), y)


def _finding_layer(f: _Frame, finding: Finding, seed: Seed) -> _Layer | None:
    """The layer of a finding, or None for findings drawn through the anatomy (heart, mediastinum)."""
    rng = rng_stream("finding", seed, FINDINGS.index(finding.name))
    name = finding.name
    if name in ("Cardiomegaly", "Enlarged Cardiomediastinum"):
        return None
    if name == "Lung Opacity":
        return _airspace(f, finding, rng, level=0.5, patchy=0.45)  # hazier than consolidation
    if name == "Pneumonia":
        return _airspace(f, finding, rng, level=0.75, patchy=0.55)
    renderers = {
        "Consolidation": _consolidation, "Atelectasis": _atelectasis, "Edema": _edema, "Lung Lesion": _lesion,
        "Pneumothorax": _pneumothorax, "Pleural Effusion": _effusion, "Pleural Other": _pleural_thickening,
        "Fracture": _fracture, "Support Devices": _devices,
    }
    return renderers[name](f, finding, rng)


# ---------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------

_AIR = 0.5  # density removed by fully aerated lung
_MARK = 0.1  # density of the vessel markings
_BONE = 0.12
_K = 1.6  # attenuation scale of the exposure curve


@lru_cache(maxsize=8)
def _base_layers(seed: tuple[int, ...], size: int, anatomy: PhantomSpec):
    """The anatomy of a spec stripped of everything but heart and mediastinum size (cached:
    pairs and masks reuse it)."""
    anat = _sample_anatomy(seed, anatomy.sex, anatomy.age)
    f = _make_frame(size, anat, anatomy)
    noise_rng = rng_stream("noise", seed)
    inside, body = _body(f)
    # Heart and mediastinum form one silhouette; below the domes the liver and spleen match it.
    silhouette = np.maximum(f.heart * (1 - _below_diaphragm(f, -20.0)), f.mediastinum)
    bones = 0.07 * _spine(f) + _BONE * anat.bone * (_ribs(f) * (1 - 0.5 * _below_diaphragm(f, 10.0))
                                                   + 1.5 * _clavicles(f))
    tissue = (0.58 * body + 0.09 * silhouette + 0.09 * _below_diaphragm(f, 0.0) * body
              + 0.03 * _noise(noise_rng, size, (6, 12, 24), (1.0, 0.6, 0.35)) * body
              + inside * (bones + _soft_extras(f))
              - 0.18 * _trachea(f) * np.maximum(f.heart, f.mediastinum))  # air columns show within the mediastinum
    quantum = noise_rng.standard_normal((size, size)).astype(F32)
    markings = _lung_markings(f, rng_stream("markings", seed))
    return f, tissue.astype(F32), _lung_air(f), markings, quantum


def _anatomy_key(spec: PhantomSpec) -> PhantomSpec:
    """The part of a spec that shapes the anatomy (hashable, for the cache)."""
    keep = tuple(f for f in spec.findings if f.name in ("Cardiomegaly", "Enlarged Cardiomediastinum"))
    return replace(spec, findings=keep)


def _compose(spec: PhantomSpec, size: int, seed: tuple[int, ...]) -> tuple[np.ndarray, _Frame, dict[str, _Layer]]:
    f, tissue, air, markings, quantum = _base_layers(seed, size, _anatomy_key(spec))
    layers = {finding.name: _finding_layer(f, finding, seed) for finding in spec.findings}
    fill = np.zeros_like(air)
    density = tissue.copy()
    keep = np.ones_like(air)
    for layer in layers.values():
        if layer is None:
            continue
        if layer.fill is not None:
            fill += layer.fill
        if layer.density is not None:
            density += layer.density
        if layer.markings is not None:
            keep *= layer.markings
    open_air = air * (1 - np.clip(fill, 0.0, 1.0))
    density += _MARK * markings * keep * (1 - np.clip(fill, 0.0, 1.0)) - _AIR * open_air
    image = _expose(density, quantum, f.anat)
    return image, f, layers


def _expose(density: np.ndarray, quantum: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Film response: a saturating exposure curve, per-patient contrast/gamma, quantum noise."""
    lin = (1 - np.exp(-_K * np.clip(density, 0.0, None))) / F32(1 - np.exp(-_K))
    img = np.clip(a.contrast * (lin - 0.5) + 0.5 + a.offset, 0.0, 1.0) ** a.gamma
    img = img + a.noise_sigma * (0.5 + img) * quantum
    return np.clip(img, 0.0, 1.0).astype(F32)


# ---------------------------------------------------------------------------------------
# Public rendering API
# ---------------------------------------------------------------------------------------

def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 32 <= size <= 2048:
        raise ValueError(f"size must be an int in [32, 2048]; got {size!r}")
    return int(size)


def render(specs: PhantomSpec | Sequence[PhantomSpec], size: int = 224, seed: Seed = 0
           ) -> Float[np.ndarray, "H W"] | Float[np.ndarray, "N H W"]:
    """Render one spec to an (H, W) image, or a sequence to (N, H, W); float32 in [0, 1].

    The same seed gives a bit-identical image. For a sequence, image ``i`` uses seed
    ``(*seed, i)`` (so ``render(specs, seed=s)[i] == render(specs[i], seed=(s, i))``).
    """
    size = _check_size(size)
    base = _seed_tuple(seed)
    if isinstance(specs, PhantomSpec):
        return _compose(specs, size, base)[0]
    images = np.empty((len(specs), size, size), dtype=F32)
    for i, spec in enumerate(specs):
        images[i] = _compose(spec, size, (*base, i))[0]
    return images


def render_pair(spec: PhantomSpec, finding: str, size: int = 224, seed: Seed = 0
                ) -> tuple[Float[np.ndarray, "H W"], Float[np.ndarray, "H W"]]:
    """(image with ``finding``, image without it): same anatomy and noise, different only
    inside :func:`finding_region`. ``spec`` must contain the finding."""
    check_finding(finding)
    if not spec.has(finding):
        raise ValueError(f"spec has no {finding!r} to remove; present: {', '.join(spec.present) or 'none'}")
    size, seed = _check_size(size), _seed_tuple(seed)
    return _compose(spec, size, seed)[0], _compose(spec.without(finding), size, seed)[0]


def finding_region(spec: PhantomSpec, finding: str, size: int = 224, seed: Seed = 0) -> Bool[np.ndarray, "H W"]:
    """Pixels a present finding can change (from its geometry, not from an image difference)."""
    check_finding(finding)
    if not spec.has(finding):
        raise ValueError(f"spec has no {finding!r}; present: {', '.join(spec.present) or 'none'}")
    size, seed = _check_size(size), _seed_tuple(seed)
    _, f, layers = _compose(spec, size, seed)
    if layers[finding] is not None:
        return layers[finding].support
    # Heart/mediastinum size: the union of both outlines (lungs change only there).
    g = _compose(spec.without(finding), size, seed)[1]
    masks = (f.heart, g.heart) if finding == "Cardiomegaly" else (f.mediastinum, g.mediastinum)
    return (masks[0] > 0) | (masks[1] > 0)


def anatomy_masks(spec: PhantomSpec, size: int = 224, seed: Seed = 0) -> dict[str, Float[np.ndarray, "H W"]]:
    """Soft (0-1) masks of the rendered anatomy: ``lung_right``/``lung_left`` (patient sides,
    outside heart and mediastinum), ``heart``, ``mediastinum`` and ``costophrenic_right``/
    ``costophrenic_left`` (lung below the dome, where small effusions collect)."""
    size, seed = _check_size(size), _seed_tuple(seed)
    f = _base_layers(seed, size, _anatomy_key(spec))[0]
    out = {"heart": f.heart, "mediastinum": f.mediastinum}
    for side, k in _PATIENT_SIDE.items():
        lung = f.lung_base[k] * (1 - f.heart) * (1 - f.mediastinum)
        out[f"lung_{side}"] = lung
        low = f.y > F32(f.anat.y_dome[k] - 0.08 * f.lung_height(k))
        out[f"costophrenic_{side}"] = lung * low * (f.u[k] > F32(f.anat.u_dome[k]))
    return out


# ---------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------

def chexpert_labels(spec: PhantomSpec, mentioned_absent: Iterable[str] = ()) -> dict[str, float | None]:
    """CheXpert labels as the report labeler would give them: 1.0 present, 0.0 absent and
    explicitly negated in the report, None unmentioned; "No Finding" is 1.0 when nothing but
    support devices is present, else None (Irvin et al. 2019)."""
    negated = set(mentioned_absent)
    for name in negated:
        check_finding(name)
        if spec.has(name):
            raise ValueError(f"{name} is present, so the report cannot negate it")
    labels: dict[str, float | None] = {NO_FINDING: 1.0 if spec.is_normal else None}
    for name in FINDINGS:
        labels[name] = 1.0 if spec.has(name) else (0.0 if name in negated else None)
    return labels


def label_row(path: str, spec: PhantomSpec, mentioned_absent: Iterable[str] = ()) -> dict[str, str]:
    """One row of a CheXpert-format CSV (``CHEXPERT_COLUMNS``), cells as CheXpert writes them."""
    labels = chexpert_labels(spec, mentioned_absent)
    row = {"Path": path, "Sex": spec.sex, "Age": str(spec.age), "Frontal/Lateral": "Frontal", "AP/PA": "PA"}
    row.update({name: "" if v is None else f"{v:.1f}" for name, v in labels.items()})
    return row


def _grade(value: float, cuts: tuple[float, float]) -> str:
    return SEVERITIES[int(np.searchsorted(cuts, value, side="right"))]


def coarse_attributes(spec: PhantomSpec) -> dict[str, dict[str, Any]]:
    """Present findings as ``{name: {"present": True, "side", "zone", "severity"}}`` with a
    single ordinal severity (sizes for pleural findings and nodules, grades otherwise)."""
    out: dict[str, dict[str, Any]] = {}
    for f in spec.findings:
        entry: dict[str, Any] = {"present": True}
        if f.side is not None:
            entry["side"] = f.side
        if f.zone is not None:
            entry["zone"] = f.zone
        if f.name == "Cardiomegaly":
            entry["severity"] = _grade(f.ctr, (0.55, 0.62))
        elif f.name == "Enlarged Cardiomediastinum":
            entry["severity"] = _grade(f.width_mm, (95.0, 110.0))
        elif f.name == "Lung Lesion":
            entry["severity"] = SIZES[int(np.searchsorted((10.0, 30.0), f.diameter_mm, side="right"))]
        elif f.name in ("Pleural Effusion", "Pneumothorax"):
            entry["severity"] = f.size
        elif f.size is not None:
            entry["severity"] = dict(zip(SIZES, SEVERITIES, strict=True))[f.size]
        elif f.severity is not None:
            entry["severity"] = f.severity
        out[f.name] = entry
    return out


# ---------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------

_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`build_phantom_dataset` did: images rendered or found up to date, and time
    spent in total and in rendering alone."""

    out_dir: str
    counts: dict[str, int]
    rendered: int
    skipped: int
    seconds: float
    render_seconds: float

    @property
    def images_per_second(self) -> float:
        """Rendering rate (excluding PNG encoding, reports and bookkeeping)."""
        return self.rendered / self.render_seconds if self.render_seconds > 0 else float("inf")


def _image_key(spec: PhantomSpec, seed: tuple[int, ...], size: int) -> str:
    blob = json.dumps({"spec": spec.to_dict(), "seed": list(seed), "size": size, "v": GENERATOR_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_KEY_CHUNK = "negtrace_key"


def _existing_key(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.text.get(_KEY_CHUNK)  # type: ignore[attr-defined]
    except (OSError, ValueError):
        return None


def _write_png(path: Path, image: np.ndarray, key: str) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(_KEY_CHUNK, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.round(image * 255.0).astype(np.uint8), mode="L").save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _csv_text(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CHEXPERT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _jsonl_text(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def build_phantom_dataset(out_dir: str | os.PathLike, n_train: int, n_val: int, n_test: int, size: int = 224,
                          seed: int = 0, progress: bool = True,
                          prevalence: Mapping[str, float] | float | None = None) -> DatasetSummary:
    """Write a CheXpert-style phantom dataset under ``out_dir``.

    Per split: PNGs at ``{split}/patientNNNNN/study1/view1_frontal.png`` (8-bit), ``labels_{split}.csv``
    (CheXpert columns, ``Path`` relative to ``out_dir``), ``attributes_{split}.jsonl`` (the full
    spec and coarse attributes), ``reports_{split}.jsonl`` (findings and impression text).
    Everything is determined by ``seed``; files are written atomically, and an image whose PNG
    already carries the same spec/seed/size key is not rendered again.
    """
    import time

    from tqdm.auto import tqdm

    from negtrace.data.reports import report_caption, write_report

    size = _check_size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    rendered = skipped = 0
    start = time.perf_counter()
    render_seconds = 0.0
    with tqdm(total=sum(counts.values()), disable=not progress, desc="phantoms", unit="img") as bar:
        for split_index, split in enumerate(_SPLITS):
            specs = sample_specs(counts[split], seed=(seed, split_index), prevalence=prevalence)
            rows, attrs, reports = [], [], []
            for i, spec in enumerate(specs):
                study_id = f"{split}-{i + 1:05d}"
                rel = f"{split}/patient{i + 1:05d}/study1/view1_frontal.png"
                image_seed = (seed, split_index, i)
                key = _image_key(spec, image_seed, size)
                path = out / rel
                if path.exists() and _existing_key(path) == key:
                    skipped += 1
                else:
                    t0 = time.perf_counter()
                    image = render(spec, size=size, seed=image_seed)
                    render_seconds += time.perf_counter() - t0
                    _write_png(path, image, key)
                    rendered += 1
                report = write_report(spec, image_seed)
                rows.append(label_row(rel, spec, report.mentioned_absent))
                attrs.append({"study_id": study_id, "path": rel, "seed": list(image_seed), "size": size,
                              "key": key, "spec": spec.to_dict(), "findings": coarse_attributes(spec)})
                reports.append({"study_id": study_id, "path": rel, "findings": report.findings,
                                "impression": report.impression, "caption": report_caption(report),
                                "mentioned_absent": list(report.mentioned_absent)})
                bar.update(1)
            _write_text(out / f"labels_{split}.csv", _csv_text(rows))
            _write_text(out / f"attributes_{split}.jsonl", _jsonl_text(attrs))
            _write_text(out / f"reports_{split}.jsonl", _jsonl_text(reports))
    return DatasetSummary(out_dir=str(out), counts=counts, rendered=rendered, skipped=skipped,
                          seconds=time.perf_counter() - start, render_seconds=render_seconds)

