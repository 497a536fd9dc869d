"""Read CheXpert-format label files (Irvin et al., AAAI 2019) into one table of studies.

Two layouts are understood, plain or gzip-compressed:

* CheXpert ``train.csv`` / ``valid.csv``: one row per image, ``Path`` plus the 14 label
  columns (``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA`` are optional). Rows of one study
  (the folder holding the image, e.g. ``patient00002/study1``) are merged; their labels
  must agree, and the frontal image is preferred as the study's image.
* MIMIC-CXR (Johnson et al., Sci Data 2019) ``mimic-cxr-2.0.0-chexpert.csv``: one row per study, ``subject_id``,
  ``study_id`` plus the label columns; no image paths (see ``evaluate.ImageResolver``).

A file with ``Path`` *and* ``study_id`` columns groups images by its ``study_id``.
Label cells are 1 (present), 0 (absent), -1 (uncertain) or blank (unmentioned); they are
stored as int8 codes with :data:`BLANK` for blank. Reading 223k rows takes about a second.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Literal, TextIO

import numpy as np

from negtrace.data.findings import ABSENT, LABEL_COLUMNS, PRESENT, UNCERTAIN

__all__ = ["BLANK", "LabelTable", "LabelFileError", "read_labels"]

BLANK = -2  # int8 code of an unmentioned finding (blank cell)

Layout = Literal["chexpert", "mimic"]

_CODES = {"": BLANK, "1.0": PRESENT, "0.0": ABSENT, "-1.0": UNCERTAIN, "1": PRESENT, "0": ABSENT,
          "-1": UNCERTAIN}
_MAX_REPORTED = 10


class LabelFileError(ValueError):
    """A label file that cannot be used as is; the message says what to fix and where."""


@dataclass(frozen=True, eq=False)
class LabelTable:
    """Labels of ``len(table)`` studies, in file order of each study's first row.

    ``values[i, j]`` is the code of ``LABEL_COLUMNS[j]`` for study ``i`` (1, 0, -1 or
    :data:`BLANK`). ``image_paths[i]`` is the study's (preferably frontal) image as written
    in the file, ``views[i]`` its ``Frontal/Lateral`` value; both are ``None`` when unknown.
    """

    source: str
    layout: Layout
    study_ids: list[str]
    subject_ids: list[str | None]
    image_paths: list[str | None]
    views: list[str | None]
    values: np.ndarray
    n_rows: int

    def __len__(self) -> int:
        return len(self.study_ids)

    @property
    def findings(self) -> np.ndarray:
        """int8 codes of the 13 findings, shape (n_studies, 13), columns in ``FINDINGS`` order."""
        return self.values[:, 1:]

    def labels(self, i: int) -> dict[str, int | None]:
        """Study ``i``'s labels by column name; ``None`` for blank."""
        return {c: (None if v == BLANK else int(v)) for c, v in zip(LABEL_COLUMNS, self.values[i], strict=True)}

    def index(self) -> dict[str, int]:
        """study id -> row of this table."""
        return {s: i for i, s in enumerate(self.study_ids)}


def read_labels(path: str | os.PathLike) -> LabelTable:
    """Read a CheXpert- or MIMIC-CXR-layout label CSV (``.csv`` or ``.csv.gz``).

    Raises :class:`LabelFileError` listing every missing column, the first bad label cells
    with their line numbers, duplicate study ids / image paths, or conflicting labels
    between images of one study.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"{path}: label file not found")
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise LabelFileError(f"{path}: file is empty (expected a header row)")
        header = [h.strip() for h in header]
        columns = _locate_columns(path, header)
        label_cells, ids, line_numbers, ragged = _scan_rows(reader, columns, len(header))
    if ragged:
        shown = "; ".join(f"line {n}: {k} fields" for n, k in ragged[:_MAX_REPORTED])
        raise LabelFileError(f"{path}: {len(ragged)} rows do not have the header's {len(header)} fields ({shown})")
    n_rows = len(line_numbers)
    if n_rows == 0:
        raise LabelFileError(f"{path}: no data rows after the header")
    codes = _decode(path, label_cells, line_numbers).reshape(n_rows, len(LABEL_COLUMNS))
    return _group(path, codes, ids, line_numbers, columns.layout)


# -- reading -----------------------------------------------------------------------------

@contextmanager
def _open_text(path: Path) -> Iterator[TextIO]:
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    stream = gzip.open(path, "rb") if gzipped else open(path, "rb")
    # utf-8-sig drops a byte-order mark that spreadsheet exports put before the first column name.
    with io.TextIOWrapper(stream, encoding="utf-8-sig", newline="") as f:
        yield f


@dataclass(frozen=True)
class _Columns:
    layout: Layout
    labels: list[int]
    path: int | None
    study: int | None
    subject: int | None
    view: int | None


def _locate_columns(path: Path, header: list[str]) -> _Columns:
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise LabelFileError(f"{path}: duplicate column names: {', '.join(dupes)}")
    position = {h: i for i, h in enumerate(header)}
    missing = [c for c in LABEL_COLUMNS if c not in position]
    has_path = "Path" in position
    if not has_path:
        missing_ids = [c for c in ("subject_id", "study_id") if c not in position]
        if missing_ids:
            raise LabelFileError(
                f"{path}: missing columns: {', '.join(missing_ids + missing)}. A label file needs 'Path' "
                "(CheXpert layout) or 'subject_id' and 'study_id' (MIMIC-CXR layout), plus the label "
                f"columns {', '.join(LABEL_COLUMNS)}. Found columns: {', '.join(header)}")
    if missing:
        raise LabelFileError(f"{path}: missing label columns: {', '.join(missing)}. Found columns: {', '.join(header)}")
    return _Columns(
        layout="chexpert" if has_path else "mimic",
        labels=[position[c] for c in LABEL_COLUMNS],
        path=position.get("Path"),
        study=position.get("study_id"),
        subject=position.get("subject_id"),
        view=position.get("Frontal/Lateral"),
    )


def _scan_rows(reader, columns: _Columns, width: int):
    """Collect label cells (flat, row-major) and id columns, without interpreting them."""
    get_labels = itemgetter(*columns.labels)
    id_names = [n for n in ("path", "study", "subject", "view") if getattr(columns, n) is not None]
    get_ids = itemgetter(*(getattr(columns, n) for n in id_names))
    label_cells: list[str] = []
    id_rows: list = []
    line_numbers: list[int] = []
    ragged: list[tuple[int, int]] = []
    for row in reader:
        if len(row) != width:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            ragged.append((reader.line_num, len(row)))
            continue
        label_cells.extend(get_labels(row))
        id_rows.append(get_ids(row))
        line_numbers.append(reader.line_num)
    if len(id_names) == 1:
        id_rows = [(v,) for v in id_rows]
    stripped = [[v.strip() for v in col] for col in zip(*id_rows, strict=True)] if id_rows else [[]] * len(id_names)
    ids = dict(zip(id_names, stripped, strict=True))
    return label_cells, ids, line_numbers, ragged


def _decode(path: Path, cells: list[str], line_numbers: list[int]) -> np.ndarray:
    try:
        return np.fromiter(map(_CODES.__getitem__, cells), dtype=np.int8, count=len(cells))
    except KeyError:
        pass
    # Slow path, only for files with unusual spellings ("1.00", " 1") or bad cells.
    codes = np.empty(len(cells), dtype=np.int8)
    errors: list[str] = []
    n_bad = 0
    width = len(LABEL_COLUMNS)
    for k, cell in enumerate(cells):
        code = _CODES.get(cell)
        if code is None:
            code, problem = _parse_cell(cell)
            if problem:
                n_bad += 1
                if len(errors) < _MAX_REPORTED:
                    errors.append(f"line {line_numbers[k // width]}, column {LABEL_COLUMNS[k % width]!r}: "
                                  f"{cell!r} ({problem})")
                continue
        codes[k] = code
    if n_bad:
        more = f"; and {n_bad - len(errors)} more" if n_bad > len(errors) else ""
        raise LabelFileError(f"{path}: {n_bad} label cells are not 1, 0, -1 or blank: {'; '.join(errors)}{more}")
    return codes


def _parse_cell(cell: str) -> tuple[int, str | None]:
    text = cell.strip()
    if not text:
        return BLANK, None
    try:
        value = float(text)
    except ValueError:
        return 0, "non-numeric"
    if value in (PRESENT, ABSENT, UNCERTAIN):
        return int(value), None
    return 0, "unexpected value"


# -- studies -----------------------------------------------------------------------------

def _group(path: Path, codes: np.ndarray, ids: dict[str, list[str]], line_numbers: list[int],
           layout: Layout) -> LabelTable:
    """Merge image rows into studies, checking ids for blanks and duplicates."""
    images, views = ids.get("path"), ids.get("view")
    blank = [line_numbers[r] for r in range(len(line_numbers))
             if any(not ids[k][r] for k in ("path", "study", "subject") if k in ids)]
    if blank:
        raise LabelFileError(f"{path}: {len(blank)} rows have an empty id (Path/study_id/subject_id), "
                             f"at lines {_lines(blank)}")
    if images is not None:
        _check_unique(path, images, line_numbers, "image path")
    studies_of_rows = ids["study"] if "study" in ids else [_study_from_path(p) for p in images]
    if images is None:  # one row per study: a repeated study id is an error
        _check_unique(path, studies_of_rows, line_numbers, "study_id")

    first_row: dict[str, int] = {}
    group = np.fromiter((first_row.setdefault(s, r) for r, s in enumerate(studies_of_rows)),
                        dtype=np.int64, count=len(studies_of_rows))
    conflicts = np.flatnonzero((codes != codes[group]).any(axis=1))
    if conflicts.size:
        shown = "; ".join(f"line {line_numbers[r]} vs line {line_numbers[group[r]]} ({studies_of_rows[r]})"
                          for r in conflicts[:_MAX_REPORTED])
        raise LabelFileError(f"{path}: {conflicts.size} image rows disagree with the labels of an earlier "
                             f"image of the same study: {shown}")

    chosen = dict(first_row)  # study -> row whose image represents it; frontal preferred
    if views is not None:
        for r, view in enumerate(views):
            study = studies_of_rows[r]
            if view.lower() == "frontal" and views[chosen[study]].lower() != "frontal":
                chosen[study] = r
    studies = list(first_row)
    rows = [chosen[s] for s in studies]
    if "subject" in ids:
        subjects: list[str | None] = [ids["subject"][r] for r in rows]
    elif images is not None:
        subjects = [_subject_from_study(s) for s in studies]
    else:
        subjects = [None] * len(rows)
    return LabelTable(
        source=str(path),
        layout=layout,
        study_ids=studies,
        subject_ids=subjects,
        image_paths=[images[r] for r in rows] if images is not None else [None] * len(rows),
        views=[views[r] or None for r in rows] if views is not None else [None] * len(rows),
        values=codes[np.fromiter(first_row.values(), dtype=np.int64, count=len(first_row))],
        n_rows=len(line_numbers),
    )


def _check_unique(path: Path, keys: list[str], line_numbers: list[int], what: str) -> None:
    seen: dict[str, int] = {}
    dupes: list[str] = []
    n = 0
    for r, key in enumerate(keys):
        if key in seen:
            n += 1
            if len(dupes) < _MAX_REPORTED:
                dupes.append(f"{key!r} at lines {line_numbers[seen[key]]} and {line_numbers[r]}")
        else:
            seen[key] = r
    if n:
        raise LabelFileError(f"{path}: {n} duplicate {what}s: {'; '.join(dupes)}")


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:_MAX_REPORTED]))
    return shown + (f" and {len(numbers) - _MAX_REPORTED} more" if len(numbers) > _MAX_REPORTED else "")


def _study_from_path(image_path: str) -> str:
    """``CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg`` -> ``patient00002/study1``."""
    folder = image_path.rpartition("/")[0]
    k = folder.find("patient")
    if k == 0 or (k > 0 and folder[k - 1] == "/"):
        return folder[k:]
    return folder or image_path


def _subject_from_study(study_id: str) -> str | None:
    return study_id.partition("/")[0] if study_id.startswith("patient") else None
