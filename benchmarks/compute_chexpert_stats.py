"""Summarise the real CheXpert training labels into ``negtrace/data/resources/chexpert_stats.json``.

Needs the optional ``torchxrayvision`` package, which ships CheXpert's ``train.csv`` as
``torchxrayvision/data/chexpert_train.csv.gz`` (223,414 image rows; Irvin et al., AAAI 2019).
The package itself never needs torchxrayvision: it reads the JSON written here.

Choices (see ``negtrace/data/resources/README.md``):
  * one row per study: frontal images only, first frontal image of each study (labels are
    per study and identical across its images);
  * prevalence counts label 1 only; uncertain (-1) counts as not present (the "U-Zeros"
    policy), because a phantom finding is rendered only when a report would affirm it; the
    uncertain rate is stored separately;
  * negation rate = share of studies whose label is 0 (the finding was explicitly negated in
    the impression); also given conditionally on the finding not being present (label != 1),
    overall and split by whether the study has any present non-device finding.

Usage:
    python benchmarks/compute_chexpert_stats.py [--csv PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path

import numpy as np

from negtrace.data.findings import FINDINGS, NO_FINDING
from negtrace.data.phantom import fit_pairwise_maxent

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "negtrace" / "data" / "resources" / "chexpert_stats.json"
AGE_EDGES = [0, 20, 30, 40, 50, 60, 70, 80, 91]


def default_csv() -> Path:
    import torchxrayvision

    return Path(torchxrayvision.__file__).parent / "data" / "chexpert_train.csv.gz"


def read_frontal_studies(path: Path) -> tuple[np.ndarray, list[str], list[float], int, float]:
    """Label codes (studies x 14 columns of LABEL order: No Finding + FINDINGS; NaN = blank),
    sexes, ages, the number of image rows read and the share of AP views among the studies."""
    columns = (NO_FINDING, *FINDINGS)
    seen: set[str] = set()
    labels, sexes, ages, n_rows, n_ap = [], [], [], 0, 0
    with gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            n_rows += 1
            if row["Frontal/Lateral"] != "Frontal":
                continue
            study = row["Path"].rsplit("/", 1)[0]
            if study in seen:
                continue
            seen.add(study)
            labels.append([float(row[c]) if row[c] != "" else np.nan for c in columns])
            sexes.append(row["Sex"])
            ages.append(float(row["Age"]))
            n_ap += row["AP/PA"] == "AP"
    return np.array(labels), sexes, ages, n_rows, n_ap / len(labels)


def summarise(labels: np.ndarray, sexes: list[str], ages: list[float]) -> dict:
    n = len(labels)
    findings = labels[:, 1:]
    present = findings == 1
    non_device = np.array([f != "Support Devices" for f in FINDINGS])
    normal = ~present[:, non_device].any(axis=1)

    def rate(mask: np.ndarray, within: np.ndarray | None = None) -> dict[str, float]:
        if within is None:
            return {f: float(mask[:, j].mean()) for j, f in enumerate(FINDINGS)}
        return {f: float(mask[within[:, j], j].mean()) for j, f in enumerate(FINDINGS)}

    not_present = ~present
    negated = findings == 0
    co = present.T.astype(np.float64) @ present.astype(np.float64) / n
    model = fit_pairwise_maxent(np.diag(co), co, float(normal.mean()))
    male = sum(s == "Male" for s in sexes)
    female = sum(s == "Female" for s in sexes)
    hist, _ = np.histogram(ages, bins=AGE_EDGES)
    return {
        "findings": list(FINDINGS),
        "n_studies": n,
        "prevalence": rate(present),
        "uncertain_rate": rate(findings == -1),
        "negation_rate": rate(negated),
        "negation_rate_given_not_present": rate(negated, not_present),
        "negation_rate_given_not_present_normal_study": rate(negated, not_present & normal[:, None]),
        "negation_rate_given_not_present_abnormal_study": rate(negated, not_present & ~normal[:, None]),
        "no_finding_label_rate": float((labels[:, 0] == 1).mean()),
        "no_positive_rate": float(normal.mean()),
        "cooccurrence": np.round(co, 8).tolist(),
        "cooccurrence_counts": (present.T.astype(np.int64) @ present.astype(np.int64)).tolist(),
        "sex": {"Female": female / (male + female), "Male": male / (male + female)},
        "age": {"edges": AGE_EDGES, "freq": (hist / hist.sum()).round(6).tolist()},
        "maxent": {"h": list(model.h), "J": [list(r) for r in model.J], "g": model.g},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=None, help="CheXpert train.csv(.gz); default: torchxrayvision's")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    path = args.csv or default_csv()
    labels, sexes, ages, n_rows, ap_share = read_frontal_studies(path)
    stats = {
        "source": "CheXpert v1.0 train.csv (Irvin et al., AAAI 2019), as shipped by torchxrayvision "
                  "(torchxrayvision/data/chexpert_train.csv.gz)",
        "command": "python benchmarks/compute_chexpert_stats.py",
        "unit": "study (first frontal image of each study)",
        "uncertain_policy": "U-Zeros for prevalence/co-occurrence: -1 counts as not present; "
                            "uncertain_rate reports the -1 share separately",
        "n_image_rows": n_rows,
        "ap_share": round(ap_share, 6),
        **summarise(labels, sexes, ages),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stats, indent=1) + "\n")
    print(f"wrote {args.out}: {stats['n_studies']} frontal studies from {n_rows} image rows")
    for name, p in sorted(stats["prevalence"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} present {p:6.3f}  negated {stats['negation_rate'][name]:6.3f}"
              f"  uncertain {stats['uncertain_rate'][name]:6.3f}")


if __name__ == "__main__":
    main()
