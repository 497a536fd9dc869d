"""JSONL records of the negation benchmarks, validated on construction and on load.

Every record type is a dataclass that checks itself in ``__post_init__``, serialises with
``to_dict`` (adding a ``"kind"`` tag) and is rebuilt with ``from_dict``, which rejects
missing, unknown and wrongly typed fields. :func:`read_jsonl` wraps every problem in a
:class:`SchemaError` naming the file and line; :func:`write_jsonl` writes atomically.

Record types
    :class:`PolarityItem`     a polarity multiple-choice question (NAST, Abbasi et al. 2026)
    :class:`ContextualClaim`  a structured clinical claim and its text
    :class:`ContextualItem`   an image's true claim with false, attribute-negated distractors
    :class:`TracingPair`      a negated statement and its equal-length affirmative counterpart
    :class:`ImageAttributes`  structured finding attributes of one image (phantom world input)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from negtrace.data.findings import FINDINGS

__all__ = [
    "NEGATION_PATTERNS",
    "NEGATION_SCOPES",
    "SIDES",
    "ZONES",
    "SIZE_SCALE",
    "GRADE_SCALE",
    "SIDED_FINDINGS",
    "ZONED_FINDINGS",
    "SEVERITY_SCALES",
    "SchemaError",
    "PolarityItem",
    "ContextualClaim",
    "ContextualItem",
    "TracingPair",
    "FindingAttributes",
    "ImageAttributes",
    "RECORD_TYPES",
    "write_jsonl",
    "read_jsonl",
    "read_records",
]

# How absent findings are worded in a polarity option ("none": the option has no absent finding).
NEGATION_PATTERNS: tuple[str, ...] = (
    "no", "without", "absent", "free_of", "no_evidence", "not_seen", "but_not", "no_with", "none",
)
# Which part of a claim a negation applies to ("none": an affirmative claim).
NEGATION_SCOPES: tuple[str, ...] = ("none", "finding", "location", "severity")

SIDES: tuple[str, ...] = ("left", "right", "bilateral")
ZONES: tuple[str, ...] = ("upper", "middle", "lower")
SIZE_SCALE: tuple[str, ...] = ("small", "moderate", "large")
GRADE_SCALE: tuple[str, ...] = ("mild", "moderate", "severe")

# Findings for which a side / a lung zone / a severity is meaningful.
SIDED_FINDINGS: frozenset[str] = frozenset({
    "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
})
ZONED_FINDINGS: frozenset[str] = frozenset({
    "Lung Opacity", "Lung Lesion", "Consolidation", "Pneumonia", "Atelectasis",
})
SEVERITY_SCALES: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": SIZE_SCALE,
    "Pneumothorax": SIZE_SCALE,
    "Lung Lesion": SIZE_SCALE,
    "Cardiomegaly": GRADE_SCALE,
    "Enlarged Cardiomediastinum": GRADE_SCALE,
    "Edema": GRADE_SCALE,
    "Consolidation": GRADE_SCALE,
    "Atelectasis": GRADE_SCALE,
    "Lung Opacity": GRADE_SCALE,
    "Pneumonia": GRADE_SCALE,
}


class SchemaError(ValueError):
    """A record that does not fit its schema; ``str()`` starts with ``file:line:`` when known."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.message, self.path, self.line = message, path, line
        where = f"{path}:{line}: " if path is not None and line is not None else (f"{path}: " if path else "")
        super().__init__(where + message)


# -- field checks ------------------------------------------------------------------------

def _fail(record: str, message: str) -> None:
    raise SchemaError(f"{record}: {message}")


def _check_str(record: str, name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        _fail(record, f"{name} must be a non-empty string, got {value!r}")


def _check_bool(record: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(record, f"{name} must be true or false, got {value!r}")


def _check_int(record: str, name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(record, f"{name} must be an integer, got {value!r}")


def _check_str_list(record: str, name: str, value: Any, length: int | None = None) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        _fail(record, f"{name} must be a list of non-empty strings, got {value!r}")
    if length is not None and len(value) != length:
        _fail(record, f"{name} must have {length} items, got {len(value)}")


def _check_choice(record: str, name: str, value: Any, choices: Iterable[str], optional: bool = False) -> None:
    if value is None and optional:
        return
    choices = tuple(choices)
    if value not in choices:
        _fail(record, f"{name} must be one of {', '.join(choices)}{' or null' if optional else ''}; got {value!r}")


def _check_finding(record: str, name: str, value: Any) -> None:
    if value not in FINDINGS:
        _fail(record, f"{name} {value!r} is not one of the 13 findings ({', '.join(FINDINGS)})")


def _fields_from(cls: type, data: Any, optional_kind: bool = False) -> dict[str, Any]:
    """The constructor arguments in ``data``, after checking the kind tag and the key set."""
    if not isinstance(data, Mapping):
        raise SchemaError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("kind", None)
    if kind is None and not optional_kind:
        raise SchemaError(f"{cls.__name__}: missing 'kind' (expected {cls.KIND!r})")
    if kind is not None and kind != cls.KIND:
        raise SchemaError(f"{cls.__name__}: kind is {kind!r}, expected {cls.KIND!r}")
    names = [f.name for f in fields(cls) if f.init]
    required = [f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in data]
    unknown = sorted(set(data) - set(names))
    if missing or unknown:
        parts = ([f"missing fields: {', '.join(missing)}"] if missing else []) + (
            [f"unknown fields: {', '.join(unknown)}"] if unknown else [])
        raise SchemaError(f"{cls.__name__}: {'; '.join(parts)}")
    return data


# -- polarity ----------------------------------------------------------------------------

@dataclass
class PolarityItem:
    """One polarity MCQ: four label vectors over three findings, each worded two ways.

    ``options_negated[i]`` states absent findings with a negation cue, ``options_affirmative[i]``
    states them by their normal-anatomy counterpart; present findings read the same in both.
    ``option_labels[i]`` maps each of ``findings`` to 1 (present) or 0 (absent).
    """

    KIND: ClassVar[str] = "polarity"

    item_id: str
    study_id: str
    question: str
    options_negated: list[str]
    options_affirmative: list[str]
    option_labels: list[dict[str, int]]
    answer: int
    findings: list[str]
    option_patterns: list[str]
    subject_id: str | None = None
    image_path: str | None = None
    paraphrased: bool = False

    def __post_init__(self) -> None:
        r = f"PolarityItem {self.item_id!r}"
        _check_str(r, "item_id", self.item_id)
        _check_str(r, "study_id", self.study_id)
        _check_str(r, "question", self.question)
        _check_str(r, "subject_id", self.subject_id, optional=True)
        _check_str(r, "image_path", self.image_path, optional=True)
        _check_bool(r, "paraphrased", self.paraphrased)
        _check_str_list(r, "findings", self.findings, 3)
        for f in self.findings:
            _check_finding(r, "findings entry", f)
        if len(set(self.findings)) != 3:
            _fail(r, f"findings must be 3 distinct findings, got {self.findings}")
        _check_str_list(r, "options_negated", self.options_negated, 4)
        _check_str_list(r, "options_affirmative", self.options_affirmative, 4)
        _check_str_list(r, "option_patterns", self.option_patterns, 4)
        for p in self.option_patterns:
            _check_choice(r, "option_patterns entry", p, NEGATION_PATTERNS)
        _check_int(r, "answer", self.answer)
        if not 0 <= self.answer < 4:
            _fail(r, f"answer must be 0..3, got {self.answer}")
        if not isinstance(self.option_labels, list) or len(self.option_labels) != 4:
            _fail(r, "option_labels must be a list of 4 label vectors")
        vectors = []
        for i, labels in enumerate(self.option_labels):
            if not isinstance(labels, dict) or set(labels) != set(self.findings):
                _fail(r, f"option_labels[{i}] must map exactly the findings {self.findings}, got {labels!r}")
            if any(v not in (0, 1) or isinstance(v, bool) for v in labels.values()):
                _fail(r, f"option_labels[{i}] values must be 0 or 1, got {labels!r}")
            vectors.append(tuple(labels[f] for f in self.findings))
        if len(set(vectors)) != 4:
            _fail(r, f"the 4 option label vectors must be distinct, got {vectors}")

    @property
    def pattern(self) -> str:
        """The negation pattern of the correct option."""
        return self.option_patterns[self.answer]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, **_plain(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolarityItem:
        return cls(**_fields_from(cls, data))


# -- contextual claims -------------------------------------------------------------------

@dataclass
class ContextualClaim:
    """A structured claim about one finding of one study, with its text.

    ``negation_scope`` says what the text negates: ``"none"`` (affirmative, ``present`` is
    true), ``"finding"`` ("no pneumothorax"), ``"location"`` or ``"severity"``. For the last
    two, ``present=False`` negates the finding at that location/severity ("no right pleural
    effusion", "no large pneumothorax") and ``present=True`` affirms the finding but negates
    the attribute ("pleural effusion, not large"). ``holds`` says whether the claim is true
    of the source study.
    """

    KIND: ClassVar[str] = "contextual_claim"

    finding: str
    present: bool
    text: str
    negation_scope: str
    holds: bool
    study_id: str
    side: str | None = None
    zone: str | None = None
    severity: str | None = None

    def __post_init__(self) -> None:
        r = f"ContextualClaim {self.text!r}"
        _check_finding(r, "finding", self.finding)
        _check_bool(r, "present", self.present)
        _check_bool(r, "holds", self.holds)
        _check_str(r, "text", self.text)
        _check_str(r, "study_id", self.study_id)
        _check_choice(r, "negation_scope", self.negation_scope, NEGATION_SCOPES)
        _check_attributes(r, self.finding, self.side, self.zone, self.severity)
        scope = self.negation_scope
        if scope == "none" and not self.present:
            _fail(r, "an affirmative claim (negation_scope 'none') must have present=true")
        if scope == "finding" and (self.present or self.side or self.zone or self.severity):
            _fail(r, "a finding-level negation has present=false and no side, zone or severity")
        if scope == "location" and self.side is None and self.zone is None:
            _fail(r, "a location negation needs a side or zone")
        if scope == "severity" and self.severity is None:
            _fail(r, "a severity negation needs a severity")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, **_plain(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContextualClaim:
        return cls(**_fields_from(cls, data, optional_kind=True))


def _check_attributes(r: str, finding: str, side: Any, zone: Any, severity: Any) -> None:
    _check_choice(r, "side", side, SIDES, optional=True)
    _check_choice(r, "zone", zone, ZONES, optional=True)
    if side is not None and finding not in SIDED_FINDINGS:
        _fail(r, f"{finding} takes no side (sided findings: {', '.join(sorted(SIDED_FINDINGS))})")
    if zone is not None and finding not in ZONED_FINDINGS:
        _fail(r, f"{finding} takes no lung zone (zoned findings: {', '.join(sorted(ZONED_FINDINGS))})")
    if severity is not None:
        scale = SEVERITY_SCALES.get(finding)
        if scale is None:
            _fail(r, f"{finding} takes no severity")
        _check_choice(r, f"severity of {finding}", severity, scale)


@dataclass
class ContextualItem:
    """An image with one true claim (``target``) and false claims (``distractors``).

    Retrieval ranks ``candidates`` (target first); claim ranking compares the target with
    each distractor about the same finding (``variants``).
    """

    KIND: ClassVar[str] = "contextual"

    item_id: str
    study_id: str
    target: ContextualClaim
    distractors: list[ContextualClaim]
    subject_id: str | None = None
    image_path: str | None = None

    def __post_init__(self) -> None:
        r = f"ContextualItem {self.item_id!r}"
        _check_str(r, "item_id", self.item_id)
        _check_str(r, "study_id", self.study_id)
        _check_str(r, "subject_id", self.subject_id, optional=True)
        _check_str(r, "image_path", self.image_path, optional=True)
        if isinstance(self.target, Mapping):
            self.target = _nested(r, "target", self.target)
        if not isinstance(self.distractors, list) or not self.distractors:
            _fail(r, "distractors must be a non-empty list of claims")
        self.distractors = [_nested(r, f"distractors[{i}]", d) if isinstance(d, Mapping) else d
                            for i, d in enumerate(self.distractors)]
        if not isinstance(self.target, ContextualClaim) or not all(
                isinstance(d, ContextualClaim) for d in self.distractors):
            _fail(r, "target and distractors must be claims")
        if not self.target.holds:
            _fail(r, f"the target claim {self.target.text!r} must hold (holds=true)")
        wrong = [d.text for d in self.distractors if d.holds]
        if wrong:
            _fail(r, f"distractors must be false (holds=false): {wrong}")
        texts = [c.text for c in self.candidates]
        if len(set(texts)) != len(texts):
            _fail(r, f"candidate texts must be distinct, got {texts}")
        if not self.variants:
            _fail(r, f"needs at least one distractor about {self.target.finding}")

    @property
    def candidates(self) -> list[ContextualClaim]:
        return [self.target, *self.distractors]

    @property
    def variants(self) -> list[ContextualClaim]:
        """Distractors about the target's finding (its negated / attribute-swapped versions)."""
        return [d for d in self.distractors if d.finding == self.target.finding]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "item_id": self.item_id, "study_id": self.study_id,
                "target": _plain(self.target), "distractors": [_plain(d) for d in self.distractors],
                "subject_id": self.subject_id, "image_path": self.image_path}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContextualItem:
        return cls(**_fields_from(cls, data))


def _nested(r: str, name: str, data: Mapping[str, Any]) -> ContextualClaim:
    try:
        return ContextualClaim.from_dict(data)
    except SchemaError as e:
        raise SchemaError(f"{r}: {name}: {e.message}") from None
    except TypeError as e:
        raise SchemaError(f"{r}: {name}: {e}") from None


# -- tracing pairs -----------------------------------------------------------------------

@dataclass
class TracingPair:
    """A minimal pair for causal tracing: ``clean`` (negated) vs ``corrupted`` (affirmative).

    The texts differ only in the cue at ``clean[cue_start:cue_end]``; ``n_tokens`` is the
    shared token count under the tokenizer the pair was checked with.
    """

    KIND: ClassVar[str] = "tracing_pair"

    pair_id: str
    clean: str
    corrupted: str
    finding: str
    template_id: str
    cue_start: int
    cue_end: int
    n_tokens: int | None = None
    image_path: str | None = None
    study_id: str | None = None
    subject_id: str | None = None

    def __post_init__(self) -> None:
        r = f"TracingPair {self.pair_id!r}"
        for name in ("pair_id", "clean", "corrupted", "template_id"):
            _check_str(r, name, getattr(self, name))
        for name in ("image_path", "study_id", "subject_id"):
            _check_str(r, name, getattr(self, name), optional=True)
        _check_finding(r, "finding", self.finding)
        _check_int(r, "cue_start", self.cue_start)
        _check_int(r, "cue_end", self.cue_end)
        _check_int(r, "n_tokens", self.n_tokens, optional=True)
        if not 0 <= self.cue_start < self.cue_end <= len(self.clean):
            _fail(r, f"cue span ({self.cue_start}, {self.cue_end}) is not inside the clean text "
                     f"of length {len(self.clean)}")
        if self.clean == self.corrupted:
            _fail(r, "clean and corrupted texts are identical")

    @property
    def cue_span(self) -> tuple[int, int]:
        return (self.cue_start, self.cue_end)

    @property
    def cue(self) -> str:
        return self.clean[self.cue_start:self.cue_end]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, **_plain(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TracingPair:
        return cls(**_fields_from(cls, data))


# -- structured attributes (phantom world) -----------------------------------------------

@dataclass
class FindingAttributes:
    """Whether a finding is present in an image and, if so, where and how severe."""

    present: bool
    side: str | None = None
    zone: str | None = None
    severity: str | None = None


@dataclass
class ImageAttributes:
    """One line of an attributes JSONL: ``{"study_id": ..., "image_path": ..., "findings":
    {"Pleural Effusion": {"present": true, "side": "left", "severity": "small"}, ...}}``.

    Findings not listed are unknown, unless the builder is told the records are complete
    (every present finding listed, as in the phantom world). Absent findings carry no side,
    zone or severity. The ``"kind"`` tag (``"image_attributes"``) is optional here.
    """

    KIND: ClassVar[str] = "image_attributes"

    study_id: str
    findings: dict[str, FindingAttributes]
    image_path: str | None = None
    subject_id: str | None = None

    def __post_init__(self) -> None:
        r = f"ImageAttributes {self.study_id!r}"
        _check_str(r, "study_id", self.study_id)
        _check_str(r, "image_path", self.image_path, optional=True)
        _check_str(r, "subject_id", self.subject_id, optional=True)
        if not isinstance(self.findings, dict):
            _fail(r, "findings must be an object mapping finding names to attributes")
        parsed: dict[str, FindingAttributes] = {}
        for name, attrs in self.findings.items():
            _check_finding(r, "finding", name)
            if isinstance(attrs, Mapping):
                unknown = sorted(set(attrs) - {"present", "side", "zone", "severity"})
                if unknown or "present" not in attrs:
                    _fail(r, f"{name}: needs 'present' and allows side, zone, severity; got keys {sorted(attrs)}")
                attrs = FindingAttributes(**attrs)
            if not isinstance(attrs, FindingAttributes):
                _fail(r, f"{name}: attributes must be an object, got {attrs!r}")
            _check_bool(r, f"{name}.present", attrs.present)
            _check_attributes(f"{r} {name}", name, attrs.side, attrs.zone, attrs.severity)
            if not attrs.present and (attrs.side or attrs.zone or attrs.severity):
                _fail(r, f"{name} is absent, so it cannot have a side, zone or severity")
            parsed[name] = attrs
        self.findings = parsed

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "study_id": self.study_id, "image_path": self.image_path,
                "subject_id": self.subject_id,
                "findings": {k: {n: v for n, v in vars(a).items() if v is not None}
                             for k, a in self.findings.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageAttributes:
        """Also reads the phantom world's lines: ``path`` is taken for ``image_path`` and other
        top-level keys (``spec``, ``seed``, ...) are ignored; ``findings`` is checked strictly."""
        if not isinstance(data, Mapping):
            raise SchemaError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        if "image_path" not in data and "path" in data:
            data["image_path"] = data.pop("path")
        known = {"kind", "study_id", "findings", "image_path", "subject_id"}
        return cls(**_fields_from(cls, {k: v for k, v in data.items() if k in known}, optional_kind=True))


RECORD_TYPES: dict[str, type] = {
    cls.KIND: cls for cls in (PolarityItem, ContextualItem, TracingPair, ImageAttributes, ContextualClaim)
}

R = TypeVar("R")


def _plain(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in fields(record)}


# -- files -------------------------------------------------------------------------------

def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write records (objects with ``to_dict`` or plain dicts) as JSON lines, atomically.

    The lines go to a temporary file in the same folder, which replaces ``path`` only once
    complete, so readers never see a half-written benchmark. Returns the number of lines.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                data = record.to_dict() if hasattr(record, "to_dict") else record
                f.write(json.dumps(data, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_jsonl(path: str | os.PathLike, record_type: type[R]) -> list[R]:
    """Load and validate every line of ``path`` as ``record_type``; blank lines are skipped.

    Raises :class:`SchemaError` naming the file and line of the first bad record.
    """
    out: list[R] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise SchemaError(f"invalid JSON ({e.msg} at column {e.colno})", path, line_no) from None
            try:
                out.append(record_type.from_dict(data))  # type: ignore[attr-defined]
            except SchemaError as e:
                raise SchemaError(e.message, path, line_no) from None
            except TypeError as e:  # e.g. a field of the wrong JSON type reaching a constructor
                raise SchemaError(f"{record_type.__name__}: {e}", path, line_no) from None
    return out


def read_records(path: str | os.PathLike) -> tuple[str, list[Any]]:
    """Load a benchmark file whose record type is given by the first line's ``"kind"``."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise SchemaError("file is empty", path)
    try:
        kind = json.loads(first).get("kind")
    except (json.JSONDecodeError, AttributeError):
        raise SchemaError("the first line is not a JSON object", path) from None
    if kind not in RECORD_TYPES:
        raise SchemaError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_TYPES)}", path)
    return kind, read_jsonl(path, RECORD_TYPES[kind])

